"""MCP tool annotations as a policy condition, and the per-server pins that replace them.

A server declares `readOnlyHint`, `destructiveHint`, `idempotentHint` and `openWorldHint` for
its tools; nothing checks them. A rule conditioned on them trusts the server that sent them,
so a policy can pin the annotations of a server's tools instead: for a pinned server what it
declares is ignored.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the policy's short names and the MCP wire names (camelCase; the Python SDK's snake_case too)
HINTS: dict[str, tuple[str, str]] = {
    "readOnly": ("readOnlyHint", "read_only_hint"),
    "destructive": ("destructiveHint", "destructive_hint"),
    "idempotent": ("idempotentHint", "idempotent_hint"),
    "openWorld": ("openWorldHint", "open_world_hint"),
}


class _Hints(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    readOnly: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None
    openWorld: bool | None = None

    def declared(self) -> dict[str, bool]:
        return self.model_dump(exclude_none=True)


class AnnotationCondition(_Hints):
    """`when: {annotations: {...}}`: every hint given must hold for the call's effective
    annotations. At least one hint: an empty condition would silently match every MCP tool."""

    @model_validator(mode="after")
    def _not_empty(self) -> AnnotationCondition:
        if not self.declared():
            raise ValueError("name at least one of readOnly, destructive, idempotent, openWorld")
        return self


class PinnedAnnotations(_Hints):
    """The hints a policy asserts for a server's tools, in place of the server's own."""


class McpServerPolicy(BaseModel):
    """`mcp.servers.<name>`: `annotations` maps tool-name globs to pinned hints, first match
    wins; a tool no glob matches has no annotations (the MCP defaults apply)."""

    model_config = ConfigDict(extra="forbid")

    annotations: dict[str, PinnedAnnotations] = Field(default_factory=dict)


class McpPolicy(BaseModel):
    """`mcp:`: what the policy trusts about MCP servers instead of what they declare."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    servers: dict[str, McpServerPolicy] = Field(default_factory=dict)
    """Per server name: pinned tool annotations (`annotations: {GLOB: {readOnly: ..., ...}}`),
    which replace whatever that server declares."""


def from_wire(annotations: Mapping[str, Any] | None) -> dict[str, bool] | None:
    """The four hints of an MCP `ToolAnnotations` (wire camelCase or SDK snake_case), under
    the policy's names; anything that is not a boolean is dropped, since a hint that is not
    true or false says nothing."""
    if not annotations:
        return None
    found: dict[str, bool] = {}
    for short, names in HINTS.items():
        for name in names:
            value = annotations.get(name)
            if isinstance(value, bool):
                found[short] = value
                break
    return found or None


def effective(
    server: str | None, tool: str, declared: Mapping[str, bool] | None, pins: McpPolicy | None
) -> dict[str, bool] | None:
    """The annotations the policy goes by: the pinned ones when the policy pins `server`, the
    declared ones otherwise; None for a tool no MCP server provides."""
    if server is None:
        return None
    pinned = pins.servers.get(server) if pins is not None else None
    if pinned is None:
        return dict(declared) if declared else {}
    for pattern, hints in pinned.annotations.items():
        if fnmatch.fnmatchcase(tool, pattern):
            return hints.declared()
    return {}


def resolved(annotations: Mapping[str, bool]) -> dict[str, bool]:
    """All four hints, the missing ones at the MCP specification's defaults (read-only false,
    destructive true, idempotent false, open-world true); destructive defaults to false for a
    read-only tool, for which the specification says it is meaningless."""
    read_only = annotations.get("readOnly", False)
    return {
        "readOnly": read_only,
        "destructive": annotations.get("destructive", not read_only),
        "idempotent": annotations.get("idempotent", False),
        "openWorld": annotations.get("openWorld", True),
    }


def matches(condition: AnnotationCondition, annotations: Mapping[str, bool] | None) -> bool:
    """Whether a call with these effective annotations meets `condition`. A tool that is not
    an MCP tool (None) meets no annotation condition: it declared nothing."""
    if annotations is None:
        return False
    actual = resolved(annotations)
    return all(actual[hint] == wanted for hint, wanted in condition.declared().items())
