"""A reviewer's answer is used only for the question it answered, on every path: a refused
answer stays refused when the question is asked again (it is not replayed from the node's
first interrupt on the re-run), and every answer, used or refused, is an audit event."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command

from soda_guard import Guard
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node
from soda_guard.integrations.testing import scripted_model

from integration_helpers import make_guard, make_tools
from test_integration_binding import USER, config, graph_for, turn

APPROVE = {"decisions": [{"type": "approve"}]}
REJECT = {"decisions": [{"type": "reject", "message": "not that one"}]}
GRAPH_PATHS = ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "wrapper-async"]


class ListSink:
    def __init__(self) -> None:
        self.decisions: list[Any] = []

    def write(self, decisions: Any, *, deadline: float | None = None) -> None:
        self.decisions.extend(decisions)


def escalating_guard() -> tuple[Guard, ListSink]:
    sink = ListSink()
    guard, _ = make_guard(unsafe=("send_email",), defaults={"on_unsafe": "escalate"}, sinks=[sink])
    return guard, sink


async def drive(path: str, graph: Any, value: Any) -> Any:
    return await graph.ainvoke(value, config()) if path.endswith("async") else graph.invoke(value, config())


def breakpoint_graph(path: str, guard: Guard, replies: list[Any], ran: list[Any]) -> Any:
    """The path's agent with a static breakpoint before the node that asks the reviewer."""
    model = scripted_model(replies)
    if path.startswith("middleware"):
        return create_agent(
            model, make_tools(ran), middleware=[SodaGuardMiddleware(guard)], checkpointer=InMemorySaver(),
            interrupt_before=["model"],
        )
    wrapper = SodaGuardToolWrapper(guard)
    tools = ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap)
    if path.startswith("guard_node"):
        builder = StateGraph(GuardState)
        builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        builder.add_node("guard", guard_node(guard))
        builder.add_node("tools", tools)
        builder.add_edge(START, "agent")
        builder.add_edge("agent", "guard")
        builder.add_edge("tools", "agent")
        return builder.compile(checkpointer=InMemorySaver(), interrupt_before=["guard"])
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", tools)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=InMemorySaver(), interrupt_before=["tools"])


def refused_answers(sink: ListSink) -> list[Any]:
    return [d for d in sink.decisions if d.rule == "review_refused"]


def used_answers(sink: ListSink) -> list[Any]:
    return [d for d in sink.decisions if d.rule == "review"]


@pytest.mark.parametrize("path", GRAPH_PATHS)
async def test_a_refused_answer_is_not_replayed_after_update_state(path: str) -> None:
    guard, sink = escalating_guard()
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(("send_email", {"to": "ok@x.org"}), ids=["same"]), "done"], ran)
    assert (await drive(path, graph, USER))["__interrupt__"]
    swapped = turn(("send_email", {"to": "attacker@evil.org"}), ids=["same"])
    graph.update_state(config(), {"messages": [swapped]}, as_node="model" if path.startswith("middleware") else "agent")
    again = await drive(path, graph, Command(resume=APPROVE))
    assert ran == [] and "other calls" in again["__interrupt__"][0].value["error"]
    result = await drive(path, graph, Command(resume=REJECT))
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "not that one" in message.content
    [refused] = refused_answers(sink)
    assert refused.action.value == "block" and refused.review.type == "approve"
    assert [d.review.type for d in used_answers(sink)] == ["reject"]


@pytest.mark.parametrize("path", GRAPH_PATHS)
async def test_an_answer_sent_to_continue_a_breakpoint_stays_refused(path: str) -> None:
    guard, sink = escalating_guard()
    ran: list[Any] = []
    graph = breakpoint_graph(path, guard, [turn(("send_email", {"to": "a@x.org"}), ids=["e"]), "done"], ran)
    first = await drive(path, graph, USER)
    assert "__interrupt__" not in first or not first["__interrupt__"]
    stray = await drive(path, graph, Command(resume=APPROVE))
    assert ran == [] and stray["__interrupt__"][0].value["error"]
    result = await drive(path, graph, Command(resume=REJECT))
    while path.startswith("middleware") and not any(isinstance(m, ToolMessage) for m in result["messages"]):
        result = await drive(path, graph, None)
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "not that one" in message.content
    assert [d.review.type for d in refused_answers(sink)] == ["approve"]
    assert [d.review.type for d in used_answers(sink)] == ["reject"]
