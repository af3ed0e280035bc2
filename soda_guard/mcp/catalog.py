"""Which tools an MCP server provides, for the guard paths that see only a tool's name.

A LangChain agent's tool call names the tool and nothing else; the adapter registers each MCP
tool here (`soda_guard.integrations.mcp`) and the guard stamps the server and the declared
annotations onto the calls it judges, so the policy and the judge see them as MCP tools.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from soda_guard.trajectory import AssistantStep, Trajectory


class ToolCatalog:
    """Tool name → (server, declared annotations). A name registered again replaces the
    entry: one guard serves one agent's tool set, whose names are unique."""

    def __init__(self) -> None:
        self._tools: dict[str, tuple[str, dict[str, bool] | None]] = {}
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[Any, Any]] = {}

    def add(self, name: str, server: str, annotations: Mapping[str, bool] | None) -> None:
        with self._lock:
            self._tools[name] = (server, dict(annotations) if annotations else None)

    def unread(self, tool: Any) -> bool:
        """Whether an adapter has yet to read this tool object (or its name or metadata object
        was replaced since): agents hand the same tool objects at every step. Seen objects are
        kept alive, so an id is never reused, and forgotten in bulk past 4,096 (an agent that
        makes new tool objects per request)."""
        mark = (getattr(tool, "name", None), id(getattr(tool, "metadata", None)))
        known = self._seen.get(id(tool))
        if known is not None and known[0] is tool and known[1] == mark:
            return False
        if len(self._seen) >= 4096:
            self._seen.clear()
        self._seen[id(tool)] = (tool, mark)
        return True

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def describe(self, trajectory: Trajectory) -> Trajectory:
        """The trajectory with every call of a registered tool that names no server stamped
        with its server and annotations; the same object when there is nothing to stamp."""
        if not self._tools:
            return trajectory
        steps = list(trajectory.steps)
        changed = False
        for index, step in enumerate(steps):
            if not isinstance(step, AssistantStep) or not any(
                call.server is None and call.name in self._tools for call in step.tool_calls
            ):
                continue
            calls = []
            for call in step.tool_calls:
                known = self._tools.get(call.name) if call.server is None else None
                if known is not None:
                    call = call.model_copy(update={"server": known[0], "annotations": known[1]})
                calls.append(call)
            steps[index] = step.model_copy(update={"tool_calls": calls})
            changed = True
        return trajectory.model_copy(update={"steps": steps}) if changed else trajectory
