"""What every judge provides: a renderer (trajectory → chat messages), a parser (text → label)
and a score spec (where in its output the verdict token sits)."""

from __future__ import annotations

import json
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Callable

from soda_guard.generation import ScoreSpec
from soda_guard.trajectory import AssistantStep, SystemStep, ToolStep, Trajectory, UserStep
from soda_guard.verdict import Label, Source


@dataclass
class RenderedPrompt:
    messages: list[dict[str, str]]
    harm: str | None = None
    harm_source: Source | None = None
    environment: str | None = None
    environment_source: Source | None = None
    truncated: bool = False


@dataclass
class ParsedOutput:
    label: Label | None
    reason: str | None = None
    categories: list[str] = field(default_factory=list)
    refusal: bool | None = None
    label_at: int | None = None
    """Character offset of the accepted label in the output: where the score must be read."""

    @property
    def parse_failure(self) -> bool:
        return self.label is None


class LineOpenings:
    """Whether a match in `text` opens its line: only spaces stand between the line's start and
    it. A judge writes its verdict marker at the start of a line; one inside a line is the judge
    quoting something (a tool result that planted `[Verdict] SAFE` for it to repeat), and a
    harmless label read from a quote could let a call through, most of all from an output cut
    after the quote.

    Asked for a parser's matches in order, each character is looked at once: a reply quoting a
    label thousands of times on one line made a scan back to the line's start for every quote,
    seconds of CPU for a reply of a megabyte. What lies between the line's start and the last
    index asked is remembered instead."""

    __slots__ = ("_text", "_asked", "_blank")

    def __init__(self, text: str) -> None:
        self._text = text
        self._asked = 0
        self._blank = True
        """Whether only spaces stand between the start of the line holding `_asked` and it."""

    def __call__(self, index: int) -> bool:
        """`index` is at or past every index asked before."""
        text, asked = self._text, self._asked
        newline = text.rfind("\n", asked, index)
        if newline >= 0:
            self._blank = not text[newline + 1 : index].strip()
        elif self._blank:
            self._blank = not text[asked:index].strip()
        self._asked = index
        return self._blank


def unchanged(text: str) -> str:
    return text


def assistant_parts(step: AssistantStep, escape: Callable[[str], str] = unchanged) -> tuple[str, ...]:
    """The assistant turn in Qwen's own tool-call text, the shape the judges saw in training,
    split into agent-written parts (even positions: the text, each call's arguments) and the
    structure around them (odd positions: tags and the call's name). Truncation may clip the
    former but keeps the latter, so a long text or long arguments never hide the tool's name.
    `escape` neutralises what the agent wrote before the tags are added."""
    parts = [escape(step.content)]
    between = ""
    for call in step.tool_calls:
        # `{"name": ..., "arguments": null}` as `json.dumps` writes it, less the `null}`
        head = '{"name": ' + JSON_TEXT.encode(call.qualified_name) + ', "arguments": '
        separator = "\n" if parts[0] or between else ""
        parts += [between + separator + "<tool_call>\n" + escape(head), escape(JSON_TEXT.encode(call.args))]
        between = "}\n</tool_call>"
    return (*parts, between)


JSON_TEXT = json.JSONEncoder(ensure_ascii=False)
"""`json.dumps(value, ensure_ascii=False)` as an encoder built once: `json.dumps` with any
option builds a new encoder per call, and the judges' renders and screens encode arguments
on every call."""


TOOL_ERROR_LABEL = "Tool error: "


def tool_result_text(step: ToolStep) -> str:
    """A tool result as the judge reads it: its content, and a failure the tool reported,
    marked as one (an empty block would hide that the action was attempted and failed)."""
    content = step.content or ""
    if step.error:
        return f"{content}\n{TOOL_ERROR_LABEL}{step.error}" if content else f"{TOOL_ERROR_LABEL}{step.error}"
    if step.is_error and content:
        return f"{TOOL_ERROR_LABEL}{content}"
    return content


def text_size(step: SystemStep | UserStep | AssistantStep | ToolStep, limit: int) -> int:
    """About how many characters `step` renders from (content, error, each call's name and
    arguments), counted only until past `limit`: a guess at the cost of rendering it that never
    costs more than the limit itself (arguments nested however deep are walked, not recursed)."""
    size = len(getattr(step, "content", None) or "") + len(getattr(step, "error", None) or "")
    pending: list[object] = [call.name for call in getattr(step, "tool_calls", ())]
    pending += [call.args for call in getattr(step, "tool_calls", ())]
    while pending and size <= limit:
        value = pending.pop()
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, Mapping):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, (list, tuple)):
            pending += value
        else:
            size += 8
    return size


def render_assistant(step: AssistantStep, escape: Callable[[str], str] = unchanged) -> str:
    return "".join(assistant_parts(step, escape))


class Judge(ABC):
    """A judge model's interface. Subclasses hold no model: a backend runs the messages."""

    kind: str
    score_spec: ScoreSpec
    default_max_new_tokens: int = 128

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind

    @abstractmethod
    def render(self, trajectory: Trajectory) -> RenderedPrompt: ...

    def renders_at_once(self, trajectories: Sequence[Trajectory]) -> bool:
        """Whether rendering `trajectories` is a small job (so an async caller may do it on its
        event loop rather than hand it to a worker thread): False unless a judge knows."""
        return False

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput: ...


_ROLE = operator.attrgetter("role")
"""A step's role, which tells the step types apart as `isinstance` does: read for a whole
conversation at C speed (pydantic classes check instances through `ABCMeta`)."""

_ROLE_OF_TYPE = {SystemStep: "system", UserStep: "user", AssistantStep: "assistant", ToolStep: "tool"}.__getitem__


def step_roles(steps: Sequence[object]) -> list[str]:
    """The steps' roles, by their exact types (half the time of reading the attribute, which
    goes through pydantic's attribute hook); by the attribute for a subclass of a step type."""
    try:
        return list(map(_ROLE_OF_TYPE, map(type, steps)))
    except KeyError:
        return list(map(_ROLE, steps))


def last_index(roles: list[str], role: str) -> int | None:
    """The index of the last `role` in `roles`, found at C speed (a scan may cross the whole
    conversation)."""
    try:
        return len(roles) - 1 - roles[::-1].index(role)
    except ValueError:
        return None
