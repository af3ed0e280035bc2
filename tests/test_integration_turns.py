"""One model turn, judged once and reviewed once, whatever shape the graph gives it: wider
than the executor (the wrapper alone behind `tools_condition`), split over several ToolNodes,
and its results kept in the order of its calls on every path."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, Send

from soda_guard import Guard, read_audit
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper

from integration_helpers import make_guard, make_tools
from test_integration_binding import USER, config, graph_for, turn, wrapper_graph

WIDE = 32


def wide_turn() -> AIMessage:
    return turn(*[("read_file", {"path": f"f{i}"}) for i in range(WIDE)], ids=[f"w{i}" for i in range(WIDE)])


class RecordingExecutor(ThreadPoolExecutor):
    """A small default executor that remembers what it was asked to run."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.ran: list[str] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.ran.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


async def test_a_turn_wider_than_the_executor_does_not_deadlock_async(tmp_path: Path) -> None:
    """With an audit sink too: the leader's audit write needs the executor as well."""
    audit = tmp_path / "audit.jsonl"
    guard, backend = make_guard(unsafe=("nothing-is-unsafe",), defaults={"timeout_s": 1.0}, audit={"jsonl": str(audit)})
    ran: list[Any] = []
    executor = RecordingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    graph = wrapper_graph(SodaGuardToolWrapper(guard), [wide_turn(), "done"], ran)
    result = await asyncio.wait_for(graph.ainvoke(USER, config("wide-async")), 60)
    assert result["messages"][-1].content == "done"
    assert sorted(args["path"] for _, args in ran) == sorted(f"f{i}" for i in range(WIDE))
    assert backend.batches == [WIDE]
    assert not [name for name in executor.ran if "follow" in name]
    assert len(list(read_audit(audit))) == WIDE


def test_a_finished_leader_ends_the_wait_at_once_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Followers that arrive after the leader finished used to wait out the grace period
    (1 s a turn); with a grace longer than the test's guard, only the records can end it."""
    guard, backend = make_guard(unsafe=("nothing-is-unsafe",))
    wrapper = SodaGuardToolWrapper(guard)
    monkeypatch.setattr(wrapper._enforcer.coordinator, "grace_s", 120.0)
    ran: list[Any] = []
    graph = wrapper_graph(wrapper, [wide_turn(), "done"], ran)
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(graph.invoke(USER, config("wide-sync"))), daemon=True)
    runner.start()
    runner.join(60)
    assert outcome and outcome[0]["messages"][-1].content == "done"
    assert len(ran) == WIDE and backend.batches == [WIDE]


def split_graph(guard: Guard, replies: list[Any], ran: list[Any]) -> Any:
    """The turn's calls sent to two ToolNodes (reads to one, the rest to the other), each with
    a wrapper of its own and no guard node."""
    from soda_guard.integrations.testing import scripted_model

    model = scripted_model(replies)

    def route(state: GuardState) -> Any:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return Command(goto="__end__")
        return Command(goto=[
            Send("reads" if call["name"] == "read_file" else "others",
                 {"__type": "tool_call_with_context", "tool_call": call, "state": state})
            for call in last.tool_calls
        ])

    builder = StateGraph(GuardState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("route", route)
    for name in ("reads", "others"):
        wrapper = SodaGuardToolWrapper(guard)
        builder.add_node(name, ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
        builder.add_edge(name, "agent")
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "route")
    return builder.compile(checkpointer=InMemorySaver())


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_turn_split_over_two_tool_nodes_is_reviewed_once_before_anything_runs(mode: str) -> None:
    guard, backend = make_guard(unsafe=('"/"',), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = split_graph(guard, [turn(("read_file", {"path": "a"}), ("delete_file", {"path": "/"}), ids=["r", "d"]), "done"], ran)

    async def drive(value: Any) -> Any:
        thread = config(f"split-{mode}")
        return graph.invoke(value, thread) if mode == "sync" else await graph.ainvoke(value, thread)

    paused = await drive(USER)
    assert ran == []
    [pause] = paused["__interrupt__"]
    question = pause.value
    assert [a["name"] for a in question["action_requests"]] == ["delete_file"]
    result = await drive(Command(resume={"decisions": [{"type": "reject", "message": "no"}]}))
    assert ran == [("read_file", {"path": "a"})] and result["messages"][-1].content == "done"
    assert backend.batches == [2]


PATHS = ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "wrapper-async"]


async def second_judgment(path: str) -> tuple[list[str], str]:
    """The tool messages after the first turn (by call id) and the next turn's judge prompt."""
    guard, backend = make_guard(unsafe=("delete_file",))
    ran: list[Any] = []
    replies = [
        turn(("delete_file", {"path": "/"}), ("read_file", {"path": "a"}), ("delete_file", {"path": "/etc"}),
             ("read_file", {"path": "b"}), ids=["c0", "c1", "c2", "c3"]),
        turn(("send_email", {"to": "a@b.c"}), ids=["n0"]),
        "done",
    ]
    graph = graph_for(path, guard, replies, ran)
    thread = config(f"order-{path}")
    result = await graph.ainvoke(USER, thread) if path.endswith("async") else graph.invoke(USER, thread)
    messages = result["messages"]
    first = next(i for i, m in enumerate(messages) if isinstance(m, AIMessage) and m.tool_calls)
    after = []
    for message in messages[first + 1:]:
        if not isinstance(message, ToolMessage):
            break
        after.append(message.tool_call_id)
    return after, repr(backend.requests[-1].messages)


async def test_results_keep_call_order_and_the_next_judgment_is_the_same_on_every_path() -> None:
    seen = {path: await second_judgment(path) for path in PATHS}
    for path, (order, _) in seen.items():
        assert order == ["c0", "c1", "c2", "c3"], path
    prompts = {prompt for _, prompt in seen.values()}
    assert len(prompts) == 1


@pytest.mark.parametrize("path", ["middleware", "guard_node", "guard_node-async", "wrapper"])
async def test_a_reviewer_answer_in_the_tools_place_keeps_its_calls_place(path: str) -> None:
    guard, _ = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    replies = [turn(("read_file", {"path": "a"}), ("delete_file", {"path": "/"}), ids=["c0", "c1"]), "done"]
    graph = graph_for(path, guard, replies, ran)
    thread = config(f"respond-{path}")

    async def drive(value: Any) -> Any:
        return await graph.ainvoke(value, thread) if path.endswith("async") else graph.invoke(value, thread)

    assert (await drive(USER))["__interrupt__"]
    result = await drive(Command(resume={"decisions": [{"type": "respond", "message": "deleted by hand"}]}))
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in tool_messages] == ["c0", "c1"]
    assert tool_messages[1].content == "deleted by hand" and ran == [("read_file", {"path": "a"})]
