"""Human review in LangChain's own protocol (`HumanInTheLoopMiddleware`'s `HITLRequest` /
`HITLResponse`), so UIs built for it (Agent Chat UI, LangSmith Studio, Agent Inbox) show and
answer soda-guard's escalations.

One request covers every escalated call of a model turn. Answers accepted: a `HITLResponse`
(`{"decisions": [...]}`, one per action request, in order), or one decision (`{"type":
"approve"}`, HITL's per-call answer, or soda-guard's older single answer), which then applies
to every call of the request (an edit only when the request has one call).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Generator, Mapping, Sequence

from langgraph.types import interrupt

from soda_guard.records import CallRecord
from soda_guard.review import REVIEW_TYPES
from soda_guard.verdict import Action, Decision, Review

REQUEST_KEY = "soda_guard"


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def review_request(records: Sequence[CallRecord], turn: Sequence[CallRecord] = ()) -> dict[str, Any]:
    """An `HITLRequest` plus, under the `soda_guard` key, soda-guard's view of each call to
    review (`calls`) and what was decided for every call of the turn (`turn`), since an
    approval lets the turn's other allowed calls run too."""
    actions, configs, calls = [], [], []
    for record in records:
        decision = record.decision
        verdict = decision.verdict
        score = f" (score {verdict.score:.3f})" if verdict is not None and verdict.score is not None else ""
        args = record.call.args if isinstance(record.call.args, dict) else {"input": record.call.args}
        actions.append(
            {
                "name": record.call.name,
                "args": args,
                "description": f"soda-guard needs a reviewer for `{record.call.name}`: {decision.why}{score}",
            }
        )
        if all(config["action_name"] != record.call.name for config in configs):
            configs.append({"action_name": record.call.name, "allowed_decisions": list(REVIEW_TYPES)})
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
    return _json({"action_requests": actions, "review_configs": configs, REQUEST_KEY: {"calls": calls, "turn": context}})


def _review(answer: Any, record: CallRecord) -> Review:
    if isinstance(answer, str):
        answer = {"type": answer}
    if not isinstance(answer, Mapping) or answer.get("type") not in REVIEW_TYPES:
        raise ValueError(f"a review decision must be a dict with type in {list(REVIEW_TYPES)}, got {answer!r}")
    kind = answer["type"]
    answers = record.decision.decision_id
    if kind == "approve":
        return Review(type="approve", answers=answers)
    if kind == "reject":
        return Review(type="reject", answers=answers, message=_text(answer.get("message")))
    if kind == "respond":
        message = answer.get("message")
        if not isinstance(message, str):
            raise ValueError(f"a respond decision needs a `message` string, got {answer!r}")
        return Review(type="respond", answers=answers, message=message)
    args = answer.get("args")
    edited = answer.get("edited_action")
    if args is None and isinstance(edited, Mapping):
        if edited.get("name", record.call.name) != record.call.name:
            raise ValueError(f"an edit cannot change the tool: `{record.call.name}` was reviewed, not {edited.get('name')!r}")
        args = edited.get("args")
    if not isinstance(args, Mapping):
        raise ValueError(f"an edit decision needs `args` (or `edited_action.args`) as an object, got {answer!r}")
    return Review(type="edit", answers=answers, args=_json(dict(args)))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_answer(answer: Any, records: Sequence[CallRecord]) -> list[Review]:
    """One `Review` per record, or a ValueError that says what was wrong with the answer."""
    if isinstance(answer, Mapping) and "decisions" in answer:
        decisions = answer["decisions"]
        if not isinstance(decisions, list) or len(decisions) != len(records):
            count = len(decisions) if isinstance(decisions, list) else type(decisions).__name__
            raise ValueError(f"the review asked about {len(records)} call(s) but {count} decision(s) came back")
        return [_review(decision, record) for decision, record in zip(decisions, records)]
    if isinstance(answer, Mapping) and answer.get("type") == "edit" and len(records) > 1:
        raise ValueError(f"one edit cannot answer {len(records)} calls: answer with `decisions`, one per call")
    return [_review(answer, record) for record in records]


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
    records: Sequence[CallRecord], turn: Sequence[CallRecord] = ()
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
    payload = review_request(records, turn)
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
                reviews = parse_answer(answer, records)
            except ValueError as error:
                refusal = str(error)
        ruled = yield Ruled(nonce, refusal)
        if ruled.refusal is None and reviews:
            return reviews
        refusal = ruled.refusal or refusal or "this answer could not be used"
        if ruled.nonce == nonce:
            yield Refused([refused_event(record, answer, refusal) for record in records])
        payload = {**payload, "error": refusal}
