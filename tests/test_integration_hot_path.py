"""What a guarded agent pays for on every model turn is what its graph can use: a LangGraph
task (a checkpoint write) only where a node can pause for review and resume (a checkpointer
and a policy that can escalate), one task for the model call and its judgment together, and
a "soda_guard" trace run only when a tracer or callback handler listens. A resumed review
still neither calls the model nor judges again."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator
from uuid import UUID

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableLambda
from langgraph._internal._constants import RETURN
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.backends.base import GenerationRequest
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.testing import ScriptedChatModel

from integration_helpers import make_guard, make_tools
from test_integration_binding import config, turn

USER = {"messages": [{"role": "user", "content": "Tidy up."}]}
READ = ("read_file", {"path": "notes.txt"})
DELETE = ("delete_file", {"path": "/"})
MODES = ["sync", "async"]


def counted(replies: Iterable[Any], taken: list[Any]) -> Iterator[Any]:
    """The replies, each appended to `taken` when the chat model actually answers with it."""
    for reply in replies:
        taken.append(reply)
        yield reply


def agent_for(
    guard: Guard, replies: list[Any], ran: list[Any], taken: list[Any], saver: InMemorySaver | None, **model: Any
) -> Any:
    model = ScriptedChatModel(messages=counted(replies, taken), **model)
    return create_agent(model, make_tools(ran), middleware=[SodaGuardMiddleware(guard)], checkpointer=saver)


async def drive(mode: str, agent: Any, value: Any, run_config: dict[str, Any] | None = None) -> Any:
    return await agent.ainvoke(value, run_config) if mode == "async" else agent.invoke(value, run_config)


async def pushed_tasks(mode: str, agent: Any, value: Any, run_config: dict[str, Any] | None = None) -> list[str]:
    """The names of the LangGraph tasks (`@task`) the run started. The agent's tool calls are
    pushed too (`Send` to its "tools" node); a pushed "model" is the middleware's task, the
    "model" node itself is triggered by its edge."""
    chunks = (
        [chunk async for chunk in agent.astream(value, run_config, stream_mode="tasks")]
        if mode == "async"
        else list(agent.stream(value, run_config, stream_mode="tasks"))
    )
    pushed = [chunk["name"] for chunk in chunks if "result" not in chunk and chunk.get("triggers") == ("__pregel_push",)]
    return [name for name in pushed if name != "tools"]


def task_returns(saver: InMemorySaver) -> list[Any]:
    """Every task result the checkpointer keeps (LangGraph stores it as a pending write on
    the RETURN channel)."""
    return [
        saver.serde.loads_typed(value)
        for writes in saver.writes.values()
        for _, channel, value, _ in writes.values()
        if channel == RETURN
    ]


def model_turns(saver: InMemorySaver) -> list[dict[str, Any]]:
    """The task results that are a model call with its judgment ("messages" and "turn")."""
    return [r for r in task_returns(saver) if isinstance(r, dict) and {"messages", "turn"} <= r.keys()]


def qwen3guard_guard() -> tuple[Guard, ScriptedBackend]:
    """A qwen3guard judge (its policy escalates controversial by default) that calls a
    deletion controversial and anything else safe."""

    def respond(request: GenerationRequest) -> str:
        shown = json.dumps(request.messages)
        return f"Safety: {'Controversial' if 'delete_file' in shown else 'Safe'}\nCategories: None"

    backend = ScriptedBackend(respond)
    policy = Policy.from_dict({"judges": {"qwen": {"kind": "qwen3guard", "model": "scripted"}}})
    return Guard(policy, backends={"qwen": backend}), backend


ESCALATING = {
    "soda-on_unsafe-escalate": lambda: make_guard(defaults={"on_unsafe": "escalate"}),
    "qwen3guard-controversial": qwen3guard_guard,
}


@pytest.mark.parametrize("mode", MODES)
async def test_a_policy_that_cannot_escalate_writes_no_task_to_the_checkpointer(mode: str) -> None:
    guard, backend = make_guard()
    assert not guard.policy.can_escalate()
    ran: list[Any] = []
    saver = InMemorySaver()
    agent = agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], saver)
    result = await drive(mode, agent, USER, config())
    assert ran == [READ] and len(backend.requests) == 2
    blocked = next(m for m in result["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == "d")
    assert blocked.status == "error" and blocked.response_metadata["soda_guard"]["action"] == "block"
    assert saver.writes and task_returns(saver) == []


@pytest.mark.parametrize("make", ESCALATING.values(), ids=ESCALATING.keys())
@pytest.mark.parametrize("mode", MODES)
async def test_an_escalating_policy_records_each_model_turn_as_one_task_and_resumes_without_judging_again(
    mode: str, make: Any
) -> None:
    guard, backend = make()
    assert guard.policy.can_escalate()
    ran: list[Any] = []
    taken: list[Any] = []
    saver = InMemorySaver()
    agent = agent_for(guard, [turn(READ, ids=["r"]), turn(DELETE, ids=["d"]), "done"], ran, taken, saver)
    tasks = await pushed_tasks(mode, agent, USER, config())
    assert tasks.count("model") == 2 and "soda_guard_judgment" not in tasks and "soda_guard_question" in tasks
    assert ran == [READ] and len(taken) == 2 and len(backend.requests) == 2
    [pause] = agent.get_state(config()).interrupts
    assert [request["name"] for request in pause.value["action_requests"]] == ["delete_file"]
    turns = model_turns(saver)
    assert [[r["call"]["id"] for r in t["turn"]["records"]] for t in turns] == [["r"], ["d"]]
    kept = turns[1]["turn"]["records"][0]["decision"]["verdict"]
    assert "raw_output" not in kept and kept["label"] in ("unsafe", "controversial")  # the audit sinks hold the rest

    result = await drive(mode, agent, Command(resume={"decisions": [{"type": "approve"}]}), config())
    assert ran == [READ, DELETE]
    assert len(backend.requests) == 2, "the resumed node judged the turn again"
    assert len(taken) == 3 and taken[-1] == "done", "the resumed node called the model again"
    assert result["messages"][-1].content == "done"
    assert len(model_turns(saver)) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_without_a_checkpointer_the_agent_judges_without_tasks(mode: str) -> None:
    guard, backend = make_guard(defaults={"on_error": "escalate"})
    assert guard.policy.can_escalate()
    ran: list[Any] = []
    agent = agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], None)
    assert await pushed_tasks(mode, agent, USER) == []
    assert ran == [READ] and len(backend.requests) == 2
    result = await drive(mode, agent_for(guard, [turn(DELETE, ids=["d"]), "done"], ran, [], None), USER)
    assert ran == [READ] and len(backend.requests) == 3
    [blocked] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert blocked.response_metadata["soda_guard"]["action"] == "block"


class ChainRuns(BaseCallbackHandler):
    """Records every chain run's name and output."""

    def __init__(self) -> None:
        self.names: dict[UUID, str | None] = {}
        self.outputs: dict[UUID, Any] = {}

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, name: str | None = None, **kwargs: Any) -> None:
        self.names[run_id] = name or (serialized or {}).get("name")

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.outputs[run_id] = outputs

    def outputs_of(self, name: str) -> list[Any]:
        return [self.outputs.get(run_id) for run_id, named in self.names.items() if named == name]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The names of the runnables the guard builds for its trace runs, with LangSmith tracing off."""
    for variable in ("LANGSMITH_TRACING", "LANGSMITH_TRACING_V2", "LANGCHAIN_TRACING", "LANGCHAIN_TRACING_V2"):
        monkeypatch.delenv(variable, raising=False)
    names: list[str | None] = []

    def counting(*args: Any, **kwargs: Any) -> RunnableLambda:
        names.append(kwargs.get("name"))
        return RunnableLambda(*args, **kwargs)

    monkeypatch.setattr("soda_guard.integrations._enforce.RunnableLambda", counting)
    return names


@pytest.mark.parametrize("mode", MODES)
async def test_no_soda_guard_run_is_built_when_nobody_listens(mode: str, built: list[str | None]) -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    await drive(mode, agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], InMemorySaver()), USER, config())
    assert ran == [READ] and len(backend.requests) == 2
    assert built == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_callback_handler_sees_the_soda_guard_run_with_its_decisions(mode: str, built: list[str | None]) -> None:
    guard, _ = make_guard()
    ran: list[Any] = []
    handler = ChainRuns()
    agent = agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], InMemorySaver())
    await drive(mode, agent, USER, {**config(), "callbacks": [handler]})
    assert ran == [READ] and built and set(built) == {"soda_guard"}
    [output] = handler.outputs_of("soda_guard")
    assert [(d["tool_call"]["id"], d["action"]) for d in output["decisions"]] == [("r", "allow"), ("d", "block")]


@pytest.mark.parametrize("mode", MODES)
async def test_streaming_messages_alone_builds_no_soda_guard_run(mode: str, built: list[str | None]) -> None:
    """LangGraph's handler for `stream_mode="messages"` reads chat model runs only."""
    guard, backend = make_guard()
    ran: list[Any] = []
    # not streamed token by token (the scripted model's stream drops tool calls); the
    # messages handler is on the run all the same
    agent = agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], InMemorySaver(), disable_streaming=True)
    if mode == "async":
        streamed = [message async for message, _ in agent.astream(USER, config(), stream_mode="messages")]
    else:
        streamed = [message for message, _ in agent.stream(USER, config(), stream_mode="messages")]
    assert [call["id"] for message in streamed for call in getattr(message, "tool_calls", [])] == ["r", "d"]
    assert ran == [READ] and len(backend.requests) == 2
    assert built == []


async def test_with_langsmith_tracing_off_the_async_hooks_cost_no_thread_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """`create_agent` wraps each middleware hook in LangSmith's `traceable`, whose async wrapper
    hands the span's start and end to executor threads even with tracing off: two hops per
    hook call, four per turn. The guard's hooks get the sync wrapper instead, and still judge
    and enforce every call."""
    import asyncio
    import functools

    for variable in ("LANGSMITH_TRACING", "LANGSMITH_TRACING_V2", "LANGCHAIN_TRACING", "LANGCHAIN_TRACING_V2"):
        monkeypatch.delenv(variable, raising=False)
    handed: list[str] = []
    run_in_executor = asyncio.BaseEventLoop.run_in_executor

    def counting(self: Any, executor: Any, func: Any, *args: Any) -> Any:
        inner = func.args if isinstance(func, functools.partial) else ()
        handed.extend(f.__name__ for f in inner if getattr(f, "__module__", "") == "langsmith.run_helpers")
        return run_in_executor(self, executor, func, *args)

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counting)
    guard, backend = make_guard()
    ran: list[Any] = []
    agent = agent_for(guard, [turn(READ, DELETE, ids=["r", "d"]), "done"], ran, [], InMemorySaver())
    result = await agent.ainvoke(USER, config())
    assert handed == [] and ran == [READ] and len(backend.requests) == 2
    assert [m.status for m in result["messages"] if isinstance(m, ToolMessage)] == ["success", "error"]


def test_with_langsmith_tracing_on_the_async_hooks_stay_coroutines_for_whole_spans() -> None:
    import inspect

    from langsmith import tracing_context

    guard, _ = make_guard()
    with tracing_context(enabled=True):
        traced = SodaGuardMiddleware(guard)
    with tracing_context(enabled=False):
        untraced = SodaGuardMiddleware(guard)
    assert inspect.iscoroutinefunction(traced.awrap_model_call) and inspect.iscoroutinefunction(traced.awrap_tool_call)
    assert not inspect.iscoroutinefunction(untraced.awrap_model_call)
    assert not inspect.iscoroutinefunction(untraced.awrap_tool_call)


async def test_a_subclass_keeps_its_own_async_hooks() -> None:
    seen: list[str] = []

    class Counting(SodaGuardMiddleware):
        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            seen.append("model")
            return await super().awrap_model_call(request, handler)

        async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
            seen.append("tool")
            return await super().awrap_tool_call(request, handler)

    guard, _ = make_guard()
    ran: list[Any] = []
    model = ScriptedChatModel(messages=iter([turn(READ, DELETE, ids=["r", "d"]), "done"]))
    agent = create_agent(model, make_tools(ran), middleware=[Counting(guard)], checkpointer=InMemorySaver())
    await agent.ainvoke(USER, config())
    assert ran == [READ] and sorted(seen) == ["model", "model", "tool", "tool"]


@pytest.mark.parametrize("tracing", [False, True], ids=["tracing-off", "tracing-on"])
def test_the_hooks_carry_their_signature_for_langsmiths_wrapper(tracing: bool) -> None:
    """LangSmith's `traceable` wrapper, which `create_agent` puts around every hook, reads the
    hook's signature at every call: the hooks carry it (a bound method's is rebuilt each
    time), with the method's own parameters, and nothing for it to follow back to the method."""
    import inspect

    from langsmith import tracing_context

    guard, _ = make_guard()
    with tracing_context(enabled=tracing):
        middleware = SodaGuardMiddleware(guard)
    hooks = ["wrap_model_call", "wrap_tool_call"] + ([] if tracing else ["awrap_model_call", "awrap_tool_call"])
    for name in hooks:
        hook = getattr(middleware, name)
        method = getattr(SodaGuardMiddleware, name)
        assert "__signature__" in vars(hook) and not hasattr(hook, "__wrapped__")
        assert list(inspect.signature(hook).parameters) == ["request", "handler"]
        assert inspect.signature(hook).parameters["handler"] == inspect.signature(method).parameters["handler"]
        assert hook.__name__ == name


def test_a_subclass_keeps_its_own_sync_hooks() -> None:
    seen: list[str] = []

    class Counting(SodaGuardMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            seen.append("model")
            return super().wrap_model_call(request, handler)

        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            seen.append("tool")
            return super().wrap_tool_call(request, handler)

    guard, _ = make_guard()
    ran: list[Any] = []
    model = ScriptedChatModel(messages=iter([turn(READ, DELETE, ids=["r", "d"]), "done"]))
    agent = create_agent(model, make_tools(ran), middleware=[Counting(guard)], checkpointer=InMemorySaver())
    result = agent.invoke(USER, config())
    assert ran == [READ] and sorted(seen) == ["model", "model", "tool", "tool"]
    assert [m.status for m in result["messages"] if isinstance(m, ToolMessage)] == ["success", "error"]
