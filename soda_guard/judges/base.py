"""What every judge provides: a renderer (trajectory → chat messages), a parser (text → label)
and a score spec (where in its output the verdict token sits)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from soda_guard.generation import ScoreSpec
from soda_guard.trajectory import AssistantStep, ToolCall, Trajectory
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

    @property
    def parse_failure(self) -> bool:
        return self.label is None


def render_tool_call(call: ToolCall) -> str:
    """Qwen's own tool-call text, the shape the judges saw in training."""
    payload = json.dumps({"name": call.name, "arguments": call.args}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def render_assistant(step: AssistantStep) -> str:
    pieces = [step.content] if step.content else []
    pieces.extend(render_tool_call(call) for call in step.tool_calls)
    return "\n".join(pieces)


class Judge(ABC):
    """A judge model's interface. Subclasses hold no model: a backend runs the messages."""

    kind: str
    score_spec: ScoreSpec
    default_max_new_tokens: int = 128

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind

    @abstractmethod
    def render(self, trajectory: Trajectory) -> RenderedPrompt: ...

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput: ...
