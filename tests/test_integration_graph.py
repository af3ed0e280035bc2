"""guard_node + SodaGuardToolWrapper in a hand-built StateGraph."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from langchain_core.messages import ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command

from soda_guard import Guard
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node
from soda_guard.integrations.testing import scripted_model, tool_calls_message

from integration_helpers import make_guard, make_tools, numbered

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
