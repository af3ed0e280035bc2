"""Warming the judge while the agent's model thinks (`Guard.warm_up`): it prefills the judge's
prefix cache with the conversation so far, never waits, never changes a verdict, and a newer
warm-up of a conversation supersedes an older one still queued."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import pytest

from soda_guard import Guard, Policy, ScriptedBackend, from_openai_messages
from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.backends.prefill import LatestPerKey
from soda_guard.backends.scripted import soda_reply
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.integrations.testing import ScriptedChatModel
from soda_guard.testing import make_tiny_judge
from soda_guard.trajectory import AssistantStep, ToolCall, Trajectory

POLICY = {"judges": {"soda": {"kind": "soda", "model": "tiny"}}}


def _history(tag: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": f"{tag}: tidy the shared drive."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "list_files", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "report.pdf (2 MB)\n" * 40},
    ]


def _with_action(conversation: Trajectory) -> Trajectory:
    action = AssistantStep(content="Deleting.", tool_calls=[ToolCall(id="b", name="delete_file", args={"path": "/share"})])
    return conversation.model_copy(update={"steps": [*conversation.steps, action]})


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("warm-judge"), seed=3, initializer_range=0.3)


@pytest.fixture
def guards(judge_dir: Path) -> Iterator[tuple[Guard, Guard]]:
    made = [TransformersBackend(str(judge_dir), device="cpu", dtype="float32") for _ in range(2)]
    guards = tuple(Guard(Policy.from_dict(POLICY), backends={"soda": backend}) for backend in made)
    for guard in guards:
        guard.runner("soda")
    yield guards  # type: ignore[misc]
    for guard, backend in zip(guards, made):
        guard.close()
        backend.close()


def test_warming_changes_no_verdict_and_leaves_only_the_action_to_prefill(guards: tuple[Guard, Guard]) -> None:
    cold, warm = guards
    conversation = from_openai_messages(_history("w"), conversation_id="w")
    started = warm.warm_up(conversation)
    assert started is not None
    (prefilled,) = started.result(timeout=60)
    prefilled.result(timeout=60)
    backend = warm.runner("soda").backend
    assert isinstance(backend, TransformersBackend)
    before = backend.stats.prefilled_tokens
    warmed = warm.check_tool_calls(_with_action(conversation))[0]
    unwarmed = cold.check_tool_calls(_with_action(conversation))[0]
    assert warmed.verdict is not None and unwarmed.verdict is not None
    assert (warmed.action, warmed.verdict.raw_output, warmed.verdict.score, warmed.verdict.label) == (
        unwarmed.action,
        unwarmed.verdict.raw_output,
        unwarmed.verdict.score,
        unwarmed.verdict.label,
    )
    cold_backend = cold.runner("soda").backend
    assert isinstance(cold_backend, TransformersBackend)
    assert backend.stats.prefilled_tokens - before < cold_backend.stats.prefilled_tokens / 4


def test_warm_up_returns_while_the_conversation_is_still_being_built(guards: tuple[Guard, Guard]) -> None:
    guard = guards[0]
    release = threading.Event()

    def conversation() -> Trajectory:
        release.wait(30)
        return from_openai_messages(_history("slow"), conversation_id="slow")

    started = guard.warm_up(conversation)
    assert started is not None and not started.done()  # returned, the warm-up thread still waiting
    release.set()
    started.result(timeout=60)


def test_a_newer_warm_up_cancels_the_older_one_still_queued() -> None:
    pending = LatestPerKey()
    older: Future[None] = Future()
    newer: Future[None] = Future()
    other: Future[None] = Future()
    pending.replace("c", older)
    pending.replace("d", other)
    pending.replace("c", newer)
    assert older.cancelled() and not newer.cancelled() and not other.cancelled()
    newer.set_result(None)
    other.set_result(None)
    assert len(pending) == 0


def test_nothing_is_warmed_where_no_backend_can_prefill() -> None:
    guard = Guard(Policy.from_dict(POLICY), backends={"soda": ScriptedBackend([soda_reply(False)])})
    guard.runner("soda")
    assert guard.warm_up(from_openai_messages(_history("s"), conversation_id="s")) is None


def test_the_http_warm_up_is_off_by_default_and_asks_for_one_token_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}], cache_key="c")
    assert OpenAIBackend("judge", base_url="http://127.0.0.1:9/v1").prefill(request) is None
    sent: list[dict[str, Any]] = []
    backend = OpenAIBackend("judge", base_url="http://127.0.0.1:9/v1", warm_up=True)
    monkeypatch.setattr(backend, "_send", lambda client, server, body, deadline, request: sent.append(body))
    future = backend.prefill(request)
    assert future is not None
    future.result(timeout=10)
    assert sent == [{"model": "judge", "messages": request.messages, "temperature": 0, "max_tokens": 1}]
    backend.close()


class _Prefilling(ScriptedBackend):
    """A scripted judge that can be warmed: it records what each warm-up would prefill, and
    `ready` counts the warm-ups that have reached it."""

    def __init__(self, reply: str = soda_reply(False)) -> None:
        super().__init__([reply])
        self.warmed: list[GenerationRequest] = []
        self.ready = threading.Semaphore(0)

    def prefill(self, request: GenerationRequest) -> None:
        self.warmed.append(request)
        self.ready.release()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_middleware_warms_the_judge_before_each_model_call(asynchronous: bool) -> None:
    import asyncio

    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    from soda_guard.integrations.langchain import SodaGuardMiddleware
    from soda_guard.integrations.testing import scripted_model, tool_calls_message

    from integration_helpers import make_tools

    backend = _Prefilling()
    guard = Guard(Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}}), backends={"soda": backend})
    guard.runner("soda")
    ran: list[Any] = []
    replies = [tool_calls_message(("read_file", {"path": "notes.txt"})), "Done."]
    agent = create_agent(scripted_model(replies), make_tools(ran), middleware=[SodaGuardMiddleware(guard)], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t1"}}
    user = {"messages": [{"role": "user", "content": "Read my notes."}]}
    if asynchronous:
        asyncio.run(agent.ainvoke(user, config))
    else:
        agent.invoke(user, config)
    guard._warmer.shutdown(wait=True)  # the warm-ups queued have run
    guard.close()
    prompts = [request.messages[-1]["content"] for request in backend.warmed]
    assert [request.cache_key for request in backend.warmed] == ["t1", "t1"]
    assert "[TOOL]" not in prompts[0] and "[TOOL]" in prompts[1]  # the second model call came after the tool ran
    assert ran == [("read_file", {"path": "notes.txt"})]


def test_a_warm_up_renders_the_latest_action_s_copy_in_the_coming_one_s_place() -> None:
    """How much a judge leaves out past its budget depends on the action's length: the
    warm-up's stand-in is as long as the latest action (a new step, so that no record of the
    judge holds the conversation's own step twice), or an empty turn where there is none."""
    from soda_guard.judging import awaiting_action

    conversation = from_openai_messages(_history("s"), conversation_id="s")
    steps = list(conversation.steps)
    warmed = awaiting_action(conversation)
    latest = conversation.steps[1]
    stand_in = warmed.steps[-1]
    assert all(a is b for a, b in zip(warmed.steps[:-1], steps, strict=True))
    assert type(stand_in) is AssistantStep and stand_in is not latest
    assert (stand_in.content, stand_in.tool_calls) == (latest.content, latest.tool_calls)
    assert conversation.steps == steps  # the trajectory warmed is left as it was
    first = from_openai_messages([{"role": "user", "content": "Tidy the shared drive."}], conversation_id="s")
    assert awaiting_action(first).steps[-1] == AssistantStep()


class _Thinking(ScriptedChatModel):
    """The agent's model, thinking until the warm-up its call started has been queued to the
    backend (the judge rendered its prompt), as a real model thinks longer than that takes."""

    backend: Any = None

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        assert self.backend.ready.acquire(timeout=30)
        return super()._generate(*args, **kwargs)  # `ainvoke` too: on an executor thread


def _read_email(id: int) -> str:
    return f"From: billing{id}@example.com\nAmount due: {id} EUR\n" * 40


def _inbox_run(backend: ScriptedBackend, kind: str, path: str, turns: int) -> None:
    """An agent reading `turns` emails one by one, through the middleware (`invoke` or
    `ainvoke`), a hand-built graph whose model node warms the judges (`warm_judges`) with the
    guard node or the `ToolNode` wrapper alone, or a hand-written loop with the callback
    handler."""
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import StructuredTool
    from langgraph.checkpoint.memory import InMemorySaver

    from soda_guard.integrations.langchain import SodaGuardCallbackHandler, SodaGuardMiddleware
    from soda_guard.integrations.testing import tool_calls_message

    judge = {"kind": kind, "model": "scripted", "max_prompt_chars": 8192}
    guard = Guard(Policy.from_dict({"judges": {"judge": judge}, "defaults": {"judge": "judge"}}), backends={"judge": backend})
    guard.runner("judge")
    replies = [tool_calls_message(("read_email", {"id": turn}), text=f"Reading email {turn}.") for turn in range(turns)] + ["Done."]
    model = _Thinking(messages=iter(replies), backend=backend) if isinstance(backend, _Prefilling) else ScriptedChatModel(messages=iter(replies))
    tool = StructuredTool.from_function(_read_email, name="read_email", description="Read an email.")
    if path == "callback":
        config: dict[str, Any] = {"callbacks": [SodaGuardCallbackHandler(guard, conversation_id="inbox")]}
        messages: list[Any] = [HumanMessage("Summarise my inbox.")]
        while (reply := model.invoke(messages, config)).tool_calls:
            messages += [reply, *(tool.invoke(call, config) for call in reply.tool_calls)]
    elif path in ("guard_node", "guard_node-async", "wrapper"):
        from langgraph.graph import START, StateGraph
        from langgraph.prebuilt import ToolNode, tools_condition

        from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node, warm_judges

        def call_model(state: GuardState) -> dict[str, Any]:
            warm_judges(guard, state["messages"])
            return {"messages": [model.invoke(state["messages"])]}

        async def acall_model(state: GuardState) -> dict[str, Any]:
            warm_judges(guard, state["messages"])
            return {"messages": [await model.ainvoke(state["messages"])]}

        wrapper = SodaGuardToolWrapper(guard)
        builder = StateGraph(GuardState)
        builder.add_node("agent", acall_model if path.endswith("async") else call_model)
        builder.add_node("tools", ToolNode([tool], wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
        builder.add_edge(START, "agent")
        builder.add_edge("tools", "agent")
        if path.startswith("guard_node"):
            builder.add_node("guard", guard_node(guard))
            builder.add_edge("agent", "guard")
        else:
            builder.add_conditional_edges("agent", tools_condition)
        graph = builder.compile(checkpointer=InMemorySaver())
        start = {"messages": [{"role": "user", "content": "Summarise my inbox."}]}
        config = {"configurable": {"thread_id": "inbox"}}
        if path.endswith("async"):
            asyncio.run(graph.ainvoke(start, config))
        else:
            graph.invoke(start, config)
    else:
        agent = create_agent(model, [tool], middleware=[SodaGuardMiddleware(guard)], checkpointer=InMemorySaver())
        user = {"messages": [{"role": "user", "content": "Summarise my inbox."}]}
        config = {"configurable": {"thread_id": "inbox"}}
        if path == "middleware-async":
            asyncio.run(agent.ainvoke(user, config))
        else:
            agent.invoke(user, config)
    guard.close()


@pytest.mark.parametrize("path", ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "callback"])
@pytest.mark.parametrize("kind", ["soda", "qwen3guard"])
def test_a_warmed_judge_renders_only_the_action_at_the_tool_call(kind: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up at the model call renders the history every call of the turn is judged
    on, past the judge's budget too (walk, elision), and leaves out of it what the coming
    action will need left out where that action is about as long as the latest one
    (`awaiting_action`): the judgment then prepares nothing, not even on the turn whose
    action takes the prompt past the budget, and its prompts are those of a judge never
    warmed."""
    from soda_guard.judges import elision, incremental

    reply = soda_reply(False) if kind == "soda" else "Safety: Safe\nCategories: None"
    cold, warm = ScriptedBackend([reply]), _Prefilling(reply)
    prepared: list[tuple[bool, str]] = []  # (on the warm-up thread, what)
    for owner, name in ((incremental.PreparedHistory, "__init__"), (incremental.PreparedHistory, "extended"), (elision.Walk, "made"), (elision.Walk, "continued"), (elision.Elision, "made"), (elision.Elision, "following")):
        found = owner.__dict__[name]
        original = found.__func__ if isinstance(found, classmethod) else found

        def counted(*args: Any, _original: Any = original, _name: str = f"{owner.__name__}.{name}", **kwargs: Any) -> Any:
            prepared.append((threading.current_thread().name.startswith("soda-guard-warm-up"), _name))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(counted) if isinstance(found, classmethod) else counted)
    _inbox_run(cold, kind, path, turns=8)
    prepared.clear()
    _inbox_run(warm, kind, path, turns=8)
    assert len(warm.requests) == 8 and "Amount due: 6 EUR" in str(warm.requests[-1].messages)
    assert [request.messages for request in warm.requests] == [request.messages for request in cold.requests]
    assert [name for warming, name in prepared if not warming] == []
    assert [name for _, name in prepared].count("Walk.continued") >= 3  # past the budget, turn after turn


def test_the_callback_handler_warms_the_conversation_as_it_was_when_the_model_was_called() -> None:
    """The warm-up runs later, on its own thread, while the handler appends the model's answer
    to the conversation it follows: the warm-up renders the steps the model was called with."""
    from langchain_core.messages import HumanMessage

    from soda_guard.integrations.langchain import SodaGuardCallbackHandler
    from soda_guard.integrations.testing import scripted_model, tool_calls_message

    from integration_helpers import make_tools

    backend = _Prefilling()
    guard = Guard(Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}}), backends={"soda": backend})
    guard.runner("soda")
    held = threading.Event()
    guard._warmer.submit(held.wait, 30)  # the warm-up thread busy until the model has answered
    ran: list[Any] = []
    tools = {tool.name: tool for tool in make_tools(ran)}
    config: dict[str, Any] = {"callbacks": [SodaGuardCallbackHandler(guard, conversation_id="cb")]}
    reply = scripted_model([tool_calls_message(("read_file", {"path": "notes.txt"}), text="Opening the notes.")]).invoke([HumanMessage("Read my notes.")], config)
    held.set()
    tools["read_file"].invoke(reply.tool_calls[0], config)
    guard._warmer.shutdown(wait=True)
    guard.close()
    assert ran == [("read_file", {"path": "notes.txt"})]
    assert [request.cache_key for request in backend.warmed] == ["cb"]
    assert "Read my notes." in backend.warmed[0].messages[-1]["content"]
    assert "Opening the notes." not in backend.warmed[0].messages[-1]["content"]


def test_the_judge_config_flag_turns_the_http_warm_up_on() -> None:
    from soda_guard.judging import make_backend
    from soda_guard.policy import JudgeConfig

    for flag in (False, True):
        config = JudgeConfig(kind="soda", model="judge", backend="openai", base_url="http://127.0.0.1:9/v1", warm_up=flag)
        backend = make_backend(config)
        assert isinstance(backend, OpenAIBackend) and backend.warm_up is flag


def test_http_warm_ups_never_take_more_than_half_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    backend = OpenAIBackend("judge", base_url="http://127.0.0.1:9/v1", warm_up=True, max_concurrency=4)
    monkeypatch.setattr(backend, "_send", lambda client, server, body, deadline, request: release.wait(30))
    started = [backend.prefill(GenerationRequest(messages=[{"role": "user", "content": "x"}], cache_key=f"c{n}")) for n in range(4)]
    assert [future is not None for future in started] == [True, True, False, False]
    release.set()
    for future in started[:2]:
        assert future is not None
        future.result(timeout=10)
    backend.close()


@pytest.mark.parametrize("workers,at_once,sent", [(1, 1, 0), (8, 16, 4)])
def test_http_warm_ups_counted_together_never_take_half_the_workers(monkeypatch: pytest.MonkeyPatch, workers: int, at_once: int, sent: int) -> None:
    """One worker took one warm-up, and a stalled one left the judgment no worker; warm-ups
    sent from several threads at once were each counted before any was registered, and all
    went out."""
    release = threading.Event()
    backend = OpenAIBackend("judge", base_url="http://127.0.0.1:9/v1", warm_up=True, max_concurrency=workers)
    monkeypatch.setattr(backend, "_send", lambda client, server, body, deadline, request: release.wait(30))
    gate = threading.Barrier(at_once)
    started: list[Any] = []

    def warm(n: int) -> None:
        gate.wait(10)
        started.append(backend.prefill(GenerationRequest(messages=[{"role": "user", "content": "x"}], cache_key=f"c{n}")))

    threads = [threading.Thread(target=warm, args=(n,)) for n in range(at_once)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    release.set()
    assert sum(future is not None for future in started) == sent
    backend.close()


def test_a_judge_loaded_after_the_first_question_is_warmed_from_then_on() -> None:
    """What can be warmed is asked before every model call and remembered: a judge that loads
    later (on first use) is found the next time it is asked."""
    policy = Policy.from_dict(
        {"judges": {"soda": {"kind": "soda", "model": "judge", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "warm_up": True}}}
    )
    guard = Guard(policy)
    assert guard.warmable() == ()
    guard.runner("soda")
    assert guard.warmable() == (guard.runner("soda"),)
    guard.close()
