"""The framework-neutral record of what an agent has said and done so far.

Every adapter (LangChain callbacks, middleware, OpenAI messages, dataset records) converts into
this one model, so the judges and the policy never see framework objects.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCall(_Model):
    """A requested tool invocation. `args` stays a raw string when the agent's arguments were
    not valid JSON: the judge must still see exactly what the agent asked for.

    `server` and `annotations` are set for a tool an MCP server provides: the server's name (as
    the proxy or adapter knows it) and the `ToolAnnotations` hints it declared, by the policy's
    names (`readOnly`, `destructive`, `idempotent`, `openWorld`). Both come from the server, so they are untrusted: the policy
    can pin annotations per server (`soda_guard.mcp.annotations`). `server_tool` is the tool's
    own name on that server where the agent calls it by another: a FastMCP `ClientGroup` or
    multi-server `MCPConfig` hands the agent the `files` server's `delete_file` as
    `files_delete_file` (and an `MCPConfig` tool transform may rename it), and the policy's
    `files:delete_*` means the server's name."""

    id: str
    name: str
    args: dict[str, Any] | str = Field(default_factory=dict)
    server: str | None = None
    annotations: dict[str, bool] | None = None
    server_tool: str | None = None

    @property
    def tool_name(self) -> str:
        """The tool's name as its server knows it (the agent's name for any other tool)."""
        return self.server_tool or self.name

    @property
    def qualified_name(self) -> str:
        """`server:tool` for an MCP tool, the bare name otherwise: what the judge is shown and
        what a `server:tool` pattern of the policy is matched against."""
        return f"{self.server}:{self.tool_name}" if self.server else self.name


class _Comparing(threading.local):
    """Set while this thread runs `same_start`'s list comparison."""

    active = False


_COMPARING = _Comparing()


class _Distinct(Exception):
    """Raised by a step's comparison inside `same_start`: two steps that are not one object."""


class _StepModel(_Model):
    """A step: compared by value, as a model, except inside `same_start`, where comparing
    two steps at all means they are not the same object. A subclass keeps this comparison."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__eq__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} may not define __eq__: steps are compared by _StepModel's")

    def __eq__(self, other: object) -> bool:
        if _COMPARING.active:
            raise _Distinct
        return super().__eq__(other)


class SystemStep(_StepModel):
    role: Literal["system"] = "system"
    content: str


class UserStep(_StepModel):
    role: Literal["user"] = "user"
    content: str


class AssistantStep(_StepModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ToolStep(_StepModel):
    """A tool's result. `error` is the failure text a tool reported beside (or instead of) its
    content; the judge is shown it, marked as an error."""

    role: Literal["tool"] = "tool"
    tool_call_id: str | None = None
    name: str | None = None
    content: str | None = None
    is_error: bool = False
    error: str | None = None


Step = Annotated[Union[SystemStep, UserStep, AssistantStep, ToolStep], Field(discriminator="role")]


_STEP_TYPES = frozenset({SystemStep, UserStep, AssistantStep, ToolStep})


def exact_steps(steps: Sequence[object]) -> bool:
    """Whether every one of `steps` is of one of the four step classes exactly: `same_start`'s
    condition on `earlier`, whose elements must compare by `_StepModel.__eq__` (an object of
    another class may compare equal and let the comparison go on). Read at C speed; a subclass
    of a step class also compares by it, but telling one apart costs a call a step."""
    return _STEP_TYPES.issuperset(map(type, steps))


def same_start(earlier: list[Any], steps: list[Any]) -> bool:
    """Whether `steps` begins with the very objects in `earlier`, which are all of the step
    classes exactly (`exact_steps`), at the speed of a list comparison rather than of a call
    per step: Python's list comparison passes over identical elements in C and compares the
    first other pair with the earlier step's `__eq__` (or a step subclass's, which is the same),
    which here stops it. Steps that compare equal may still render otherwise (`1 == True`), so
    equality is a mismatch too. Plain lists only: a subclass's own comparison would run instead."""
    if type(earlier) is not list or type(steps) is not list or len(earlier) > len(steps):
        return False
    _COMPARING.active = True
    try:
        earlier <= steps  # noqa: B015 - run for its comparisons, not its result
    except (_Distinct, TypeError):  # TypeError: no order between two other objects of `earlier`'s
        return False
    finally:
        _COMPARING.active = False
    return True


class Trajectory(_Model):
    """An ordered conversation plus what is known about the threat being judged.

    `harm` / `environment` feed the SODA judge's header; when absent the policy (or the literal
    "unspecified") supplies them, and the verdict records which source was used.
    `conversation_id` keys per-conversation state such as the judge's prefix KV cache.
    """

    steps: list[Step] = Field(default_factory=list)
    harm: str | None = None
    environment: str | None = None
    conversation_id: str | None = None
    truncated: bool = False
    """The conversation reached the guard already cut (a framework's window, such as AutoMode's
    last 30 messages): every verdict on it says `truncated`, and `on_truncated` applies."""

    def pending_tool_calls(self) -> list[ToolCall]:
        """Calls of the last assistant step that have no tool result after them yet."""
        for index in range(len(self.steps) - 1, -1, -1):
            step = self.steps[index]
            if isinstance(step, AssistantStep):
                answered = {
                    later.tool_call_id
                    for later in self.steps[index + 1 :]
                    if isinstance(later, ToolStep)
                }
                return [call for call in step.tool_calls if call.id not in answered]
            if isinstance(step, UserStep):
                return []
        return []

    def with_only_pending_call(self, call_id: str) -> Trajectory:
        """The view the judge gets for one of several parallel calls: the last assistant step
        keeps its text but only that call, so each call gets its own verdict."""
        for index in range(len(self.steps) - 1, -1, -1):
            step = self.steps[index]
            if isinstance(step, AssistantStep):
                kept = [call for call in step.tool_calls if call.id == call_id]
                if not kept:
                    raise KeyError(f"no pending tool call with id {call_id!r}")
                steps = list(self.steps)
                steps[index] = step.model_copy(update={"tool_calls": kept})
                return self.model_copy(update={"steps": steps[: index + 1]})
        raise KeyError(f"no pending tool call with id {call_id!r}")

    def latest_user_index(self) -> int | None:
        for index in range(len(self.steps) - 1, -1, -1):
            if isinstance(self.steps[index], UserStep):
                return index
        return None

    def append(self, step: SystemStep | UserStep | AssistantStep | ToolStep) -> None:
        self.steps.append(step)

    @classmethod
    def from_openai(cls, messages: list[dict[str, Any]], **fields: Any) -> Trajectory:
        from soda_guard.converters import from_openai_messages

        return from_openai_messages(messages, **fields)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Trajectory:
        from soda_guard.converters import from_agent_record

        return from_agent_record(record)
