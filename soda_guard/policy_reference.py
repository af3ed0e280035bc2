"""The policy's reference, generated from its pydantic models so it cannot drift from them:
`soda-guard policy reference` writes docs/policy-reference.md (a test checks the committed
copy is current) and `soda-guard policy schema` the JSON schema editors validate YAML with."""

from __future__ import annotations

import enum
import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from soda_guard.mcp.annotations import McpPolicy
from soda_guard.policy import (
    AuditConfig,
    CascadeConfig,
    Defaults,
    JudgeConfig,
    KeywordsConfig,
    Policy,
    RecordsPolicy,
    ReviewPolicy,
    Rule,
    ToolResultPolicy,
)

#: (where the section's keys sit in a policy, its model), in the order a policy reads
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", Policy),
    ("judges.NAME", JudgeConfig),
    ("judges.NAME (kind: keywords)", KeywordsConfig),
    ("judges.NAME (kind: cascade)", CascadeConfig),
    ("defaults", Defaults),
    ("rules[]", Rule),
    ("tool_results", ToolResultPolicy),
    ("audit", AuditConfig),
    ("review", ReviewPolicy),
    ("records", RecordsPolicy),
    ("mcp", McpPolicy),
)

COMMAND = "soda-guard policy reference > docs/policy-reference.md"


def schema() -> dict[str, Any]:
    return Policy.model_json_schema()


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(arg) for arg in args)
    if origin is not None and args:
        if origin.__name__ == "Annotated":
            return _type(args[0])
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(json.dumps(member.value) for member in annotation)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see its section"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value, default=str)}`"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in get_args(annotation) for found in _models_in(arg)]


def _description(model: type[BaseModel], name: str) -> str:
    """A subclass that only changes a default keeps its base class's description; a nested
    section points at its own table."""
    for klass in model.__mro__:
        fields = getattr(klass, "model_fields", {})
        if name in fields and fields[name].description:
            return " ".join(fields[name].description.split()).replace("|", "\\|")
    where = {section: key for key, section in SECTIONS}
    nested = [f"`{where[found]}`" for found in _models_in(model.model_fields[name].annotation) if found in where]
    return f"see {', '.join(nested)}" if nested else ""


def _limits(model: type[BaseModel], name: str) -> str:
    bounds = []
    for item in model.model_fields[name].metadata:
        for key, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "items >=")):
            value = getattr(item, key, None)
            if value is not None:
                bounds.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""


def reference() -> str:
    lines = [
        "# Policy reference",
        "",
        f"Generated from the pydantic models in `soda_guard/policy.py` by `{COMMAND}`;",
        "`soda-guard policy schema > policy.schema.json` writes the same as a JSON schema for editors.",
        "Unknown keys are errors.",
    ]
    for where, model in SECTIONS:
        lines += ["", f"## `{where}` ({model.__name__})", ""]
        if model.__doc__ and model is not Policy:
            lines += [" ".join(model.__doc__.split()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type(field.annotation) + _limits(model, name)
            lines.append(f"| `{name}` | {kind} | {_default(model, name)} | {_description(model, name)} |")
    return "\n".join(lines) + "\n"
