"""The binding of a decision to its call, and the enforcement record's transitions."""

from __future__ import annotations

import json

import pytest

from soda_guard import Action, CallBinding, CallRecord, Decision, Label, Review, ToolCall, TurnRecords, Verdict
from soda_guard.binding import args_digest
from soda_guard.errors import PolicyError
from soda_guard.policy import Policy
from soda_guard.seal import RecordSeal

CALL = ToolCall(id="c1", name="transfer", args={"to": "1", "amount": 5})
SEAL = RecordSeal(b"a test key of 32 bytes, no more.")


def binding(**changes: object) -> CallBinding:
    values = {"thread_id": "t", "turn_id": "m1", "call_id": "c1", "tool": "transfer", "args": CALL.args, **changes}
    return CallBinding.of(**values)  # type: ignore[arg-type]


def decision(action: Action, raw: str = "[Reason] r\n[Verdict] UNSAFE") -> Decision:
    verdict = Verdict(label=Label.UNSAFE, score=0.91, judge="soda", kind="soda", model="m", raw_output=raw)
    return Decision(action=action, rule="defaults", why="soda said unsafe", tool_call=CALL, verdict=verdict)


def test_the_argument_digest_ignores_key_order_and_nothing_else() -> None:
    assert args_digest({"a": 1, "b": [1, 2]}) == args_digest({"b": [1, 2], "a": 1})
    assert args_digest({"a": 1}) != args_digest({"a": 1.5})
    assert args_digest({"a": 1}) != args_digest({"a": "1"})
    assert args_digest('{"a": 1}') != args_digest({"a": 1})  # raw text is not the object it spells


def test_a_digest_looked_up_again_is_the_digest_of_those_very_arguments() -> None:
    """Small arguments' digests are remembered by their marshal bytes: a value that only
    compares equal to one already remembered (`1`, `True`, `1.0`; a tuple for a list) gets its
    own digest, in either order, and what is remembered is what the canonical hash gives."""
    from soda_guard import binding as module

    module._DIGESTS.clear()
    for group in ([{"n": 1}, {"n": True}, {"n": 1.0}], [{"n": [1, "a"]}, {"n": (1, "a")}], [{"b": 1, "a": {"x": 0}}, {"a": {"x": 0}, "b": 1}]):
        for order in (group, group[::-1]):
            module._DIGESTS.clear()
            seen = [args_digest(args) for args in order for _ in range(2)]
            assert seen == [module._object_digest(args) for args in order for _ in range(2)]
    assert args_digest({"n": 1}) != args_digest({"n": True}) != args_digest({"n": 1.0})
    assert args_digest({"b": 1, "a": 2}) == args_digest({"a": 2, "b": 1})


def test_large_or_unmarshalable_arguments_are_digested_without_being_remembered() -> None:
    from soda_guard import binding as module

    class Args(dict):  # a subclass marshal does not write
        pass

    module._DIGESTS.clear()
    large = {"text": "x" * 4096}
    assert args_digest(large) == module._object_digest(large)
    assert args_digest(Args(a=1)) == module._object_digest({"a": 1})
    assert args_digest({"at": object}) == module._object_digest({"at": object})
    assert module._DIGESTS == {}


@pytest.mark.parametrize("field", ["thread_id", "turn_id", "call_id", "tool", "args"])
def test_a_binding_differs_when_any_part_differs(field: str) -> None:
    other = {"thread_id": "u", "turn_id": "m2", "call_id": "c2", "tool": "read", "args": {"to": "999", "amount": 5}}[field]
    assert binding(**{field: other}) != binding()


def test_outcomes_from_decisions_and_reviews() -> None:
    assert CallRecord.judged(binding(), CALL, decision(Action.ALLOW)).outcome == "run"
    assert CallRecord.judged(binding(), CALL, decision(Action.LOG)).outcome == "run"
    blocked = CallRecord.judged(binding(), CALL, decision(Action.BLOCK))
    assert blocked.outcome == "refuse" and blocked.message == "soda said unsafe"
    waiting = CallRecord.judged(binding(), CALL, decision(Action.ESCALATE))
    assert waiting.awaiting_review
    answers = waiting.decision.decision_id
    assert waiting.reviewed(Review(type="approve", answers=answers)).outcome == "run"
    assert "no" in (waiting.reviewed(Review(type="reject", answers=answers, message="no")).message or "")
    responded = waiting.reviewed(Review(type="respond", answers=answers, message="done by hand"))
    assert (responded.outcome, responded.message) == ("respond", "done by hand")
    with pytest.raises(ValueError):
        waiting.reviewed(Review(type="edit", answers=answers, args={"to": "2"}))
    edit = Review(type="edit", answers=answers, args={"to": "2", "amount": 1})
    refused = waiting.reviewed(edit, decision(Action.BLOCK))
    assert refused.outcome == "refuse" and "edit was judged" in (refused.message or "")
    edited = waiting.reviewed(edit, decision(Action.ESCALATE))
    assert edited.outcome == "run" and edited.ran_call().args == {"to": "2", "amount": 1}


def test_an_edited_record_binds_the_call_as_asked_and_as_edited_only() -> None:
    waiting = CallRecord.judged(binding(), CALL, decision(Action.ESCALATE))
    edited = waiting.reviewed(Review(type="edit", answers="x", args={"to": "2"}), decision(Action.ALLOW))
    turn = TurnRecords(thread_id="t", turn_id="m1", records=[edited])
    assert turn.find(binding()) is not None
    assert turn.find(binding(args={"to": "2"})) is not None
    assert turn.find(binding(args={"to": "3"})) is None
    assert TurnRecords(thread_id="t", turn_id="m1", records=[waiting]).find(binding(args={"to": "2"})) is None


def test_the_state_form_drops_the_raw_output_and_reads_back() -> None:
    """Only what enforcement and the message summary read: a simply allowed call keeps no
    verdict at all, a logged or blocked one its label and score."""
    allowed = CallRecord.judged(binding(), CALL, decision(Action.ALLOW, raw="x" * 5000))
    logged = CallRecord.judged(binding(args={"to": "2"}), CALL, decision(Action.LOG, raw="x" * 5000))
    state = TurnRecords(thread_id="t", turn_id="m1", records=[allowed, logged]).for_state(SEAL)
    assert "x" * 100 not in json.dumps(state)
    back = TurnRecords.from_state(json.loads(json.dumps(state)), SEAL)
    assert back is not None and back.find(binding()) is not None
    assert [r.summary() for r in back.records] == [allowed.summary(), logged.summary()]
    assert back.records[0].decision.verdict is None and back.records[1].decision.verdict.score == 0.91
    assert len(state["records"][0]["record"]) < len(state["records"][1]["record"]) - 50


def test_a_state_record_changed_or_signed_with_another_key_is_dropped() -> None:
    allowed = CallRecord.judged(binding(), CALL, decision(Action.ALLOW))
    blocked = CallRecord.judged(binding(args={"to": "2"}), CALL, decision(Action.BLOCK))
    state = TurnRecords(thread_id="t", turn_id="m1", records=[allowed, blocked]).for_state(SEAL)
    state["records"][1]["record"] = state["records"][1]["record"].replace('"refuse"', '"run"')
    assert '"run"' in state["records"][1]["record"]
    back = TurnRecords.from_state(state, SEAL)
    assert back is not None and [r.binding for r in back.records] == [allowed.binding]
    other = TurnRecords.from_state(state, RecordSeal(b"another key, 32 bytes long......"))
    assert other is not None and other.records == []


def test_the_state_key_comes_from_the_policy_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    state = TurnRecords(thread_id="t", turn_id="m1", records=[CallRecord.judged(binding(), CALL, decision(Action.ALLOW))])
    monkeypatch.setenv("SODA_GUARD_STATE_KEY", "e" * 32)
    assert TurnRecords.from_state(state.for_state(RecordSeal.for_policy(Policy())), RecordSeal(b"e" * 32)).records
    monkeypatch.delenv("SODA_GUARD_STATE_KEY")
    monkeypatch.setenv("MY_KEY", "k" * 32)
    from_env = RecordSeal.for_policy(Policy.from_dict({"records": {"key_env": "MY_KEY"}}))
    assert TurnRecords.from_state(state.for_state(from_env), RecordSeal(b"k" * 32)).records
    from_policy = RecordSeal.for_policy(Policy.from_dict({"records": {"key": "p" * 16, "key_env": "MY_KEY"}}))
    assert TurnRecords.from_state(state.for_state(from_policy), RecordSeal(b"p" * 16)).records
    unset = RecordSeal.for_policy(Policy.from_dict({"records": {"key_env": "NO_SUCH_KEY_VAR"}}))
    assert TurnRecords.from_state(state.for_state(unset), RecordSeal.for_policy(Policy())).records
    assert not TurnRecords.from_state(state.for_state(unset), RecordSeal(b"k" * 32)).records
    with pytest.raises(PolicyError):
        Policy.from_dict({"records": {"key": "short"}})


def test_the_message_summary_is_small_and_says_why_a_call_did_not_run() -> None:
    summary = CallRecord.judged(binding(), CALL, decision(Action.BLOCK, raw="x" * 5000)).summary()
    assert summary["action"] == "block" and summary["why"] == "soda said unsafe" and summary["score"] == 0.91
    assert len(json.dumps(summary)) < 200
    allowed = CallRecord.judged(binding(), CALL, decision(Action.ALLOW))
    assert allowed.summary() == {"decision_id": allowed.decision.decision_id, "action": "allow"}
    logged = CallRecord.judged(binding(), CALL, decision(Action.LOG)).summary()
    assert logged["action"] == "log" and "score" in logged and "why" not in logged


def test_read_shows_records_signed_with_any_key_which_from_state_drops() -> None:
    """`read` is for showing the state (examples, dashboards), which need not hold the key;
    enforcement reads through `from_state`, which must still refuse another key's records."""
    record = CallRecord.judged(binding(), CALL, decision(Action.BLOCK))
    state = TurnRecords(thread_id="t", turn_id="m1", records=[record]).for_state(RecordSeal(b"another key, 32 bytes long......"))
    shown = TurnRecords.read(json.loads(json.dumps(state)))
    assert shown is not None and (shown.thread_id, shown.turn_id) == ("t", "m1")
    assert [(r.binding, r.outcome, r.decision.action) for r in shown.records] == [(record.binding, "refuse", Action.BLOCK)]
    trusted = TurnRecords.from_state(state, SEAL)
    assert trusted is not None and trusted.records == []


def test_the_mac_is_over_the_stored_text_so_even_an_equivalent_rewrite_is_dropped() -> None:
    record = CallRecord.judged(binding(), CALL, decision(Action.ALLOW))
    state = TurnRecords(thread_id="t", turn_id="m1", records=[record]).for_state(SEAL)
    text = state["records"][0]["record"]
    respaced = json.dumps(json.loads(text), indent=1)
    assert respaced != text and json.loads(respaced) == json.loads(text)
    state["records"][0]["record"] = respaced
    back = TurnRecords.from_state(state, SEAL)
    assert back is not None and back.records == []
    shown = TurnRecords.read(state)
    assert shown is not None and [r.binding for r in shown.records] == [record.binding]


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "records",
        ["a", "list"],
        {1: 2},
        {"turn_id": "m1", "thread_id": "t", "records": "not a list"},
        {"turn_id": "m1", "thread_id": "t", "records": None},
        {"turn_id": 5, "thread_id": "t", "records": []},
        {"turn_id": "m1", "thread_id": "t", "records": [], "unknown": 1},
        {"turn_id": "m1", "thread_id": "t", "records": [{"record": "not json", "mac": "0" * 64}]},
        {"turn_id": "m1", "thread_id": "t", "records": [{"record": "{}", "mac": "0" * 64}]},
        {"turn_id": "m1", "thread_id": "t", "records": [{"record": "null"}]},
        {"turn_id": "m1", "thread_id": "t", "records": [{"record": "[" * 100_000}]},
        {"turn_id": "m1", "thread_id": "t", "records": [{"record": "\ud800"}]},
    ],
)
def test_reading_garbage_gives_none_never_an_exception(raw: object) -> None:
    assert TurnRecords.read(raw) is None
    assert TurnRecords.from_state(raw, SEAL) is None or TurnRecords.from_state(raw, SEAL).records == []


def test_reading_skips_entries_that_hold_no_record_text() -> None:
    record = CallRecord.judged(binding(), CALL, decision(Action.ALLOW))
    state = TurnRecords(thread_id="t", turn_id="m1", records=[record]).for_state(SEAL)
    state["records"] = [1, "text", {"record": 5}, {"mac": "0" * 64}, *state["records"]]
    shown = TurnRecords.read(state)
    assert shown is not None and [r.binding for r in shown.records] == [record.binding]
    trusted = TurnRecords.from_state(state, SEAL)
    assert trusted is not None and [r.binding for r in trusted.records] == [record.binding]
