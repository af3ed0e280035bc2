"""What a judge said (`Verdict`) and what the policy made of it (`Decision`).

Both are pydantic models so that the very same record goes to the audit log, the agent's
traces and the CLI without a second serialisation path.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from soda_guard.ids import new_id
from soda_guard.trajectory import ToolCall


class Label(str, Enum):
    SAFE = "safe"
    UNSAFE = "unsafe"
    CONTROVERSIAL = "controversial"


class Action(str, Enum):
    ALLOW = "allow"
    BLOCK = "block"
    ESCALATE = "escalate"
    LOG = "log"

    @property
    def runs_tool(self) -> bool:
        return self in (Action.ALLOW, Action.LOG)

    @property
    def strictness(self) -> int:
        """allow < log < escalate < block: where one of several outcomes must be taken without
        knowing which applies, the highest."""
        return _STRICTNESS[self]


_STRICTNESS = {Action.ALLOW: 0, Action.LOG: 1, Action.ESCALATE: 2, Action.BLOCK: 3}


Source = Literal["trajectory", "policy", "judge_config", "default"]


class Verdict(BaseModel):
    """One judgment. `label` is None exactly when the judge failed (`error`) or its output
    could not be parsed (`parse_failure`): a failed judgment is never read as safe."""

    label: Label | None
    score: float | None = None
    reason: str | None = None
    categories: list[str] = Field(default_factory=list)
    refusal: bool | None = None
    judge: str
    kind: str
    model: str
    latency_ms: float = 0.0
    parse_failure: bool = False
    error: str | None = None
    raw_output: str = ""
    harm: str | None = None
    harm_source: Source | None = None
    environment: str | None = None
    environment_source: Source | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    truncated: bool = False
    settled_by: str | None = None
    """A cascade's verdict: the stage whose answer this is."""
    stages: list[Verdict] = Field(default_factory=list)
    """A cascade's verdict: every stage's own verdict, in the order they were asked."""

    @property
    def failed(self) -> bool:
        return self.label is None


ReviewType = Literal["approve", "edit", "reject", "respond"]


class Review(BaseModel):
    """A person's answer to an escalation. `answers` is the escalation's `decision_id`;
    `args` are the edited arguments (edit), `message` the reason (reject) or the answer given
    in the tool's place (respond)."""

    model_config = ConfigDict(extra="forbid")

    type: ReviewType
    answers: str
    message: str | None = None
    args: dict[str, Any] | str | None = None
    edit_decision_id: str | None = None
    timestamp: float = Field(default_factory=time.time)


class Decision(BaseModel):
    """The policy's answer for one tool call (or one trajectory when no call is pending).
    `review` is set on the audit record of a person's answer to an escalation (rule
    `review`), which names the escalation it answers."""

    # a call's `Infinity` written as JSON's `null` would record another call than the one decided
    model_config = ConfigDict(ser_json_inf_nan="constants")

    decision_id: str = Field(default_factory=new_id)
    timestamp: float = Field(default_factory=time.time)
    action: Action
    rule: str
    why: str
    tool_call: ToolCall | None = None
    verdict: Verdict | None = None
    conversation_id: str | None = None
    review: Review | None = None
    condition: str | None = None
    """What held of the rule's `when:` conditions, in words."""
    stage: str | None = None
    """The cascade stage that settled the verdict."""

    @property
    def allowed(self) -> bool:
        return self.action.runs_tool
