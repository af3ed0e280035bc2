"""Human review in LangChain's own protocol (`HumanInTheLoopMiddleware`'s types), so UIs built
for it (Agent Chat UI, LangSmith Studio, Agent Inbox) show and answer soda-guard's escalations.

`review.interrupt_mode: batched` (the default) asks one `HITLRequest` per question, one
`ActionRequest` and one `ReviewConfig` per escalated call (UIs pair them by index), answered
with an `HITLResponse` (`{"decisions": [...]}`, one per action request, in order); a bare
decision is refused, not spread over every call. `per_call` asks one `ToolApprovalRequest` per
escalated call, answered with one decision. What a reviewer may answer, and the description
shown, come from the policy rule of the call's tool.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Generator, Mapping, Sequence

from langchain.agents.middleware.human_in_the_loop import ActionRequest, HITLRequest, ReviewConfig
from langgraph.types import interrupt
from typing_extensions import Literal, TypedDict

from soda_guard.policy import Policy
from soda_guard.records import CallRecord
from soda_guard.review import REVIEW_TYPES
from soda_guard.verdict import Action, Decision, Review, ReviewType

try:
    from langchain.agents.middleware.human_in_the_loop import ToolApprovalRequest
except ImportError:  # langchain < 1.5 has no `per_call` mode; the same request, for its UIs

    class ToolApprovalRequest(TypedDict):  # type: ignore[no-redef]
        type: Literal["tool_approval"]
        tool_call_id: str
        name: str
        args: dict[str, Any]
        description: str


REQUEST_KEY = "soda_guard"


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def allowed_decisions(record: CallRecord, policy: Policy) -> list[ReviewType]:
    return rule_decisions(record.decision.rule, policy)


def rule_decisions(rule_name: str, policy: Policy) -> list[ReviewType]:
    """The answers a reviewer may give to an escalation under the rule `rule_name`."""
    rule = policy.rule_named(rule_name)
    return list(rule.allowed_decisions if rule is not None and rule.allowed_decisions else REVIEW_TYPES)


def _description(record: CallRecord, policy: Policy) -> str:
    rule = policy.rule_named(record.decision.rule)
    if rule is not None and rule.description is not None:
        return rule.description
    verdict = record.decision.verdict
    score = f" (score {verdict.score:.3f})" if verdict is not None and verdict.score is not None else ""
    return f"soda-guard needs a reviewer for `{record.call.name}`: {record.decision.why}{score}"


def _args(record: CallRecord) -> dict[str, Any]:
    return record.call.args if isinstance(record.call.args, dict) else {"input": record.call.args}


def _guard_view(records: Sequence[CallRecord], turn: Sequence[CallRecord]) -> dict[str, Any]:
    """soda-guard's view of each call to review (`calls`) and what was decided for every call
    of the turn (`turn`), since an approval lets the turn's other allowed calls run too."""
    calls = []
    for record in records:
        decision = record.decision
        verdict = decision.verdict
        calls.append(
            {
                "tool_call_id": record.call.id,
                "decision_id": decision.decision_id,
                "action": decision.action.value,
                "rule": decision.rule,
                "why": decision.why,
                "label": verdict.label.value if verdict is not None and verdict.label is not None else None,
                "score": verdict.score if verdict is not None else None,
                "reason": verdict.reason if verdict is not None else None,
            }
        )
    context = [
        {"tool_call_id": r.call.id, "name": r.call.name, "args": r.call.args, "action": r.decision.action.value, "why": r.decision.why}
        for r in (turn or records)
    ]
    return {"calls": calls, "turn": context}


def review_request(records: Sequence[CallRecord], policy: Policy, turn: Sequence[CallRecord] = ()) -> dict[str, Any]:
    """An `HITLRequest` plus, under the `soda_guard` key, soda-guard's view (`_guard_view`)."""
    request = HITLRequest(
        action_requests=[
            ActionRequest(name=r.call.name, args=_args(r), description=_description(r, policy)) for r in records
        ],
        review_configs=[ReviewConfig(action_name=r.call.name, allowed_decisions=allowed_decisions(r, policy)) for r in records],
    )
    return _json({**request, REQUEST_KEY: _guard_view(records, turn)})


def approval_request(record: CallRecord, policy: Policy, turn: Sequence[CallRecord] = ()) -> dict[str, Any]:
    """A `ToolApprovalRequest` (LangChain's `per_call` mode) plus soda-guard's view."""
    request = ToolApprovalRequest(
        type="tool_approval",
        tool_call_id=record.call.id,
        name=record.call.name,
        args=_args(record),
        description=_description(record, policy),
    )
    return _json({**request, REQUEST_KEY: _guard_view([record], turn)})


def _review(answer: Any, record: CallRecord, allowed: Sequence[ReviewType]) -> Review:
    if not isinstance(answer, Mapping) or answer.get("type") not in REVIEW_TYPES:
        raise ValueError(f"a review decision must be a dict with type in {list(REVIEW_TYPES)}, got {answer!r}")
    kind = answer["type"]
    if kind not in allowed:
        raise ValueError(f"decision type {kind!r} is not allowed for `{record.call.name}` (allowed: {list(allowed)})")
    answers = record.decision.decision_id
    # a decision that names what it answers (the ids the question published) must answer this
    # call: a resent answer would otherwise land on the next question, one out of order on
    # another call (bare decisions go by their place, as LangChain's HITL answers do)
    for field, asked in (("decision_id", answers), ("tool_call_id", record.call.id)):
        if field in answer and answer[field] != asked:
            raise ValueError(f"this decision names {field} {answer[field]!r}, but the question at its place is about {asked!r} (`{record.call.name}`)")
    if kind == "approve":
        return Review(type="approve", answers=answers)
    if kind == "reject":
        return Review(type="reject", answers=answers, message=_text(answer.get("message")))
    if kind == "respond":
        message = answer.get("message")
        if not isinstance(message, str):
            raise ValueError(f"a respond decision needs a `message` string, got {answer!r}")
        return Review(type="respond", answers=answers, message=message)
    return Review(type="edit", answers=answers, args=_json(dict(_edited_args(answer, record))))


def _edited_args(answer: Mapping[str, Any], record: CallRecord) -> Mapping[str, Any]:
    """An edit's arguments: `edited_action` (LangChain's shape, its tool name checked) or
    `args` (soda-guard's older shape); both only when they say the same."""
    args = answer.get("args")
    edited = answer.get("edited_action")
    if edited is not None:
        if not isinstance(edited, Mapping):
            raise ValueError(f"`edited_action` must be an object with `name` and `args`, got {edited!r}")
        if edited.get("name") != record.call.name:
            raise ValueError(f"an edit cannot change the tool: `{record.call.name}` was reviewed, not {edited.get('name')!r}")
        if args is not None and args != edited.get("args"):
            raise ValueError("an edit carries `args` and `edited_action.args` that differ: send one")
        args = edited.get("args")
    if not isinstance(args, Mapping):
        raise ValueError(f"an edit decision needs `edited_action.args` (or `args`) as an object, got {answer!r}")
    return args


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_answer(answer: Any, records: Sequence[CallRecord], policy: Policy) -> list[Review]:
    """One `Review` per record, or a ValueError that says what was wrong with the answer: the
    answer's shape is the one the question was asked in (`review.interrupt_mode`)."""
    allowed = [allowed_decisions(record, policy) for record in records]
    if policy.review.interrupt_mode == "per_call":
        if isinstance(answer, Mapping) and "decisions" in answer:
            raise ValueError("this question is about one call: answer with one decision, not `decisions`")
        return [_review(answer, records[0], allowed[0])]
    if not isinstance(answer, Mapping) or "decisions" not in answer:
        raise ValueError(
            f"answer with an HITLResponse, {{\"decisions\": [...]}}, one decision per action request "
            f"({len(records)} here), not {answer!r}"
        )
    extra = sorted(str(key) for key in answer if key != "decisions")
    if extra:  # `{"decisions": [approve], "type": "reject"}` says two things: neither is taken
        raise ValueError(f"an HITLResponse holds `decisions` only; it also held {extra}, which would be ignored")
    decisions = answer["decisions"]
    if not isinstance(decisions, list) or len(decisions) != len(records):
        count = len(decisions) if isinstance(decisions, list) else type(decisions).__name__
        raise ValueError(f"the review asked about {len(records)} call(s) but {count} decision(s) came back")
    return [_review(decision, record, kinds) for decision, record, kinds in zip(decisions, records, allowed)]


@dataclass(frozen=True)
class Asked:
    """Record, durably (a LangGraph task), that a question about these calls is being asked;
    sent back is what was recorded the first time this question was asked in this node."""

    digest: str
    nonce: str


@dataclass(frozen=True)
class Ruled:
    """Record, durably (a LangGraph task), what became of the answer to one interrupt: used
    (`refusal` None) or refused with that reason; sent back is the ruling recorded the first
    time, so a node that re-runs rules on each answer as it did when the answer arrived."""

    nonce: str
    refusal: str | None


@dataclass(frozen=True)
class Refused:
    """A refused answer, for the audit sinks and the trace (`refused_event`)."""

    events: list[Decision]


def question_digest(records: Sequence[CallRecord]) -> str:
    bindings = "|".join(record.binding.model_dump_json() for record in records)
    return hashlib.sha256(bindings.encode()).hexdigest()


def refused_event(record: CallRecord, answer: Any, refusal: str) -> Decision:
    """A refused answer as an audit record (rule `review_refused`): what the reviewer sent,
    and why it was not used, so the trail shows every answer and not only the one acted on."""
    kind = answer.get("type") if isinstance(answer, Mapping) else None
    if isinstance(answer, Mapping) and isinstance(answer.get("decisions"), list) and answer["decisions"]:
        first = answer["decisions"][0]
        kind = first.get("type") if isinstance(first, Mapping) else None
    review = Review(type=kind, answers=record.decision.decision_id, message=refusal) if kind in REVIEW_TYPES else None
    return Decision(
        action=Action.BLOCK,
        rule="review_refused",
        why=f"a reviewer's answer was not used ({refusal}): {json.dumps(_json(answer))[:1000]}",
        tool_call=record.call,
        conversation_id=record.decision.conversation_id,
        review=review,
    )


def ask(
    records: Sequence[CallRecord], policy: Policy, turn: Sequence[CallRecord] = ()
) -> Generator[Asked | Ruled | Refused, Any, list[Review]]:
    """The reviewer's answers for `records`: one question for all of them (`batched`), or
    one per call, in order (`per_call`); no call runs before every question is answered."""
    if policy.review.interrupt_mode == "batched":
        return (yield from _ask(records, review_request(records, policy, turn), policy))
    reviews: list[Review] = []
    for record in records:
        reviews += yield from _ask([record], approval_request(record, policy, turn), policy)
    return reviews


def _ask(
    records: Sequence[CallRecord], payload: dict[str, Any], policy: Policy
) -> Generator[Asked | Ruled | Refused, Any, list[Review]]:
    """Pause for a person, and use only an answer given to this very question. LangGraph hands
    a resume value to whichever interrupt comes next, whatever it asks: after the state was
    changed during a pause the next question may be about other calls, or asked by another
    node that never showed its question. So each question is recorded before it is asked; an
    answer that arrives for a question recorded just now (never shown to anyone) or recorded
    about other calls is not used, and the question is asked again. An unusable answer is not
    guessed at either: the question is asked again with the error.

    The node re-runs from its start on every resume and LangGraph hands each interrupt the
    answer it got the first time; so the ruling on each answer is recorded too, and a
    refused answer stays refused on the re-run instead of answering the question again.
    Each refusal is audited once, when it is made."""
    digest = question_digest(records)
    while True:
        nonce = uuid.uuid4().hex
        recorded = yield Asked(digest, nonce)
        answer = interrupt(payload)
        reviews: list[Review] = []
        refusal = None
        if recorded.nonce == nonce or recorded.digest != digest:
            refusal = "this answer was given to a question about other calls; answer this one"
        else:
            try:
                reviews = parse_answer(answer, records, policy)
            except ValueError as error:
                refusal = str(error)
        ruled = yield Ruled(nonce, refusal)
        if ruled.refusal is None and reviews:
            return reviews
        refusal = ruled.refusal or refusal or "this answer could not be used"
        if ruled.nonce == nonce:
            yield Refused([refused_event(record, answer, refusal) for record in records])
        payload = {**payload, "error": refusal}
