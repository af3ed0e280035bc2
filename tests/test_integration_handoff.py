"""A turn whose calls were all simply allowed goes from the middleware's model step to its tool
step in memory (`TurnHandoff`), not through graph state. An attacker's ways around it: make
a call pending again after it ran, reach the record from another thread, or from a replay;
and what must still hold: the turn is judged once, a block is still stored."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage, RemoveMessage, ToolMessage

from soda_guard import Action, CallRecord, Decision, Guard, Policy, ScriptedBackend, ToolCall, TurnRecords
from soda_guard.backends.scripted import soda_reply
from soda_guard.binding import CallBinding
from soda_guard.integrations._handoff import TurnHandoff, key_of

from integration_helpers import make_guard
from test_integration_binding import DELETE, READ, config, middleware_agent, turn

PATHS = ["middleware", "middleware-async"]
USER = {"messages": [{"role": "user", "content": "Tidy up."}]}


def safe_then_unsafe() -> tuple[Guard, ScriptedBackend]:
    """A judge that says SAFE once and UNSAFE from then on: a call that runs after a second
    judgment is blocked, so whether it was judged again shows in what ran."""
    backend = ScriptedBackend([soda_reply(False), soda_reply(True)])
    policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}})
    return Guard(policy, backends={"soda": backend}), backend


async def drive(path: str, graph: Any, value: Any, thread: str = "t", **kwargs: Any) -> Any:
    if path.endswith("async"):
        return await graph.ainvoke(value, config(thread), **kwargs)
    return graph.invoke(value, config(thread), **kwargs)


@pytest.mark.parametrize("path", PATHS)
async def test_a_simply_allowed_turn_is_judged_once_and_writes_no_state(path: str) -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    send = ("send_email", {"to": "a@b.c"})
    result = await drive(path, middleware_agent(guard, [turn(READ, send, ids=["a", "b"]), "done"], ran), USER)
    assert sorted(name for name, _ in ran) == ["read_file", "send_email"]
    assert backend.batches == [2]  # the model step's batch; the tool step judged nothing
    assert "soda_guard" not in result
    assert all("soda_guard" not in m.response_metadata for m in result["messages"] if isinstance(m, ToolMessage))


@pytest.mark.parametrize("path", PATHS)
async def test_a_blocked_call_beside_allowed_ones_keeps_the_turn_in_state(path: str) -> None:
    guard, _ = make_guard()
    ran: list[Any] = []
    result = await drive(path, middleware_agent(guard, [turn(READ, DELETE, ids=["a", "b"]), "done"], ran), USER)
    assert ran == [READ]
    assert len(result["soda_guard"]["records"]) == 2


@pytest.mark.parametrize("path", PATHS)
async def test_a_handed_off_call_made_pending_again_is_judged_again(path: str) -> None:
    """The record is taken when its call runs: removing the result through `update_state`
    makes the call pending again, and it does not run again on the first judgment."""
    guard, backend = safe_then_unsafe()
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(READ, ids=["r"]), "done", "done again"], ran)
    done = await drive(path, agent, USER)
    assert ran == [READ] and len(backend.requests) == 1
    result = next(m for m in done["messages"] if isinstance(m, ToolMessage))
    agent.update_state(config(), {"messages": [RemoveMessage(id=result.id), RemoveMessage(id=done["messages"][-1].id)]}, as_node="model")
    again = await drive(path, agent, None)
    assert ran == [READ] and len(backend.requests) == 2
    refused = next(m for m in again["messages"] if isinstance(m, ToolMessage))
    assert refused.status == "error" and refused.response_metadata["soda_guard"]["action"] == "block"


@pytest.mark.parametrize("path", PATHS)
async def test_another_thread_cannot_run_on_a_handed_off_record(path: str) -> None:
    """Thread A's turn is judged and handed off, then paused before its tools; thread B is
    given the very same turn (same message id, call id, tool and arguments) through
    `update_state`. B's call is judged for B; A's record still runs A's call, unjudged again."""
    guard, backend = safe_then_unsafe()
    ran: list[Any] = []
    shared = turn(READ, ids=["r"])
    shared.id = "same-turn"
    agent = middleware_agent(guard, [shared, "done", "done"], ran)
    await drive(path, agent, USER, thread="A", interrupt_before=["tools"])
    assert ran == [] and len(backend.requests) == 1
    agent.update_state(config("B"), {"messages": [HumanMessage("Tidy up."), shared.model_copy()]}, as_node="model")
    other = await drive(path, agent, None, thread="B")
    assert ran == [] and len(backend.requests) == 2
    assert next(m for m in other["messages"] if isinstance(m, ToolMessage)).status == "error"
    await drive(path, agent, None, thread="A")
    assert ran == [READ] and len(backend.requests) == 2


def _turn(*actions: Action, thread: str = "t") -> TurnRecords:
    records = []
    for index, action in enumerate(actions):
        call = ToolCall(id=f"c{index}", name="read_file", args={"path": str(index)})
        binding = CallBinding.of(thread_id=thread, turn_id="m", call_id=call.id, tool=call.name, args=call.args)
        records.append(CallRecord.judged(binding, call, Decision(action=action, rule="defaults", why="judged")))
    return TurnRecords(thread_id=thread, turn_id="m", records=records)


def test_only_a_turn_of_simply_allowed_calls_is_handed_off() -> None:
    assert TurnHandoff.takes(_turn(Action.ALLOW, Action.ALLOW))
    assert not TurnHandoff.takes(_turn(Action.ALLOW, Action.BLOCK))
    assert not TurnHandoff.takes(_turn(Action.LOG))
    assert not TurnHandoff.takes(_turn(Action.ESCALATE))
    assert not TurnHandoff.takes(_turn())


def test_a_record_is_taken_once_and_only_by_its_replay() -> None:
    handoff = TurnHandoff()
    turn_records = _turn(Action.ALLOW, Action.ALLOW)
    handoff.put(turn_records, replay=None)
    first, second = (key_of(record.binding) for record in turn_records.records)
    assert handoff.take(first, replay="cp-1") is None
    assert handoff.take(first, replay=None) == turn_records.records[0]
    assert handoff.take(first, replay=None) is None
    other_thread = ("u", *second[1:])
    assert handoff.take(other_thread, replay=None) is None
    assert handoff.take(second, replay=None) == turn_records.records[1]


def test_the_handoff_is_bounded() -> None:
    handoff = TurnHandoff(max_records=4)
    turns = [_turn(Action.ALLOW, Action.ALLOW, thread=str(n)) for n in range(3)]
    for turn_records in turns:
        handoff.put(turn_records, replay=None)
    assert handoff.take(key_of(turns[0].records[0].binding), replay=None) is None  # the oldest went first
    assert all(handoff.take(key_of(r.binding), replay=None) is not None for t in turns[1:] for r in t.records)
