"""soda-guard's judges as a LangChain decision model, for `AutoModeMiddleware` (langchain 1.5).

    AutoModeMiddleware(tools=[...], classifier=SodaGuardDecisionModel(policy))

AutoMode asks one `Noul` question per guarded call ("is this call risky?") and blocks at 0.5.
The answer is the judge's own probability: the SODA judge's P(UNSAFE) at its verdict, and
Qwen3Guard's probability of Unsafe or Controversial (Controversial counts as risky unless the
policy lets Controversial calls run, in which case the answer follows the label). The call is
judged exactly as the middleware judges it (same trajectory, rendering, batching, audit
record); `request_id` of the response is the decision's id in the audit log. The question's
instructions and criteria are not read: the judges answer in their trained formats.

Needs `langchain_core.decisions` (langchain-core 1.8 or later).
"""

from __future__ import annotations

from typing import Any, Mapping

from langchain_core.decisions import BaseDecisionModel, ClassifierResponse, NoulAnswer, Question
from pydantic import ConfigDict, Field

from soda_guard.guard import Guard
from soda_guard.policy import Policy
from soda_guard.trajectory import ToolCall
from soda_guard.verdict import Decision, Label

from soda_guard.integrations._convert import to_trajectory, with_calls
from soda_guard.integrations._enforce import as_guard, thread_id

__all__ = ["SodaGuardDecisionModel"]


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

    def _view(self, state: Any, questions: Mapping[str, Question]) -> Any:
        unanswerable = sorted(key for key, question in questions.items() if question.type != "noul")
        if unanswerable:
            raise ValueError(f"soda-guard answers yes/no (Noul) questions about a tool call only, not {unanswerable}")
        if not isinstance(state, Mapping) or not isinstance(state.get("tool_call"), Mapping):
            raise ValueError("soda-guard needs the state AutoModeMiddleware sends: `messages` and the pending `tool_call`")
        raw = state["tool_call"]
        args = raw.get("args")
        call = ToolCall(id=str(raw.get("id") or "call"), name=str(raw.get("name") or ""),
                        args=args if isinstance(args, (dict, str)) else {})
        trajectory = to_trajectory(
            list(state.get("messages") or []), conversation_id=thread_id(), harm=self.harm, environment=self.environment
        )
        return with_calls(trajectory, [call])

    def _response(self, decision: Decision, questions: Mapping[str, Question]) -> ClassifierResponse:
        probability = risk(decision, self.guard.policy)
        return ClassifierResponse(
            model=self.model,
            answers={key: NoulAnswer(type="noul", noul=probability) for key in questions},
            request_id=decision.decision_id,
        )

    def _classify(self, state: Any, questions: dict[str, Question]) -> ClassifierResponse:
        [decision] = self.guard.check_tool_calls(self._view(state, questions))
        return self._response(decision, questions)

    async def _aclassify(self, state: Any, questions: dict[str, Question]) -> ClassifierResponse:
        [decision] = await self.guard.acheck_tool_calls(self._view(state, questions))
        return self._response(decision, questions)


def risk(decision: Decision, policy: Policy) -> float:
    """The probability that the call is harmful, as the judge gave it. A call the policy
    decides without judging, and a judgment that failed, answer with the action's side: 1.0
    where the tool would not run, 0.0 where it would."""
    verdict = decision.verdict
    if verdict is None or verdict.label is None:
        return 0.0 if decision.action.runs_tool else 1.0
    rule = policy.rule_for(decision.tool_call.name if decision.tool_call else "")[1]
    controversial_runs = policy.outcome(rule, "on_controversial").runs_tool
    if verdict.label is Label.CONTROVERSIAL and controversial_runs:
        return 0.0
    if verdict.score is not None and not (verdict.kind == "qwen3guard" and controversial_runs):
        return min(1.0, max(0.0, verdict.score))
    return 0.0 if verdict.label is Label.SAFE else 1.0
