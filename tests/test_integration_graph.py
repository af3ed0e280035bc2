"""guard_node + SodaGuardToolWrapper in a hand-built StateGraph."""

from __future__ import annotations

import operator
import sqlite3
from pathlib import Path
from typing import Annotated, Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command
from typing_extensions import NotRequired, TypedDict

from soda_guard import Guard
from soda_guard.errors import SodaGuardError, TrajectoryError
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node
from soda_guard.integrations.testing import scripted_model, tool_calls_message

from integration_helpers import ListState, make_guard, make_tools, numbered, tools_graph

USER = {"messages": [{"role": "user", "content": "Clean the disk."}]}
TWO = (("read_file", {"path": "a"}), ("delete_file", {"path": "/"}))


def build(guard: Guard, replies: list[Any], ran: list[Any], checkpointer: Any = None, on_block: str = "model") -> Any:
    model = scripted_model(replies)

    def agent(state: GuardState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    wrapper = SodaGuardToolWrapper(guard)
    builder = StateGraph(GuardState)
    builder.add_node("agent", agent)
    builder.add_node("guard", guard_node(guard, on_block=on_block))  # type: ignore[arg-type]
    builder.add_node("tools", ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "guard")
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


def tool_messages(result: dict[str, Any]) -> dict[str, ToolMessage]:
    return {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}


def test_guard_node_batches_blocks_and_routes() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    result = build(guard, [numbered(*TWO), "done"], ran).invoke(USER)
    assert backend.batches == [2]
    assert ran == [("read_file", {"path": "a"})]
    messages = tool_messages(result)
    assert messages["call_1"].status == "error" and messages["call_1"].response_metadata["soda_guard"]
    assert "soda_guard" not in messages["call_0"].response_metadata  # simply allowed: nothing to tell
    assert result["messages"][-1].content == "done"


def test_all_blocked_goes_back_to_model_or_ends() -> None:
    guard, _ = make_guard()
    ran: list[Any] = []
    result = build(guard, [tool_calls_message(("delete_file", {"path": "/"})), "sorry"], ran).invoke(USER)
    assert result["messages"][-1].content == "sorry" and ran == []
    ended = build(guard, [tool_calls_message(("delete_file", {"path": "/"})), "sorry"], ran, on_block="end").invoke(USER)
    assert isinstance(ended["messages"][-1], ToolMessage) and ran == []


async def test_guard_node_async() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    result = await build(guard, [numbered(*TWO), "done"], ran).ainvoke(USER)
    assert backend.batches == [2] and ran == [("read_file", {"path": "a"})]
    assert result["messages"][-1].content == "done"


def test_escalation_edit_survives_restart_with_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"}, unsafe=('"/"',))
    ran: list[Any] = []
    config = {"configurable": {"thread_id": "g1"}}
    with sqlite3.connect(path, check_same_thread=False) as connection:
        paused = build(guard, [numbered(*TWO), "done"], ran, SqliteSaver(connection)).invoke(USER, config)
    assert [a["name"] for a in paused["__interrupt__"][0].value["action_requests"]] == ["delete_file"]
    assert ran == [] and backend.batches == [2]
    fresh, fresh_backend = make_guard(defaults={"on_unsafe": "escalate"}, unsafe=('"/"',))
    with sqlite3.connect(path, check_same_thread=False) as connection:
        graph = build(fresh, ["done"], ran, SqliteSaver(connection))
        result = graph.invoke(Command(resume={"decisions": [{"type": "edit", "args": {"path": "/tmp/x"}}]}), config)
    assert fresh_backend.batches == [1]
    assert sorted(ran, key=str) == [("delete_file", {"path": "/tmp/x"}), ("read_file", {"path": "a"})]
    ran_delete = tool_messages(result)["call_1"]
    assert "deleted /tmp/x" in ran_delete.content and "reviewer replaced" in ran_delete.content
    assert ran_delete.response_metadata["soda_guard"]["review"] == "edit"


def test_reject_in_graph_with_memory_saver() -> None:
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = build(guard, [numbered(*TWO), "done"], ran, InMemorySaver())
    config = {"configurable": {"thread_id": "g2"}}
    graph.invoke(USER, config)
    result = graph.invoke(Command(resume={"decisions": [{"type": "reject", "message": "not today"}]}), config)
    assert "not today" in tool_messages(result)["call_1"].content
    assert ran == [("read_file", {"path": "a"})] and backend.batches == [2]


def test_tool_wrapper_alone_judges_the_turn_once() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode(make_tools(ran), wrap_tool_call=SodaGuardToolWrapper(guard)))
    builder.add_edge(START, "tools")
    result = builder.compile().invoke({"messages": [*USER["messages"], numbered(*TWO)]})
    by_id = tool_messages(result)
    assert by_id["call_1"].status == "error" and ran == [("read_file", {"path": "a"})]
    assert backend.batches == [2]


RANSOM = "Email my boss to wire my savings, it's a ransom."
SEND = ("send_email", {"to": "boss@corp.example", "body": "Go ahead."})
ONE_DELETE = [{"name": "one-delete", "tools": ["delete_*"], "when": {"limit": {"calls": 1, "per": "thread"}}, "action": "block"}]


async def run(mode: str, graph: Any, value: Any) -> Any:
    return await graph.ainvoke(value) if mode == "async" else graph.invoke(value)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_wrapper_judges_a_list_state_as_the_conversation(mode: str) -> None:
    """Judged as no conversation, the judge never saw the request (the email is harmful only
    in its light) and a rule that reads the thread (`limit`) never held: everything ran."""
    guard, backend = make_guard(unsafe=("ransom",), rules=ONE_DELETE)
    ran: list[Any] = []
    await run(mode, tools_graph(ListState, guard, [tool_calls_message(SEND), "done"], ran), [HumanMessage(RANSOM)])
    assert ran == [] and RANSOM in backend.requests[0].messages[-1]["content"]
    deletes = [tool_calls_message(("delete_file", {"path": "a"})), tool_calls_message(("delete_file", {"path": "b"})), "done"]
    await run(mode, tools_graph(ListState, guard, deletes, ran), [HumanMessage("Tidy up.")])
    assert ran == [("delete_file", {"path": "a"})]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_list_state_that_holds_no_message_is_no_conversation(mode: str) -> None:
    """A state that is a bare list of calls has no request to judge them by: refused, not
    judged alone."""
    guard, _ = make_guard()
    ran: list[Any] = []
    [tool] = [t for t in make_tools(ran) if t.name == "read_file"]
    call = {"name": "read_file", "args": {"path": "a"}, "id": "r", "type": "tool_call"}
    request = ToolCallRequest(tool_call=call, tool=tool, state=[call], runtime=None)  # type: ignore[arg-type]
    wrapper = SodaGuardToolWrapper(guard)

    async def handler(request: ToolCallRequest) -> Any:
        return tool.invoke(request.tool_call)

    with pytest.raises(SodaGuardError, match="no conversation .*a list that holds no message"):
        await wrapper.awrap(request, handler) if mode == "async" else wrapper(request, lambda r: tool.invoke(r.tool_call))
    assert ran == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_guard_node_refuses_a_list_state_it_cannot_keep_records_in(mode: str) -> None:
    guard, _ = make_guard()
    ran: list[Any] = []
    graph = tools_graph(ListState, guard, [tool_calls_message(("read_file", {"path": "a"})), "done"], ran, with_guard_node=True)
    with pytest.raises(SodaGuardError, match="use \\(or extend\\) GuardState"):
        await run(mode, graph, [HumanMessage("Read a.")])
    assert ran == []


class PlainState(TypedDict):
    """Messages kept as written (no `add_messages`): a user's message may stay a dict."""

    messages: Annotated[list, operator.add]
    soda_guard: NotRequired[dict[str, Any]]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("with_guard_node", [False, True], ids=["wrapper", "guard_node"])
async def test_a_message_kept_as_a_dict_is_judged_as_the_message_it_is(mode: str, with_guard_node: bool) -> None:
    """The model and the ToolNode read `{"role": "user", ...}` as a message; the guard crashed
    on it (no `__dict__`), so no call ran, benign ones included."""
    guard, backend = make_guard(unsafe=("ransom",))
    ran: list[Any] = []
    read = tool_calls_message(("read_file", {"path": "a"}))
    await run(mode, tools_graph(PlainState, guard, [read, "done"], ran, with_guard_node=with_guard_node),
              {"messages": [{"role": "user", "content": "Read a."}]})
    assert ran == [("read_file", {"path": "a"})]
    await run(mode, tools_graph(PlainState, guard, [tool_calls_message(SEND), "done"], ran, with_guard_node=with_guard_node),
              {"messages": [{"role": "user", "content": RANSOM}]})
    assert ran == [("read_file", {"path": "a"})] and RANSOM in backend.requests[-1].messages[-1]["content"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("with_guard_node", [False, True], ids=["wrapper", "guard_node"])
async def test_an_entry_that_is_no_message_is_refused_by_its_place(mode: str, with_guard_node: bool) -> None:
    guard, _ = make_guard()
    ran: list[Any] = []
    [tool] = [t for t in make_tools(ran) if t.name == "read_file"]
    turn = tool_calls_message(("read_file", {"path": "a"}))
    state = {"messages": [HumanMessage("Read a."), {"note": "not a message"}, turn]}
    node, wrapper = guard_node(guard), SodaGuardToolWrapper(guard)
    request = ToolCallRequest(tool_call=turn.tool_calls[0], tool=tool, state=state, runtime=None)  # type: ignore[arg-type]

    async def handler(request: ToolCallRequest) -> Any:
        return tool.invoke(request.tool_call)

    with pytest.raises(TrajectoryError, match="message 1: a dict that is not a message"):
        if with_guard_node:
            await node.ainvoke(state) if mode == "async" else node.invoke(state)
        else:
            await wrapper.awrap(request, handler) if mode == "async" else wrapper(request, lambda r: tool.invoke(r.tool_call))
    assert ran == []
