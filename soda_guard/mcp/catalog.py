"""Which tools an MCP server provides, for the guard paths that see only a tool's name.

A LangChain agent's tool call names the tool and nothing else; the adapter registers each MCP
tool here (`soda_guard.integrations.mcp`) and the guard stamps the server and the declared
annotations onto the calls it judges, so the policy and the judge see them as MCP tools.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from soda_guard.trajectory import AssistantStep, ToolCall, Trajectory


_Calls = tuple[tuple[ToolCall, str, str | None, str, object], ...]
"""A step's calls as stamped: each object, and its name, server, id and arguments then."""


class ToolCatalog:
    """Tool name → (server, the tool's name on it where that is another, declared
    annotations). A name registered again replaces the entry: one guard serves one agent's
    tool set, whose names are unique."""

    def __init__(self) -> None:
        self._tools: dict[str, tuple[str, str | None, dict[str, bool] | None]] = {}
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[Any, Any]] = {}
        self._stamped: dict[int, tuple[AssistantStep, int, AssistantStep, _Calls]] = {}
        self._version = 0

    def add(self, name: str, server: str, annotations: Mapping[str, bool] | None, server_tool: str | None = None) -> None:
        with self._lock:
            self._tools[name] = (server, server_tool if server_tool != name else None, dict(annotations) if annotations else None)
            self._version += 1

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

    def forget(self, tool: Any) -> None:
        """Have `unread` take this tool object as new again: an adapter that refused it is
        asked again at the next step, rather than the tool passing as read."""
        self._seen.pop(id(tool), None)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def describe(self, trajectory: Trajectory) -> Trajectory:
        """The trajectory with every call of a registered tool that names no server stamped
        with its server and annotations; the same object when there is nothing to stamp.
        Every check reads the whole conversation's calls (the judged view and the context its
        conditions read), so a step stamped once is kept, by identity, until a tool is
        registered again: a long conversation is not copied again for each call."""
        if not self._tools:
            return trajectory
        steps = list(trajectory.steps)
        changed = False
        for index, step in enumerate(steps):
            if isinstance(step, AssistantStep) and step.tool_calls:
                stamped = self._stamp_step(step)
                if stamped is not step:
                    steps[index] = stamped
                    changed = True
        return trajectory.model_copy(update={"steps": steps}) if changed else trajectory

    def stamp(self, call: ToolCall) -> ToolCall:
        """`call` with its server (and the tool's name there) and annotations where it names
        none and its tool is registered."""
        known = self._tools.get(call.name) if call.server is None else None
        if known is None:
            return call
        return call.model_copy(update={"server": known[0], "server_tool": known[1], "annotations": known[2]})

    def _stamp_step(self, step: AssistantStep) -> AssistantStep:
        version = self._version
        kept = self._stamped.get(id(step))
        if kept is not None and kept[0] is step and kept[1] == version and _unchanged(step, kept[3]):
            return kept[2]
        calls = [self.stamp(call) for call in step.tool_calls]
        stamped = step if all(new is old for new, old in zip(calls, step.tool_calls)) else step.model_copy(update={"tool_calls": calls})
        if len(self._stamped) >= 4096:
            self._stamped.clear()
        self._stamped[id(step)] = (step, version, stamped, _as_stamped(step))
        return stamped


def _as_stamped(step: AssistantStep) -> _Calls:
    """Each call as it was when stamped: the object, and the fields a stamp reads or copies."""
    return tuple((call, call.name, call.server, call.id, call.args) for call in step.tool_calls)


def _unchanged(step: AssistantStep, stamped: _Calls) -> bool:
    """Whether `step` still holds the calls it was stamped from, as they were: steps are
    mutable, and an application that swaps, adds or renames a call in place, or gives one new
    arguments, must not be judged from the copy stamped before (arguments changed inside the
    same object are shared with the copy, so seen either way)."""
    now = step.tool_calls
    return len(now) == len(stamped) and all(
        call is before and call.name == name and call.server == server and call.id == id_ and call.args is args
        for call, (before, name, server, id_, args) in zip(now, stamped)
    )
