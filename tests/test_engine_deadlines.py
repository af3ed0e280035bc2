"""Abandoned in-process judgments stop costing work (issue 15): the deadline travels on the
request, the batcher fails an expired request before it starts, the decode loop drops a row
between steps once its deadline passes, and the backend never waits without one. The engine's
clock is a counter advanced by decode steps, so what is checked is which step dropped a row,
not how long anything took."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from soda_guard import SodaJudge, from_openai_messages
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.engine.decode import Engine
from soda_guard.engine.naive import naive_generate
from soda_guard.testing import make_tiny_judge


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("deadline-judge"), seed=3, initializer_range=0.3)


def request(name: str, max_new_tokens: int = 12, deadline: float | None = None) -> GenerationRequest:
    trajectory = from_openai_messages([{"role": "user", "content": f"{name}: wipe the shared drive"}])
    return GenerationRequest(SodaJudge().render(trajectory).messages, max_new_tokens, None, name, deadline)


class StepClock:
    """Time is the number of decode steps taken so far."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_decode_loop_drops_an_abandoned_row_at_the_step_its_deadline_passes(model_dir: Path) -> None:
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", ignore_eos=True)
    clock = StepClock()
    engine = Engine(backend.model, backend.tokenizer, backend.device, ignore_eos=True, clock=clock)
    step = engine._step

    def counted_step(*args: object) -> object:
        clock.now += 1
        return step(*args)  # type: ignore[arg-type]

    engine._step = counted_step  # type: ignore[method-assign]
    live, given_up = request("alice", 20), request("bob", 20, deadline=3.0)
    answers: dict[int, GenerationResult | BaseException] = {}
    engine.run([engine.job(live), engine.job(given_up)], answers.__setitem__)
    try:
        assert isinstance(answers[1], TimeoutError)
        assert isinstance(answers[0], GenerationResult) and answers[0].generated_tokens == 20
        assert answers[0].text == naive_generate(backend.model, backend.tokenizer, live, ignore_eos=True).text
        # 19 steps for the live row; the abandoned one was decoded in steps 1..3 only, not 19
        assert engine.stats.row_steps == 19 + 3
        assert engine.stats.abandoned == 1
    finally:
        backend.close()


def test_an_expired_request_is_never_prefilled_and_the_caller_hears_at_once(model_dir: Path) -> None:
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32")
    try:
        backend.generate([request("warmup", 2)])
        before = backend.stats.prompt_tokens
        with pytest.raises(TimeoutError):
            backend.generate([request("late", deadline=time.monotonic() - 1.0)])
        with pytest.raises(TimeoutError):
            asyncio.run(backend.agenerate([request("late-async", deadline=time.monotonic() - 1.0)]))
        assert backend.stats.prompt_tokens == before and backend.stats.row_steps > 0
        assert backend.engine.stats.abandoned == 0  # the batcher dropped them, not the engine
    finally:
        backend.close()


def test_a_request_without_a_deadline_gets_the_backends_own(model_dir: Path) -> None:
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", timeout_s=0.0)
    try:
        with pytest.raises(TimeoutError):
            backend.generate([request("no-deadline")])
        assert backend.stats.prompt_tokens == 0
    finally:
        backend.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_guard_puts_its_deadline_on_every_request(mode: str) -> None:
    from soda_guard import Guard, Policy, ScriptedBackend
    from soda_guard.backends.scripted import soda_reply

    policy = Policy.from_yaml(POLICY)
    backend = ScriptedBackend([soda_reply(False)])
    guard = Guard(policy, backends={"soda": backend})
    trajectory = from_openai_messages([
        {"role": "user", "content": "tidy up"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "function": {"name": "delete_file", "arguments": "{}"}},
            {"id": "b", "function": {"name": "copy_file", "arguments": "{}"}},
        ]},
    ])
    before = time.monotonic()
    if mode == "sync":
        guard.check_tool_calls(trajectory)
    else:
        asyncio.run(guard.acheck_tool_calls(trajectory))
    after = time.monotonic()
    guard.close()
    assert len(backend.requests) == 2
    for sent in backend.requests:
        assert sent.deadline is not None
        assert before + policy.defaults.timeout_s <= sent.deadline <= after + policy.defaults.timeout_s


POLICY = """
version: 1
judges:
  soda: {kind: soda, model: scripted-judge}
defaults: {on_unsafe: block, on_error: block, timeout_s: 7}
rules:
  - {tools: ["*"]}
"""


class CallClock:
    """Time is the number of times the engine has looked at the clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_prefill_whose_deadline_passes_stops_between_two_layers_and_keeps_nothing(tmp_path: Path) -> None:
    """The engine looks at a row's deadline before each layer of its prefill: a long prompt
    nobody waits for any more stops within a layer's work (it went on for seconds past the
    deadline, holding every judgment queued behind it). Nothing of it is kept: asked again,
    the same prompt is prefilled whole and answers as the model does."""
    backend = TransformersBackend(str(make_tiny_judge(tmp_path, seed=3, num_hidden_layers=6)), device="cpu", dtype="float32", ignore_eos=True)
    clock = CallClock()
    engine = Engine(backend.model, backend.tokenizer, backend.device, ignore_eos=True, clock=clock)
    given_up = request("carol", 8, deadline=3.5)  # looked at before the prefill (1), then before layers 2, 3 (2, 3), 4 (4: past)
    answers: dict[int, GenerationResult | BaseException] = {}
    engine.run([engine.job(given_up)], answers.__setitem__)
    assert isinstance(answers[0], TimeoutError) and engine.stats.abandoned == 1
    assert clock.now == 4.0 and engine.stats.prefilled_tokens == 0 and engine.stats.row_steps == 0
    assert engine.cache is not None and len(engine.cache) == 0
    again = request("carol", 8)
    engine.run([engine.job(again)], answers.__setitem__)
    assert isinstance(answers[0], GenerationResult)
    assert answers[0].text == naive_generate(backend.model, backend.tokenizer, again, ignore_eos=True).text


async def test_a_judgment_cancelled_while_its_prompt_is_tokenised_is_not_run(model_dir: Path) -> None:
    """`agenerate` tokenises on a worker thread; a cancel that lands there left the jobs it then
    queued unowned, and the engine decoded the whole judgment, holding the worker."""
    import threading

    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", ignore_eos=True)
    backend.generate([request("warm", 1)])
    entered, release = threading.Event(), threading.Event()
    job = backend.engine.job

    def held_job(item: GenerationRequest) -> object:
        entered.set()
        release.wait(10)
        return job(item)

    backend.engine.job = held_job  # type: ignore[method-assign]
    cancelled = request("carol", 200)
    steps = backend.stats.row_steps
    try:
        task = asyncio.create_task(backend.agenerate([cancelled]))
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert cancelled.cancelled.is_set()
        backend.generate([request("after", 2)])  # behind whatever the cancelled one left queued
        assert backend.stats.row_steps - steps < 10, "the cancelled judgment was decoded"
    finally:
        release.set()
        backend.close()


def test_an_answered_callers_request_is_not_marked_cancelled_by_close(model_dir: Path) -> None:
    """`close` abandoned every row of the batch in hand, answered ones too: the caller's request
    (whose cancel flag the job shares) then read as cancelled, and reused it failed at once."""
    from soda_guard.engine.batcher import MicroBatcher

    answered: list[GenerationRequest] = []
    abandoned: list[GenerationRequest] = []
    release = __import__("threading").Event()

    def run_batch(items: list[GenerationRequest], answer: object) -> None:
        answer(0, GenerationResult(text="ok", prompt_tokens=1, generated_tokens=1))  # type: ignore[operator]
        answered.append(items[0])
        release.wait(5)

    batcher = MicroBatcher(run_batch, abandon=abandoned.append)
    future = batcher.submit([request("dave", 2)])[0]
    assert future.result(5).text == "ok"
    closing = __import__("threading").Thread(target=batcher.close)
    closing.start()
    time.sleep(0.05)
    release.set()
    closing.join(5)
    assert answered and abandoned == []


def test_warm_ups_stopped_part_way_hold_no_more_memory_than_the_cache_budget(model_dir: Path) -> None:
    """A warm-up stopped after its first chunk kept its prefix in the buffer made for its whole
    prompt, counted as the tokens prefilled: twelve such entries held several times the
    budget's memory. The budget now counts the buffer."""
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32")
    engine = Engine(backend.model, backend.tokenizer, backend.device, prefix_cache_tokens=8192)
    prefill, current = engine.forward.prefill, {}

    def abandoning(tokens: object, cache: object, stop: object = None) -> object:
        current["job"].request.abandon()  # superseded while its first chunk runs
        return prefill(tokens, cache, stop)  # type: ignore[arg-type]

    engine.forward.prefill = abandoning  # type: ignore[method-assign]
    for n in range(12):
        messages = [{"role": "user", "content": f"conversation {n}: " + "tool output line\n" * 150}]
        job = engine.job(GenerationRequest(messages, 1, cache_key=f"c{n}", prefill_only=True))
        current["job"] = job
        engine.run([job], lambda index, answer: None)
    entries = list(engine.cache._entries.values())
    assert entries
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for e in entries for k, v in e.layers for t in (k, v)}
    per_token = sum(k.shape[0] * k.shape[2] * k.element_size() * 2 for k, _ in entries[0].layers)
    assert sum(storages.values()) / per_token <= engine.cache.max_tokens
