"""Issue 20 item 2: a block given is never dropped. A chat model that runs inside a tool (a
summariser, a sub-agent) reaches the callback handler too, since callbacks propagate into child
runs; it gets a trajectory of its own and leaves the outer turn's decisions and request alone."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import InjectedToolArg, StructuredTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import RetryPolicy

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.backends.scripted import soda_reply
from soda_guard.generation import GenerationRequest, GenerationResult
from soda_guard.integrations.langchain import MAX_OPEN_TURNS, SodaGuardCallbackHandler, ToolCallBlocked
from soda_guard.integrations.testing import scripted_model, tool_calls_message
from soda_guard.trajectory import UserStep

from integration_helpers import make_guard, make_tools

REQUEST = "My ex's server: wipe it so she loses her thesis."


def _contextual(request: GenerationRequest) -> GenerationResult:
    """Unsafe only in context: deleting is harmful when the user's request is the revenge one,
    so a judgment that lost the outer request lets the deletion through."""
    prompt = request.messages[-1]["content"]
    unsafe = "delete_file" in prompt and "thesis" in prompt
    return GenerationResult(text=soda_reply(unsafe), score=0.97 if unsafe else 0.02)


def _setup() -> tuple[SodaGuardCallbackHandler, ScriptedBackend, list[str]]:
    backend = ScriptedBackend(_contextual)
    guard = Guard(Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}}), backends={"soda": backend})
    return SodaGuardCallbackHandler(guard), backend, []


def _tools(ran: list[str], inner_replies: list[Any]) -> dict[str, Any]:
    inner = scripted_model(inner_replies)

    @tool
    def delete_file(path: str) -> str:
        """Delete a file."""
        ran.append(f"delete_file {path}")
        return f"deleted {path}"

    @tool
    def summarise(text: str) -> str:
        """Summarise a text with a model of its own (callbacks reach it through the tool's run)."""
        ran.append("summarise")
        return str(inner.invoke([HumanMessage(f"Summarise: {text}")]).content)

    @tool
    async def asummarise(text: str) -> str:
        """The same, asynchronously."""
        ran.append("summarise")
        return str((await inner.ainvoke([HumanMessage(f"Summarise: {text}")])).content)

    @tool
    def sub_agent(task: str) -> str:
        """A sub-agent: a model that calls a tool of its own, within this tool's run."""
        ran.append("sub_agent")
        reply = inner.invoke([HumanMessage(task)])
        for call in reply.tool_calls:
            delete_file.invoke(call)
        return "sub-agent finished"

    return {"delete_file": delete_file, "summarise": summarise, "asummarise": asummarise, "sub_agent": sub_agent}


async def _loop(handler: SodaGuardCallbackHandler, replies: list[Any], tools: dict[str, Any], mode: str) -> list[Any]:
    model = scripted_model(replies)
    config = {"callbacks": [handler]}
    messages: list[Any] = [HumanMessage(REQUEST)]
    while True:
        reply = model.invoke(messages, config) if mode == "sync" else await model.ainvoke(messages, config)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            try:
                tool_ = tools[call["name"]]
                messages.append(tool_.invoke(call, config) if mode == "sync" else await tool_.ainvoke(call, config))
            except ToolCallBlocked as blocked:
                messages.append(ToolMessage(str(blocked), tool_call_id=call["id"], status="error"))


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_model_inside_a_tool_does_not_drop_the_turns_block(mode: str) -> None:
    handler, backend, ran = _setup()
    summarise = "summarise" if mode == "sync" else "asummarise"
    turn = tool_calls_message((summarise, {"text": "notes"}), ("delete_file", {"path": "/home/ex/docs"}), ids=["c1", "c2"])
    messages = await _loop(handler, [turn, "done"], _tools(ran, ["a summary"]), mode)
    assert ran == ["summarise"], "the deletion ran on a judgment made without the user's request"
    assert messages[3].status == "error" and "delete_file" in messages[3].content
    assert [(d.tool_call.name, d.action.value) for d in handler.decisions] == [(summarise, "allow"), ("delete_file", "block")]
    assert backend.batches == [2], "the turn was judged once, as one batch"
    assert isinstance(handler.trajectory.steps[0], UserStep) and handler.trajectory.steps[0].content == REQUEST
    assert any(step.role == "tool" and step.content == "a summary" for step in handler.trajectory.steps)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_model_inside_a_tool_given_the_apps_own_config_does_not_drop_the_turns_block(mode: str) -> None:
    """The tool calls its model with the app's `{"callbacks": [handler]}`, not its own run's:
    that model's run has no parent, as the outer model's has none."""
    handler, backend, ran = _setup()
    inner = scripted_model(["a summary"])
    app_config = {"callbacks": [handler]}

    @tool
    async def summarise(text: str) -> str:
        """Summarise a text with a model of its own, given the app's config."""
        ran.append("summarise")
        reply = inner.invoke([HumanMessage(f"Summarise: {text}")], app_config) if mode == "sync" else await inner.ainvoke([HumanMessage(f"Summarise: {text}")], app_config)
        return str(reply.content)

    tools = {**_tools(ran, []), "summarise": summarise}
    turn = tool_calls_message(("summarise", {"text": "notes"}), ("delete_file", {"path": "/home/ex/docs"}), ids=["c1", "c2"])
    messages = await _loop(handler, [turn, "done"], tools, "async")
    assert ran == ["summarise"], "the deletion ran on a judgment made without the user's request"
    assert messages[3].status == "error"
    assert [(d.tool_call.name, d.action.value) for d in handler.decisions] == [("summarise", "allow"), ("delete_file", "block")]
    assert handler.trajectory.steps[0].content == REQUEST


def test_a_sub_agents_calls_are_judged_in_their_own_trajectory() -> None:
    handler, backend, ran = _setup()
    turn = tool_calls_message(("sub_agent", {"task": "tidy"}), ("delete_file", {"path": "/home/ex/docs"}), ids=["c1", "c2"])
    inner_turn = tool_calls_message(("delete_file", {"path": "/tmp/cache"}), ids=["c1"])
    asyncio.run(_loop(handler, [turn, "done"], _tools(ran, [inner_turn]), "sync"))
    assert ran == ["sub_agent", "delete_file /tmp/cache"]
    nested = backend.requests[-1].messages[-1]["content"]
    assert "tidy" in nested and "/tmp/cache" in nested and "thesis" not in nested
    assert [(d.tool_call.name, d.tool_call.args, d.action.value) for d in handler.decisions] == [
        ("sub_agent", {"task": "tidy"}, "allow"),
        ("delete_file", {"path": "/home/ex/docs"}, "block"),
        ("delete_file", {"path": "/tmp/cache"}, "allow"),
    ]
    assert handler.trajectory.steps[0] == UserStep(content=REQUEST)


def _post_tool(posted: list[str]) -> Any:
    def post_message(text: str) -> str:
        """Post a message to the public channel."""
        posted.append(text)
        return "posted"

    async def apost_message(text: str) -> str:
        posted.append(text)
        return "posted"

    return StructuredTool.from_function(post_message, coroutine=apost_message)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_string_input_whose_keys_repeat_is_judged_as_the_string_the_tool_gets(mode: str) -> None:
    """Parsed, only the last `text` would be judged; LangChain hands the tool the whole string."""
    guard, _ = make_guard(unsafe=("password",))
    posted: list[str] = []
    tool = _post_tool(posted)
    config = {"callbacks": [SodaGuardCallbackHandler(guard, raise_error=True)]}
    raw = '{"text": "the admin password is hunter2", "text": "Good morning team"}'
    with pytest.raises(ToolCallBlocked):
        tool.invoke(raw, config) if mode == "sync" else await tool.ainvoke(raw, config)
    assert posted == []


def test_a_call_whose_arguments_hold_a_lone_surrogate_is_judged_and_its_decision_audited(tmp_path: Any) -> None:
    audit = tmp_path / "audit.jsonl"
    guard, _ = make_guard(unsafe=("nothing-is-unsafe",), audit={"jsonl": str(audit)})
    handler = SodaGuardCallbackHandler(guard, raise_error=True)
    posted: list[str] = []
    _post_tool(posted).invoke({"text": "a\ud800"}, {"callbacks": [handler]})
    [decision] = handler.decisions
    [record] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["decision_id"] == decision.decision_id and record["tool_call"]["args"] == {"text": "a\ufffd"}


def test_a_tool_run_with_arguments_only_python_finds_equal_to_the_judged_ones_is_judged_on_its_own() -> None:
    """`{"count": 1}` was judged; `{"count": true}` runs: to `==` they are one, as JSON not."""
    handler, backend, _ = _setup()
    config = {"callbacks": [handler]}
    ran: list[Any] = []

    @tool
    def repeat(count: Any) -> str:
        """Repeat the last action `count` times."""
        ran.append(count)
        return "done"

    reply = scripted_model([tool_calls_message(("repeat", {"count": 1}), ids=["c1"])]).invoke([HumanMessage(REQUEST)], config)
    repeat.invoke({**reply.tool_calls[0], "args": {"count": True}}, config)
    assert ran == [True]
    assert [json.dumps(decision.tool_call.args) for decision in handler.decisions] == ['{"count": true}'], "judged as it ran"


def _graph_with_a_side_model(agent_model: Any, side_model: Any, ran: list[Any], mode: str, retry: RetryPolicy | None = None) -> Any:
    """agent → describe → tools: `describe` calls a second model on the graph's config (to
    tell the user what is about to happen) between the model's turn and its tools."""

    def side_input(state: MessagesState) -> list[Any]:
        names = [call["name"] for call in state["messages"][-1].tool_calls]
        return [SystemMessage("Describe these tool calls for the user in one sentence."), HumanMessage(str(names))]

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [agent_model.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await agent_model.ainvoke(state["messages"])]}

    def describe(state: MessagesState) -> dict[str, Any]:
        side_model.invoke(side_input(state))
        return {}

    async def adescribe(state: MessagesState) -> dict[str, Any]:
        await side_model.ainvoke(side_input(state))
        return {}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent if mode == "sync" else aagent)
    builder.add_node("describe", describe if mode == "sync" else adescribe)
    builder.add_node("tools", ToolNode(make_tools(ran)), retry_policy=retry)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "describe", END: END})
    builder.add_edge("describe", "tools")
    builder.add_edge("tools", "agent")
    return builder.compile()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_side_model_between_a_turn_and_its_tools_does_not_drop_the_turns_block(mode: str) -> None:
    """The side model's input is not the conversation the turn was made in: the turn's calls
    are judged in their own, with the user's request."""
    handler, backend, _ = _setup()
    ran: list[Any] = []
    turn = tool_calls_message(("read_file", {"path": "/srv/notes"}), ("delete_file", {"path": "/home/ex/docs"}), ids=["c1", "c2"])
    graph = _graph_with_a_side_model(scripted_model([turn, "done"]), scripted_model(["I will read a file, then delete one."]), ran, mode)
    config = {"callbacks": [handler]}
    with pytest.raises(ToolCallBlocked):
        graph.invoke({"messages": [HumanMessage(REQUEST)]}, config) if mode == "sync" else await graph.ainvoke({"messages": [HumanMessage(REQUEST)]}, config)
    assert ran == [("read_file", {"path": "/srv/notes"})], "the deletion ran on a judgment made without the user's request"
    assert [(d.tool_call.name, d.action.value) for d in handler.decisions] == [("read_file", "allow"), ("delete_file", "block")]
    assert backend.batches == [2], "the turn was judged once, as one batch"
    assert handler._root.turns == [], "a turn whose calls all started is let go"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_side_models_own_calls_are_a_turn_of_its_conversation(mode: str) -> None:
    """A side model that answers with a call (a router bound to tools) opens a turn of its
    own: the outer turn's calls are still judged in theirs, and the side call in the side
    model's conversation."""
    handler, backend, _ = _setup()
    config = {"callbacks": [handler]}
    tools = _tools([], [])
    outer = scripted_model([tool_calls_message(("delete_file", {"path": "/home/ex/docs"}), ids=["c1"])])
    side = scripted_model([tool_calls_message(("delete_file", {"path": "/tmp/cache"}), ids=["r1"])])
    messages = [HumanMessage(REQUEST)]
    side_input = [HumanMessage("Route this: clear the cache.")]
    if mode == "sync":
        reply = outer.invoke(messages, config)
        routed = side.invoke(side_input, config)
        with pytest.raises(ToolCallBlocked):
            tools["delete_file"].invoke(reply.tool_calls[0], config)
        tools["delete_file"].invoke(routed.tool_calls[0], config)
    else:
        reply = await outer.ainvoke(messages, config)
        routed = await side.ainvoke(side_input, config)
        with pytest.raises(ToolCallBlocked):
            await tools["delete_file"].ainvoke(reply.tool_calls[0], config)
        await tools["delete_file"].ainvoke(routed.tool_calls[0], config)
    assert [(d.tool_call.id, d.action.value) for d in handler.decisions] == [("c1", "block"), ("r1", "allow")]
    side_prompt = backend.requests[-1].messages[-1]["content"]
    assert "clear the cache" in side_prompt and "thesis" not in side_prompt


def test_turns_whose_calls_never_run_are_kept_to_a_bound() -> None:
    """A router's calls that never run, turn after turn, do not grow the handler."""
    handler, _, _ = _setup()
    config = {"callbacks": [handler]}
    replies = [tool_calls_message(("route", {"to": f"node {i}"}), ids=[f"r{i}"]) for i in range(MAX_OPEN_TURNS + 5)]
    model = scripted_model(replies)
    for _ in replies:
        model.invoke([HumanMessage("Route this.")], config)
    assert [turn.waiting[0].id for turn in handler._root.turns] == [f"r{i}" for i in range(5, MAX_OPEN_TURNS + 5)]


def test_runs_beside_each_other_on_one_handler_keep_their_turns_apart() -> None:
    """Two conversations interleaved on one handler: the second model's turn does not stand
    in for the first's when the first's tools start."""
    handler, _, _ = _setup()
    config = {"callbacks": [handler]}
    tools = _tools([], [])
    first = scripted_model([tool_calls_message(("delete_file", {"path": "/home/ex/docs"}), ids=["a1"])])
    second = scripted_model([tool_calls_message(("delete_file", {"path": "/tmp/cache"}), ids=["b1"])])
    reply_a = first.invoke([HumanMessage(REQUEST)], config)
    reply_b = second.invoke([HumanMessage("Clear the build cache, please.")], config)
    with pytest.raises(ToolCallBlocked):
        tools["delete_file"].invoke(reply_a.tool_calls[0], config)
    tools["delete_file"].invoke(reply_b.tool_calls[0], config)
    assert [(d.tool_call.id, d.action.value) for d in handler.decisions] == [("a1", "block"), ("b1", "allow")]


def _run_sql(ran: list[tuple[str, str]]) -> Any:
    @tool
    def run_sql(query: str, database: Annotated[str, InjectedToolArg] = "analytics") -> str:
        """Run a read query; the app chooses `database`."""
        ran.append((query, database))
        return "ok"

    return run_sql


_FORGED = tool_calls_message(("run_sql", {"query": "select 1", "database": "prod; DROP DATABASE prod"}), ids=["c1"])


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_model_value_for_an_injected_argument_is_judged_where_the_tool_gets_it(mode: str) -> None:
    """A plain loop runs the model's call as written: the tool gets the model's `database`,
    which LangChain leaves out of `on_tool_start`'s `inputs`."""
    guard, _ = make_guard(unsafe=("DROP",))
    handler = SodaGuardCallbackHandler(guard)
    config = {"callbacks": [handler]}
    ran: list[tuple[str, str]] = []
    run_sql = _run_sql(ran)
    model = scripted_model([_FORGED])
    with pytest.raises(ToolCallBlocked):
        if mode == "sync":
            run_sql.invoke(model.invoke([HumanMessage("count rows")], config).tool_calls[0], config)
        else:
            await run_sql.ainvoke((await model.ainvoke([HumanMessage("count rows")], config)).tool_calls[0], config)
    assert ran == []
    assert [(d.tool_call.args, d.action.value) for d in handler.decisions] == [
        ({"query": "select 1", "database": "prod; DROP DATABASE prod"}, "block")
    ]


def test_a_toolnode_call_with_a_model_value_for_an_injected_argument_is_judged_as_the_model_asked() -> None:
    """A ToolNode strips the model's value before the tool, a plain loop does not, and the
    callbacks of the two are the same: the handler judges what the model asked for."""
    guard, _ = make_guard(unsafe=("DROP",))
    handler = SodaGuardCallbackHandler(guard)
    config = {"callbacks": [handler]}
    ran: list[tuple[str, str]] = []
    reply = scripted_model([_FORGED]).invoke([HumanMessage("count rows")], config)
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([_run_sql(ran)]))
    builder.add_edge(START, "tools")
    with pytest.raises(ToolCallBlocked):
        builder.compile().invoke({"messages": [HumanMessage("count rows"), reply]}, config)
    assert ran == []


def test_a_call_started_again_after_a_block_is_judged_in_its_turns_conversation() -> None:
    """A tools node retried after the block (LangGraph's default `RetryPolicy` retries
    `ToolCallBlocked`): the second start of the call matched no waiting call and was judged in
    the latest model's input, a side model's, without the user's request, and ran."""
    handler, _, _ = _setup()
    ran: list[Any] = []
    turn = tool_calls_message(("delete_file", {"path": "/home/ex/docs"}), ids=["c1"])
    retry = RetryPolicy(max_attempts=2, initial_interval=0.01)
    graph = _graph_with_a_side_model(scripted_model([turn, "done"]), scripted_model(["I will delete a file."]), ran, "sync", retry)
    with pytest.raises(ToolCallBlocked):
        graph.invoke({"messages": [HumanMessage(REQUEST)]}, {"callbacks": [handler]})
    assert ran == []
    assert [(d.tool_call.id, d.action.value) for d in handler.decisions] == [("c1", "block"), ("c1", "block")]


def test_a_turn_past_the_open_bound_is_judged_in_its_own_conversation() -> None:
    """`MAX_OPEN_TURNS` router turns between the user's turn and its tool pushed that turn out,
    and its call was judged in the router's conversation: allowed."""
    handler, backend, _ = _setup()
    config = {"callbacks": [handler]}
    ran: list[str] = []
    tools = _tools(ran, [])
    reply = scripted_model([tool_calls_message(("delete_file", {"path": "/home/ex/docs"}), ids=["c1"])]).invoke([HumanMessage(REQUEST)], config)
    router = scripted_model([tool_calls_message(("route", {"to": "tools"}), ids=[f"r{i}"]) for i in range(MAX_OPEN_TURNS)])
    for _ in range(MAX_OPEN_TURNS):
        router.invoke([HumanMessage("Pick the next node.")], config)
    assert all(turn.calls[0].id != "c1" for turn in handler._root.turns)
    with pytest.raises(ToolCallBlocked):
        tools["delete_file"].invoke(reply.tool_calls[0], config)
    assert ran == [] and "thesis" in backend.requests[-1].messages[-1]["content"]


@pytest.mark.parametrize("order", ["listed", "reversed"])
def test_runs_that_may_be_more_than_one_call_take_the_strictest_decision(order: str) -> None:
    """Run by their arguments alone (no id), a forged call's start reports the same `inputs`
    as its benign sibling's (LangChain leaves the injected value out): it took the sibling's
    allow when it ran first. Each such start takes the strictest decision of the calls it may be
    (the benign one is refused too: by what the callbacks say, the two cannot be told apart)."""
    guard, _ = make_guard(unsafe=("DROP",))
    handler = SodaGuardCallbackHandler(guard)
    config = {"callbacks": [handler]}
    ran: list[tuple[str, str]] = []
    run_sql = _run_sql(ran)
    reply = scripted_model([tool_calls_message(
        ("run_sql", {"query": "select 1"}), ("run_sql", {"query": "select 1", "database": "prod; DROP DATABASE prod"}), ids=["y", "x"],
    )]).invoke([HumanMessage("count rows")], config)
    calls = reply.tool_calls if order == "listed" else reply.tool_calls[::-1]
    for call in calls:
        with pytest.raises(ToolCallBlocked):
            run_sql.invoke(call["args"], config)
    assert ("select 1", "prod; DROP DATABASE prod") not in ran and ran == []


_DELETE = ("delete_file", {"path": "/home/ex/docs"})
_SIDE_TURNS: dict[str, tuple[Any, str]] = {
    # what a side model (a planner bound to the same tools, ids numbered per turn) asked for
    "its own call under the same id": (("route", {"to": "tools"}), "c1"),
    "the same call under the same id": (_DELETE, "c1"),
    "the same call under its own id": (_DELETE, "s1"),
}


@pytest.mark.parametrize("side", list(_SIDE_TURNS))
@pytest.mark.parametrize("by", ["call", "arguments"])
@pytest.mark.parametrize("retry", ["first start", "started again"])
def test_a_side_turn_that_asked_for_the_same_call_or_id_does_not_decide_for_the_users(side: str, by: str, retry: str) -> None:
    """A side model's turn after the user's (or between a block and its retry) asked for the
    same call, or for another under the same id: the run was matched to the newest turn, or
    judged in its conversation, without the user's request, and the deletion ran."""
    handler, _, ran = _setup()
    config = {"callbacks": [handler]}
    tools = _tools(ran, [])
    call = scripted_model([tool_calls_message(_DELETE, ids=["c1"])]).invoke([HumanMessage(REQUEST)], config).tool_calls[0]
    run = call if by == "call" else call["args"]
    if retry == "started again":
        with pytest.raises(ToolCallBlocked):
            tools["delete_file"].invoke(run, config)
    asked, call_id = _SIDE_TURNS[side]
    scripted_model([tool_calls_message(asked, ids=[call_id])]).invoke(
        [SystemMessage("Describe the plan for the user."), HumanMessage("delete_file")], config
    )
    with pytest.raises(ToolCallBlocked):
        tools["delete_file"].invoke(run, config)
    assert ran == []


def test_a_forged_injected_value_takes_no_allow_from_a_side_turns_benign_call() -> None:
    """Run by its arguments, the user's turn's forged call starts as the benign call a later
    side turn asked for (LangChain leaves the injected value out): it took that allow."""
    guard, _ = make_guard(unsafe=("DROP",))
    handler = SodaGuardCallbackHandler(guard)
    config = {"callbacks": [handler]}
    ran: list[tuple[str, str]] = []
    run_sql = _run_sql(ran)
    reply = scripted_model([_FORGED]).invoke([HumanMessage("count rows")], config)
    scripted_model([tool_calls_message(("run_sql", {"query": "select 1"}), ids=["s"])]).invoke([SystemMessage("Plan a check query.")], config)
    with pytest.raises(ToolCallBlocked):
        run_sql.invoke(reply.tool_calls[0]["args"], config)
    assert ran == []


def test_a_run_whose_arguments_no_turn_asked_for_is_judged_in_the_turns_that_asked_for_its_tool() -> None:
    """Without an id and with arguments changed, a run matched no turn and was judged in the
    latest model's input: a side model's, without the user's request."""
    handler, _, ran = _setup()
    config = {"callbacks": [handler]}
    tools = _tools(ran, [])
    scripted_model([tool_calls_message(_DELETE, ids=["c1"])]).invoke([HumanMessage(REQUEST)], config)
    scripted_model([tool_calls_message(("route", {"to": "tools"}), ids=["s1"])]).invoke([HumanMessage("Pick the next node.")], config)
    with pytest.raises(ToolCallBlocked):
        tools["delete_file"].invoke({"path": "/home/ex/docs/"}, config)
    assert ran == []
