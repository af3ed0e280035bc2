"""soda-guard's judges as a LangChain decision model, for `AutoModeMiddleware` (langchain 1.5).

    AutoModeMiddleware(tools=[...], classifier=SodaGuardDecisionModel(policy))

AutoMode asks one `Noul` question per guarded call ("is this call risky?") and does one of two
things with the answer: at 0.5 or above it blocks the call, below it runs it. The answer is
made so that what AutoMode does is what the guard decided:

- The probability is the judge's own (the SODA judge's P(UNSAFE) at its verdict, Qwen3Guard's
  probability of Unsafe or Controversial) where it lies on the side of AutoMode's cut that the
  guard's action does; otherwise it is the nearest value on that side (a policy `threshold` of
  0.3 blocks a call scored 0.35, so AutoMode is told 0.5).
- AutoMode cannot ask a person: an `escalate` is blocked, and audited as the block it is.
- A judgment that failed is not passed off as a probability: where the policy's `on_error`
  does not let the call run, the classifier raises `JudgmentFailed` naming the cause and the
  `on_error` action (AutoMode lets classification failures propagate without running the
  tool); where it does, the call runs and the audit says the judge failed.
- AutoMode shows the classifier at most its last 30 messages. A conversation of that length may
  have been cut, and nothing in what AutoMode sends says whether it was, so it is judged as
  truncated (`Verdict.truncated`; `on_truncated: error` sends it to `on_error`).

The call is judged as the middleware judges it (same trajectory, rendering, batching, audit
record); `request_id` of the response is the decision's id in the audit log. The question's
instructions and criteria are not read: the judges answer in their trained formats.

Needs `langchain_core.decisions` (langchain-core 1.8 or later).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from langchain_core.decisions import BaseDecisionModel, ClassifierResponse, NoulAnswer, Question
from langchain_core.messages import convert_to_messages
from pydantic import ConfigDict, Field

from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard, unasked
from soda_guard.policy import Policy
from soda_guard.trajectory import ToolCall, Trajectory
from soda_guard.verdict import Action, Decision

from soda_guard.integrations._convert import to_trajectory, with_calls
from soda_guard.integrations._enforce import as_guard, thread_id

__all__ = ["AUTO_MODE_WINDOW", "JudgmentFailed", "SodaGuardDecisionModel"]

AUTO_MODE_WINDOW = 30
"""How many of the latest messages `AutoModeMiddleware` sends its classifier."""

CUT = 0.5
"""AutoMode blocks at this probability or above."""

_BELOW_CUT = math.nextafter(CUT, 0.0)


class JudgmentFailed(SodaGuardError):
    """The judge could not decide a call AutoMode asked about and the policy's `on_error` does
    not let it run. Raised from the classifier, so AutoMode does not run the tool and the cause
    reaches the caller instead of a made-up probability. `decision` is the audited record."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        name = decision.tool_call.name if decision.tool_call else "tool"
        super().__init__(f"soda-guard could not judge `{name}` ({decision.why}); on_error is {decision.action.value}")


class SodaGuardDecisionModel(BaseDecisionModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True)
    model: str = "soda-guard"
    harm: str | None = None
    environment: str | None = None

    def __init__(self, policy_or_guard: Policy | Guard, *, otel: bool = True, **fields: Any) -> None:
        guard = as_guard(policy_or_guard, otel=otel)
        judge = guard.policy.defaults.judge
        name = guard.policy.judges[judge].model if judge in guard.policy.judges else "soda-guard"
        super().__init__(guard=guard, **{"model": name, **fields})

    @property
    def _provider(self) -> str:
        return "soda_guard"

    def _view(self, state: Any, questions: Mapping[str, Question]) -> Trajectory:
        unanswerable = sorted(key for key, question in questions.items() if question.type != "noul")
        if unanswerable:
            raise ValueError(f"soda-guard answers yes/no (Noul) questions about a tool call only, not {unanswerable}")
        if not isinstance(state, Mapping) or not isinstance(state.get("tool_call"), Mapping):
            raise ValueError("soda-guard needs the state AutoModeMiddleware sends: `messages` and the pending `tool_call`")
        raw = state["tool_call"]
        args = raw.get("args")
        call = ToolCall(id=str(raw.get("id") or "call"), name=str(raw.get("name") or ""),
                        args=args if isinstance(args, (dict, str)) else {})
        messages = convert_to_messages(list(state.get("messages") or []))
        trajectory = to_trajectory(messages, conversation_id=thread_id(), harm=self.harm, environment=self.environment)
        if len(messages) >= AUTO_MODE_WINDOW:
            trajectory = trajectory.model_copy(update={"truncated": True})
        return with_calls(trajectory, [call])

    def _response(self, decision: Decision, questions: Mapping[str, Question]) -> ClassifierResponse:
        if decision.verdict is not None and decision.verdict.failed and not decision.allowed:
            raise JudgmentFailed(decision)
        probability = risk(decision)
        return ClassifierResponse(
            model=self.model,
            answers={key: NoulAnswer(type="noul", noul=probability) for key in questions},
            request_id=decision.decision_id,
        )

    def _classify(self, state: Any, questions: dict[str, Question]) -> ClassifierResponse:
        [decision] = self.guard.check_tool_calls(self._view(state, questions), carry_out=as_automode)
        return self._response(decision, questions)

    async def _aclassify(self, state: Any, questions: dict[str, Question]) -> ClassifierResponse:
        [decision] = await self.guard.acheck_tool_calls(self._view(state, questions), carry_out=as_automode)
        return self._response(decision, questions)


def as_automode(decision: Decision) -> Decision:
    """The decision as AutoMode carries it out: it runs the call or blocks it, nothing else."""
    return unasked(decision, "the policy says escalate, which AutoMode cannot do (it asks no person), so AutoMode blocked the call")


def risk(decision: Decision) -> float:
    """The probability AutoMode is told: the judge's, where it lies on the side of the 0.5 cut
    that makes AutoMode do what the guard decided, else the nearest value on that side."""
    verdict = decision.verdict
    score = verdict.score if verdict is not None and verdict.score is not None else None
    if decision.allowed:
        return min(score, _BELOW_CUT) if score is not None else 0.0
    return max(score, CUT) if score is not None else 1.0
