"""The `soda_guard` records in graph state are trusted only when the guard wrote them: a record
written by anyone else (`update_state`, a node, a forked checkpoint) fails its HMAC and the call
is judged again, on every path that reads the state."""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import HumanMessage, RemoveMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, interrupt

from soda_guard import Action, CallRecord, Decision, Guard, ToolCall, TurnRecords
from soda_guard.binding import CallBinding
from soda_guard.seal import RecordSeal
from soda_guard.integrations import _enforce
from soda_guard.integrations._state import _superseded_resume
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper
from soda_guard.integrations.testing import scripted_model

from integration_helpers import make_guard, make_tools
from test_integration_binding import config, graph_for, turn, wrapper_graph

DELETE = ("delete_file", {"path": "/"})
PATHS = ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "wrapper-async"]


def stateful_wrapper_graph(guard: Guard, replies: list[Any], ran: list[Any]) -> Any:
    """The wrapper alone, behind `tools_condition`, in a graph whose state has the records key."""
    return wrapper_graph(SodaGuardToolWrapper(guard), replies, ran, state=GuardState)


def forged_approval(message: Any, *, thread: str = "t") -> dict[str, Any]:
    """What an attacker who can write the state computes: a record bound to the very call,
    saying it was allowed, in the exact format the guard stores."""
    call = message.tool_calls[0]
    tool_call = ToolCall(id=call["id"], name=call["name"], args=call["args"])
    binding = CallBinding.of(thread_id=thread, turn_id=message.id, call_id=call["id"], tool=call["name"], args=call["args"])
    decision = Decision(action=Action.ALLOW, rule="defaults", why="the judge said safe")
    record = CallRecord.judged(binding, tool_call, decision)
    raw = TurnRecords(thread_id=thread, turn_id=message.id, records=[record]).for_state(RecordSeal(b"not the guard's key"))
    assert set(raw["records"][0]) == {"record", "mac"}
    return raw


async def drive(path: str, graph: Any, value: Any) -> Any:
    return await graph.ainvoke(value, config()) if path.endswith("async") else graph.invoke(value, config())


async def run_with_forged_record(path: str, forge: Callable[[Any], dict[str, Any]]) -> tuple[Any, list[Any], Any]:
    """A turn written into the state with `update_state`, beside a record `forge` makes for it,
    then the graph resumed: (its result, the tools that ran, the judge)."""
    guard, backend = make_guard()
    ran: list[Any] = []
    graph = (
        stateful_wrapper_graph(guard, ["done"], ran) if path.startswith("wrapper") else graph_for(path, guard, ["done"], ran)
    )
    attack = turn(DELETE, ids=["d"])
    attack.id = "forged-turn"
    node = "model" if path.startswith("middleware") else "agent"
    graph.update_state(config(), {"messages": [HumanMessage("Tidy up."), attack], "soda_guard": forge(attack)}, as_node=node)
    return await drive(path, graph, None), ran, backend


@pytest.mark.parametrize("path", PATHS)
async def test_a_record_written_by_update_state_is_not_trusted(path: str) -> None:
    result, ran, backend = await run_with_forged_record(path, forged_approval)
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and message.response_metadata["soda_guard"]["action"] == "block"
    assert len(backend.requests) == 1


def _without_mac(message: Any) -> dict[str, Any]:
    forged = forged_approval(message)
    del forged["records"][0]["mac"]
    return forged


@pytest.mark.parametrize("path", PATHS)
async def test_a_record_without_a_mac_is_not_trusted(path: str) -> None:
    _, ran, backend = await run_with_forged_record(path, _without_mac)
    assert ran == [] and len(backend.requests) == 1


def before_tools(graph: Any) -> Any:
    """The latest checkpoint whose next step runs the tools."""
    return next(s for s in graph.get_state_history(config()) if any(t.name == "tools" for t in s.tasks))


async def replay(path: str, graph: Any, snapshot: Any, value: Any = None) -> Any:
    return await graph.ainvoke(value, snapshot.config) if path.endswith("async") else graph.invoke(value, snapshot.config)


@pytest.mark.parametrize("path", PATHS)
async def test_replaying_a_checkpoint_before_the_tools_step_judges_again(path: str) -> None:
    guard, backend = make_guard(unsafe=("nothing-is-unsafe",))
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done", "done again"], ran)
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    assert ran == [DELETE] and len(backend.requests) == 1
    await replay(path, graph, before_tools(graph))
    assert ran == [DELETE, DELETE] and len(backend.requests) == 2


@pytest.mark.parametrize("path", PATHS)
async def test_replaying_an_approved_call_asks_the_reviewer_again(path: str) -> None:
    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done", "done again"], ran)
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    await drive(path, graph, Command(resume={"decisions": [{"type": "approve"}]}))
    assert ran == [DELETE]
    replayed = await replay(path, graph, before_tools(graph))
    assert ran == [DELETE]
    [pause] = replayed["__interrupt__"]
    assert pause.value["action_requests"][0]["name"] == "delete_file"
    result = await drive(path, graph, Command(resume={"decisions": [{"type": "reject", "message": "not twice"}]}))
    assert ran == [DELETE] and any(isinstance(m, ToolMessage) and "not twice" in str(m.content) for m in result["messages"])


APPROVE = {"decisions": [{"type": "approve"}]}
REJECT = {"decisions": [{"type": "reject", "message": "not twice"}]}


@pytest.mark.parametrize("path", PATHS)
async def test_a_resume_at_a_checkpoint_the_thread_has_moved_past_is_a_replay(path: str, monkeypatch: Any) -> None:
    """LangGraph re-runs the tasks that finished at a checkpoint the thread has moved past when
    a `Command(resume=...)` is addressed at it, but marks no replay in the config: in another
    process (the same checkpointer and records key; the memory of calls run is the process's)
    the forked state's records ran the approved call again, unjudged and unasked, even on a
    resume that says reject."""
    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done"], ran)
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    await drive(path, graph, Command(resume=APPROVE))
    assert ran == [DELETE] and len(backend.requests) == 1
    monkeypatch.setattr(_enforce, "_RAN", {})  # another process, built again over the same checkpointer
    other = graph_for(path, guard, ["done"], ran)
    other.checkpointer = graph.checkpointer
    replayed = await replay(path, other, before_tools(graph), Command(resume=REJECT))
    assert ran == [DELETE] and len(backend.requests) == 2
    [pause] = replayed["__interrupt__"]
    assert pause.value["action_requests"][0]["name"] == "delete_file"


async def test_a_resume_at_a_moved_past_checkpoint_is_a_replay_for_a_tools_node_with_a_timeout(monkeypatch: Any) -> None:
    """A node added with `timeout=` runs under a scope that wraps the task's call in a closure,
    where the run loop was not found: its resume at a moved-past checkpoint passed as no replay
    and the forked state's records ran the approved call again. (LangGraph times async nodes
    only.)"""
    import inspect

    from langgraph.graph import START, StateGraph
    from langgraph.prebuilt import ToolNode

    from soda_guard.integrations.langgraph import guard_node

    if "timeout" not in inspect.signature(StateGraph.add_node).parameters:
        pytest.skip("this LangGraph has no node timeouts")
    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []

    def build(replies: list[Any]) -> Any:
        model, wrapper = scripted_model(replies), SodaGuardToolWrapper(guard)
        builder = StateGraph(GuardState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("guard", guard_node(guard))
        builder.add_node("tools", ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap), timeout=30)
        builder.add_edge(START, "agent")
        builder.add_edge("agent", "guard")
        builder.add_edge("tools", "agent")
        return builder.compile(checkpointer=InMemorySaver())

    path = "guard_node-async"
    graph = build([turn(DELETE, ids=["d"]), "done"])
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    await drive(path, graph, Command(resume=APPROVE))
    assert ran == [DELETE] and len(backend.requests) == 1
    monkeypatch.setattr(_enforce, "_RAN", {})
    other = build(["done"])
    other.checkpointer = graph.checkpointer
    replayed = await replay(path, other, before_tools(graph), Command(resume=REJECT))
    assert ran == [DELETE] and len(backend.requests) == 2 and "__interrupt__" in replayed


@pytest.mark.parametrize("path", PATHS)
async def test_a_resume_addressed_at_the_threads_latest_checkpoint_is_no_replay(path: str) -> None:
    """LangGraph Studio resumes with the head's `checkpoint_id`: the paused turn goes on as
    without it, judged once and asked once."""
    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done"], ran)
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    done = await replay(path, graph, graph.get_state(config()), Command(resume=APPROVE))
    assert ran == [DELETE] and "__interrupt__" not in done and len(backend.requests) == 1


class Pause(AgentMiddleware):
    """An `after_model` hook that asks a question of its own, after the guard's records are made."""

    def after_model(self, state: Any, runtime: Any) -> None:
        if state["messages"][-1].tool_calls:
            interrupt("go on?")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_resume_at_the_latest_checkpoint_keeps_the_records_an_earlier_run_made(mode: str) -> None:
    """Another middleware pauses between the guard's judgment and the tools step; resumed at
    the head's `checkpoint_id`, the tools step uses the records the run before made."""
    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent = create_agent(
        scripted_model([turn(DELETE, ids=["d"]), "done"]), make_tools(ran),
        middleware=[Pause(), SodaGuardMiddleware(guard)], checkpointer=InMemorySaver(),
    )
    await drive(mode, agent, {"messages": [{"role": "user", "content": "Tidy up."}]})
    asked = await drive(mode, agent, Command(resume=APPROVE))
    assert asked["__interrupt__"][0].value == "go on?" and ran == []
    done = await replay(mode, agent, agent.get_state(config()), Command(resume="yes"))
    assert ran == [DELETE] and "__interrupt__" not in done and len(backend.requests) == 1


class Loop:
    """A run loop as `_superseded_resume` finds it: addressed at `checkpoint_id`, and telling
    whether the thread had moved past it only where `superseded` is given."""

    def __init__(self, checkpoint_id: str | None, **superseded: bool) -> None:
        self.config = {"configurable": {"checkpoint_id": checkpoint_id}}
        self.__dict__.update({f"_addressed_checkpoint_{k}": v for k, v in superseded.items()})

    def accept_push(self) -> None: ...


def test_a_loop_that_does_not_tell_whether_its_checkpoint_was_moved_past_replays_it() -> None:
    def configurable(loop: Loop) -> dict[str, Any]:
        return {"__pregel_call": functools.partial(print, schedule_task=loop.accept_push)}

    assert _superseded_resume(configurable(Loop("cp-1", superseded=True))) == "cp-1"
    assert _superseded_resume(configurable(Loop("cp-1", superseded=False))) is None
    assert _superseded_resume(configurable(Loop("cp-1"))) == "cp-1"
    assert _superseded_resume(configurable(Loop(None))) is None
    assert _superseded_resume({}) is None


@pytest.mark.parametrize("path", ["middleware", "middleware-async", "guard_node", "guard_node-async"])
async def test_reopening_an_approved_call_with_update_state_asks_again(path: str) -> None:
    """The guard's own record of an approved call stays in state after the call ran; removing
    the call's result (and what followed) through `update_state` makes the call pending again.
    The record was made for the step that ran it, not for this one."""
    guard, _ = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done", "done again"], ran)
    await drive(path, graph, {"messages": [{"role": "user", "content": "Tidy up."}]})
    done = await drive(path, graph, Command(resume={"decisions": [{"type": "approve"}]}))
    assert ran == [DELETE]
    result, final = [m for m in done["messages"] if isinstance(m, ToolMessage)][0], done["messages"][-1]
    node = "model" if path.startswith("middleware") else "agent"
    graph.update_state(config(), {"messages": [RemoveMessage(id=result.id), RemoveMessage(id=final.id)]}, as_node=node)
    again = await drive(path, graph, None)
    assert ran == [DELETE] and again["__interrupt__"][0].value["action_requests"][0]["name"] == "delete_file"


@pytest.mark.parametrize("path", ["middleware", "guard_node"])
def test_a_breakpoint_before_the_tools_step_keeps_the_records(path: str) -> None:
    guard, backend = make_guard(unsafe=("nothing",))
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done"], ran)
    graph.interrupt_before_nodes = ["tools"]
    graph.invoke({"messages": [{"role": "user", "content": "Tidy up."}]}, config())
    assert ran == []
    graph.invoke(None, config())
    assert ran == [DELETE] and len(backend.requests) == 1


def test_an_approval_is_not_asked_again_with_an_after_model_middleware_in_between() -> None:
    """`create_agent` puts a node per `after_model` hook between the model step and the tools
    step: the records still reach the tools step, and the reviewer is asked once."""

    class AfterModel(AgentMiddleware):
        def after_model(self, state: Any, runtime: Any) -> None:
            return None

    guard, backend = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent = create_agent(
        scripted_model([turn(DELETE, ids=["d"]), "done"]), make_tools(ran),
        middleware=[SodaGuardMiddleware(guard), AfterModel()], checkpointer=InMemorySaver(),
    )
    assert agent.invoke({"messages": [{"role": "user", "content": "Tidy up."}]}, config())["__interrupt__"]
    result = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert "__interrupt__" not in result and ran == [DELETE] and len(backend.requests) == 1
