"""Issue 20 item 2: a block given is never dropped. A chat model that runs inside a tool (a
summariser, a sub-agent) reaches the callback handler too, since callbacks propagate into child
runs; it gets a trajectory of its own and leaves the outer turn's decisions and request alone."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool, tool

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.backends.scripted import soda_reply
from soda_guard.generation import GenerationRequest, GenerationResult
from soda_guard.integrations.langchain import SodaGuardCallbackHandler, ToolCallBlocked
from soda_guard.integrations.testing import scripted_model, tool_calls_message
from soda_guard.trajectory import UserStep

from integration_helpers import make_guard

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
