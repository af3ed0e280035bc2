"""The enforcement record of one tool call: what was judged, what a person answered, and
what therefore happens to the call.

Typed end to end; adapters serialise it only where a framework needs JSON (graph state,
interrupt payloads). A record is bound (`CallBinding`) to the exact call it judged and is
used for no other.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from soda_guard.binding import CallBinding, args_digest
from soda_guard.converters import model_json
from soda_guard.seal import RECORD_KEY, RecordSeal
from soda_guard.trajectory import ToolCall
from soda_guard.verdict import Action, Decision, Review, Verdict

Outcome = Literal["run", "refuse", "respond"]

_KEPT = {"label", "score", "judge", "kind", "model", "parse_failure", "error", "truncated"}
_LEAN_DECISION: dict[str, Any] = {
    "tool_call": True,
    "conversation_id": True,
    "verdict": {name for name in Verdict.model_fields if name not in _KEPT},
}
_LEAN = {"binding": True, "decision": _LEAN_DECISION, "edit_decision": _LEAN_DECISION}
"""What a state record leaves out, besides every None (`exclude_defaults` would call each
default factory per record to compare): what its turn says already (the binding's thread and
turn, the decisions' conversation, the call), and all of each verdict but what enforcement and
the message summary read."""
_LEAN_ALLOWED = {**_LEAN, "decision": {"tool_call": True, "conversation_id": True, "verdict": True}}
"""A simply allowed call's record (`CallRecord.simply_allowed`) leaves out its verdict too:
enforcement reads only that it runs, and the message summary only the decision's id."""
_UNREAD = {"raw_output", "stages", "latency_ms", "prompt_tokens", "generated_tokens", "harm", "harm_source", "environment", "environment_source"}
_TASK_LEAN = {"decision": {"verdict": _UNREAD}, "edit_decision": {"verdict": _UNREAD}, "result_decision": {"verdict": _UNREAD}}
"""What a task result leaves out: the parts of each verdict a resumed node never reads."""


class CallRecord(BaseModel):
    """`outcome` is None while an escalation waits for its reviewer. `run_args` are the
    reviewer's edited arguments (judged again: `edit_decision`); `message` is the refusal
    told to the model, or the reviewer's answer given in the tool's place (respond)."""

    # an argument's Infinity or NaN read back as itself, not as null (which names another call)
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    binding: CallBinding
    call: ToolCall
    decision: Decision
    review: Review | None = None
    edit_decision: Decision | None = None
    outcome: Outcome | None = None
    run_args: dict[str, Any] | str | None = None
    message: str | None = None
    result_decision: Decision | None = None

    @classmethod
    def judged(cls, binding: CallBinding, call: ToolCall, decision: Decision) -> CallRecord:
        if decision.action.runs_tool:
            return cls(binding=binding, call=call, decision=decision, outcome="run")
        if decision.action is Action.BLOCK:
            return cls(binding=binding, call=call, decision=decision, outcome="refuse", message=decision.why)
        return cls(binding=binding, call=call, decision=decision)

    @property
    def awaiting_review(self) -> bool:
        return self.outcome is None

    @property
    def simply_allowed(self) -> bool:
        """Allowed by the judge and run as asked, with nothing else to tell: the common case."""
        return self.decision.action is Action.ALLOW and self.outcome == "run" and self.review is None and self.result_decision is None

    def binds(self, binding: CallBinding) -> bool:
        """The call as the model asked for it, or as the reviewer edited it (a graph that
        sends the edited call on to the tools)."""
        if binding == self.binding:
            return True
        return self.run_args is not None and binding == self.binding.model_copy(update={"args_digest": args_digest(self.run_args)})

    def ran_call(self) -> ToolCall:
        """The call that runs: the model's, or the reviewer's edit of it."""
        return self.call if self.run_args is None else self.call.model_copy(update={"args": self.run_args})

    def reviewed(self, review: Review, edit_decision: Decision | None = None) -> CallRecord:
        """Fold the answer in. An edit the judge blocks is refused; one it still escalates
        runs, since the person has reviewed exactly those arguments (unless the rule it
        escalates under lets no answer run it: `review_records`)."""
        update: dict[str, Any] = {"review": review}
        if review.type == "approve":
            update["outcome"] = "run"
        elif review.type == "reject":
            update.update(outcome="refuse", message=f"a reviewer rejected it: {review.message or 'no reason given'}")
        elif review.type == "respond":
            update.update(outcome="respond", message=review.message or "")
        else:
            if edit_decision is None:
                raise ValueError("an edit must be judged before it is applied")
            update["edit_decision"] = edit_decision
            if edit_decision.action is Action.BLOCK:
                update.update(outcome="refuse", message=f"the reviewer's edit was judged too: {edit_decision.why}")
            else:
                update.update(outcome="run", run_args=review.args)
        return self.model_copy(update=update)

    def summary(self) -> dict[str, Any]:
        """What a ToolMessage carries (`response_metadata["soda_guard"]`) where the guard did
        more than allow the call: the decision's id, action, label and score, why the call did
        not run, and the review (a simply allowed call's message carries nothing: `_stamped`).
        Checkpointers store every message again at every step, so this stays a few dozen
        bytes; the full record (the verdict's reason, raw judge output, prompt sizes) is in
        the audit sinks and the trace, found by `decision_id`."""
        out: dict[str, Any] = {"decision_id": self.decision.decision_id, "action": self.decision.action.value}
        if self.simply_allowed:
            return out
        verdict = self.decision.verdict
        if verdict is not None and verdict.label is not None:
            out["label"] = verdict.label.value
        if verdict is not None and verdict.score is not None:
            out["score"] = round(verdict.score, 4)
        if self.decision.rule != "defaults":
            out["rule"] = self.decision.rule
        if self.outcome != "run":
            out["why"] = self.message or self.decision.why
        if self.review is not None:
            out["review"] = self.review.type
            out["outcome"] = self.outcome
        for name, decision in (("edit_decision", self.edit_decision), ("result_decision", self.result_decision)):
            if decision is not None:
                out[name] = {"decision_id": decision.decision_id, "action": decision.action.value, "why": decision.why}
        return out


class TurnRecords(BaseModel):
    """The records of one model turn: all that enforcing that turn needs, and no more (the
    graph state holds one of these, replaced when the next turn is judged)."""

    model_config = ConfigDict(extra="forbid")

    thread_id: str | None
    turn_id: str
    records: list[CallRecord]
    replay: str | None = None
    """The time-travel replay these records were made in (the checkpoint it started from),
    None outside one: a replay trusts only records it made itself (`for_replay`)."""
    closed: bool = False
    """Set once a later model turn came without pending calls: these calls have all been
    answered, and the records are kept only to be read. Enforcement never uses them again
    (a call made pending again by removing its result is judged and asked about again)."""

    def _header(self) -> str:
        return json.dumps([self.thread_id, self.turn_id, self.replay, self.closed])

    def for_state(self, seal: RecordSeal) -> dict[str, Any]:
        """JSON for the graph state, with only what enforcing the turn reads: the graph stores
        its state again at every step, and the full decisions (the judge's reason and raw
        output, timings, sources) are in the audit sinks and the trace. Each record is signed
        (`seal`): the state is writable by others, and only the guard's records are used."""
        raw: dict[str, Any] = {"thread_id": self.thread_id, "turn_id": self.turn_id}
        if self.replay is not None:
            raw["replay"] = self.replay
        if self.closed:
            raw["closed"] = True
        header = self._header()
        raw["records"] = [
            seal.sign(model_json(record, exclude=_LEAN_ALLOWED if record.simply_allowed else _LEAN, exclude_none=True), header)
            for record in self.records
        ]
        seal.remember(raw, self)
        return raw

    def for_task(self) -> dict[str, Any]:
        """JSON for a LangGraph task's result (kept by the checkpointer until the turn ends):
        what a resumed node reads from it, the reviewer's view included (the judge's reason),
        without the judge's raw output, timings and sources, which the audit sinks hold."""
        return self.model_dump(mode="json", exclude={"records": {"__all__": _TASK_LEAN}})

    @classmethod
    def from_state(cls, raw: Any, seal: RecordSeal) -> TurnRecords | None:
        """The records of `raw` (as `for_state` wrote them) whose MAC verifies; records that do
        not verify are dropped, so their calls are judged again. None when `raw` is not a turn's
        records at all."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("records", []), list):
            return None
        signed = seal.recall(raw)
        if isinstance(signed, TurnRecords):
            return signed
        try:
            turn = cls.model_validate({**raw, "records": []})
        except ValueError:
            return None
        header = turn._header()
        return turn._with([record for record in (seal.verified(r, header) for r in raw.get("records", [])) if record is not None])

    @classmethod
    def read(cls, raw: Any) -> TurnRecords | None:
        """The records of `raw` (graph state's `soda_guard` key) as stored, without checking
        their MACs: for showing them. Enforcement uses only records that verify (`from_state`)."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("records", []), list):
            return None
        try:
            turn = cls.model_validate({**raw, "records": []})
        except ValueError:
            return None
        stored = [r.get(RECORD_KEY) for r in raw.get("records", []) if isinstance(r, Mapping)]
        return turn._with([r for r in stored if isinstance(r, str)])

    def _with(self, texts: list[str]) -> TurnRecords | None:
        """This turn's header with the records stored as `texts`; None when one cannot be read."""
        try:
            return self.model_copy(update={"records": [_parsed(text, self.thread_id, self.turn_id) for text in texts]})
        except ValueError:
            return None

    def for_replay(self, replay: str | None) -> TurnRecords | None:
        """These records as a run that is (`replay`, the checkpoint it started from) or is not
        (None) a time-travel replay may use them: a replay re-runs steps that already ran, and
        the records it finds in the forked state were made for the first run, so it uses only
        records it made itself and judges (and asks) again otherwise."""
        return self if replay is None or self.replay == replay else None

    def close(self) -> TurnRecords:
        return self.model_copy(update={"closed": True})

    def find(self, binding: CallBinding) -> CallRecord | None:
        return next((record for record in self.records if record.binds(binding)), None)

    def replace(self, record: CallRecord) -> TurnRecords:
        return self.model_copy(update={"records": [record if r.binding == record.binding else r for r in self.records]})


@functools.lru_cache(maxsize=4096)
def _parsed(stored: str, thread_id: str | None, turn_id: str) -> CallRecord:
    """A record's JSON as its turn stored it, parsed once: every call of a turn, and the next
    model turn, read the same records again. What the turn says (thread, turn) is put back:
    the MAC covers it with the text. Records are never changed in place (`model_copy` makes
    each new one), so one parse may serve every reader."""
    try:
        raw = json.loads(stored)
    except RecursionError:
        raise ValueError("a stored record nested too deeply") from None
    call = raw.get("call") if isinstance(raw, dict) else None
    if not isinstance(call, dict):
        raise ValueError("a stored record without its call")
    binding = CallBinding.of(
        thread_id=thread_id, turn_id=turn_id, call_id=call.get("id"), tool=call.get("name"), args=call.get("args", {})
    )
    for name in ("decision", "edit_decision"):
        decision = raw.get(name)
        if isinstance(decision, dict):
            decision["conversation_id"] = thread_id
            if isinstance(decision.get("verdict"), dict):
                decision["verdict"].setdefault("label", None)  # the one field that is both required and nullable
    return CallRecord.model_validate({**raw, "binding": binding})
