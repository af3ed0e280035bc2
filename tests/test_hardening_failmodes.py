"""Every way a judge can fail ends in the policy's on_error action, within the deadline, with the
cause in the decision: on the sync path and the async path alike."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Sequence

import pytest
import torch

from soda_guard import Action, Guard, Policy, ScriptedBackend, from_openai_messages
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.scripted import soda_reply

TIMEOUT_S = 0.3
HANG_S = 30.0

POLICY = f"""
version: 1
judges:
  soda: {{kind: soda, model: scripted}}
defaults: {{timeout_s: {TIMEOUT_S}}}
"""

TRAJECTORY = from_openai_messages(
    [
        {"role": "user", "content": "Wire the savings to this account."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "transfer", "arguments": "{}"}}],
        },
    ],
    conversation_id="conv-fail",
)


class FaultyBackend:
    """A backend whose sync and async paths misbehave the same way."""

    model_id = "faulty"

    def __init__(self, answer: Callable[[Sequence[GenerationRequest]], Any]) -> None:
        self.answer = answer

    def generate(self, requests: Sequence[GenerationRequest]) -> Any:
        return self.answer(requests)

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> Any:
        return self.answer(requests)


def _raise(error: BaseException) -> Callable[[Sequence[GenerationRequest]], Any]:
    def answer(requests: Sequence[GenerationRequest]) -> Any:
        raise error

    return answer


def _result(**fields: Any) -> Callable[[Sequence[GenerationRequest]], Any]:
    return lambda requests: [GenerationResult(**{"text": soda_reply(False), **fields}) for _ in requests]


class HangingBackend:
    """Never finishes (its first `hangs` sync calls): sync blocks on an event nobody sets,
    async sleeps and shrugs off its cancellation once, as badly written clients do."""

    model_id = "hang"

    def __init__(self, hangs: int = 1_000_000) -> None:
        self.release = threading.Event()
        self.hangs = hangs
        self.calls = 0
        self._lock = threading.Lock()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            self.calls += 1
            self.hangs -= 1
            hang = self.hangs >= 0
        if hang:
            self.release.wait(HANG_S)
        return [GenerationResult(text=soda_reply(False)) for _ in requests]

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        try:
            await asyncio.sleep(HANG_S)
        except asyncio.CancelledError:
            await asyncio.sleep(HANG_S)
        return [GenerationResult(text=soda_reply(False)) for _ in requests]


FAULTS: dict[str, tuple[Any, str]] = {
    "exception": (FaultyBackend(_raise(RuntimeError("device-side assert"))), "RuntimeError: device-side assert"),
    "cuda_oom": (
        FaultyBackend(_raise(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))),
        "OutOfMemoryError: CUDA out of memory",
    ),
    "base_exception": (FaultyBackend(_raise(SystemExit(3))), "judge raised SystemExit"),
    "unparsable": (ScriptedBackend(["I would rather not say."]), "could not be parsed"),
    "echoed_conflict": (ScriptedBackend(["[Reason] x\n[Verdict] SAFE\n[Verdict] UNSAFE"]), "could not be parsed"),
    "too_few_results": (FaultyBackend(lambda requests: []), "returned 0 results for 1 requests"),
    "too_many_results": (FaultyBackend(lambda requests: _result()(requests) * 2), "returned 2 results"),
    "not_a_list": (FaultyBackend(lambda requests: None), "returned NoneType results"),
    "none_text": (FaultyBackend(_result(text=None)), "text is NoneType"),
    "bytes_text": (FaultyBackend(_result(text=b"[Verdict] SAFE")), "text is bytes"),
    "nan_score": (FaultyBackend(_result(score=float("nan"))), "is not a probability"),
    "score_above_one": (FaultyBackend(_result(score=7.0)), "is not a probability"),
    "never_finishes": (HangingBackend(), f"timed out after {TIMEOUT_S}s"),
    "slow": (ScriptedBackend([soda_reply(False)], delay_s=2.0), f"timed out after {TIMEOUT_S}s"),
}


def _guard(backend: Any, policy: str = POLICY) -> Guard:
    return Guard(Policy.from_yaml(policy), backends={"soda": backend})


def _assert_failed_closed(decision: Any, cause: str, elapsed: float) -> None:
    assert decision.action is Action.BLOCK
    assert decision.tool_call.id == "c1" and decision.conversation_id == "conv-fail"
    assert decision.verdict is not None and decision.verdict.failed
    assert cause in (decision.verdict.error or ""), decision.verdict.error
    assert cause in decision.why
    # the cause says which deadline ended a hung or slow judge ("timed out after 0.3s"); the
    # clock only has to tell a deadline from a hang (30 s), with room for a loaded machine
    assert elapsed < HANG_S / 2


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_sync_fault_fails_closed_within_deadline(fault: str) -> None:
    backend, cause = FAULTS[fault]
    guard = _guard(backend)
    start = time.perf_counter()
    decision = guard.check_tool_calls(TRAJECTORY)[0]
    _assert_failed_closed(decision, cause, time.perf_counter() - start)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_async_fault_fails_closed_within_deadline(fault: str) -> None:
    backend, cause = FAULTS[fault]
    guard = _guard(backend)

    async def check() -> tuple[Any, float]:
        start = time.perf_counter()
        decisions = await guard.acheck_tool_calls(TRAJECTORY)
        return decisions[0], time.perf_counter() - start

    decision, elapsed = asyncio.run(check())
    _assert_failed_closed(decision, cause, elapsed)


def test_on_error_action_comes_from_the_policy() -> None:
    policy = POLICY.replace(f"timeout_s: {TIMEOUT_S}", f"timeout_s: {TIMEOUT_S}, on_error: escalate")
    guard = _guard(FaultyBackend(_raise(ValueError("boom"))), policy)
    assert guard.check_tool_calls(TRAJECTORY)[0].action is Action.ESCALATE
    assert asyncio.run(guard.acheck_tool_calls(TRAJECTORY))[0].action is Action.ESCALATE


def test_default_policy_fails_closed() -> None:
    assert Policy().defaults.on_error is Action.BLOCK


def test_hung_judges_do_not_starve_later_calls() -> None:
    """Ten hung calls in flight; the next call still gets a thread and its own full deadline."""
    hanging = HangingBackend(hangs=10)
    guard = _guard(hanging)
    try:
        for _ in range(10):
            assert guard.check_tool_calls(TRAJECTORY)[0].action is Action.BLOCK
        assert guard.judge_threads.busy == 10
        decision = guard.check_tool_calls(TRAJECTORY)[0]
        assert decision.action is Action.ALLOW, decision.why
    finally:
        hanging.release.set()


def test_judge_capacity_exhausted_fails_closed_immediately() -> None:
    hanging = HangingBackend()
    guard = Guard(Policy.from_yaml(POLICY), backends={"soda": hanging}, max_judge_threads=2)
    try:
        for _ in range(2):
            guard.check_tool_calls(TRAJECTORY)
        decision = guard.check_tool_calls(TRAJECTORY)[0]
        assert decision.action is Action.BLOCK and "2 judge calls still running" in decision.verdict.error
        # refused, not queued: the backend never saw the third call and no thread took it
        assert hanging.calls == 2 and guard.judge_threads.busy == 2
    finally:
        hanging.release.set()


def test_a_model_load_that_hangs_is_a_timeout_and_blocks_only_its_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    policy = Policy.from_yaml(
        f"""
version: 1
judges:
  slow: {{kind: soda, model: never-loads}}
  fast: {{kind: soda, model: scripted}}
defaults: {{judge: slow, timeout_s: {TIMEOUT_S}}}
rules:
  - {{tools: ["transfer"], judge: fast}}
"""
    )
    guard = Guard(policy, backends={"fast": ScriptedBackend([soda_reply(False)])})

    def hang_load(config: Any) -> Any:
        release.wait(HANG_S)
        raise RuntimeError("gave up")

    monkeypatch.setattr("soda_guard.guard.make_backend", hang_load)
    try:
        whole = guard.check(TRAJECTORY)
        assert whole.action is Action.BLOCK and "timed out" in whole.verdict.error
        assert guard.check_tool_calls(TRAJECTORY)[0].action is Action.ALLOW
        assert asyncio.run(guard.acheck(TRAJECTORY)).action is Action.BLOCK
    finally:
        release.set()


def test_idle_judge_threads_exit() -> None:
    guard = _guard(ScriptedBackend([soda_reply(False)]))
    guard.judge_threads.idle_s = 0.05
    for _ in range(3):
        guard.check_tool_calls(TRAJECTORY)
    deadline = time.monotonic() + 5.0
    while guard.judge_threads.threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.judge_threads.threads == 0


def test_closed_guard_fails_closed() -> None:
    guard = _guard(ScriptedBackend([soda_reply(False)]))
    guard.close()
    decision = guard.check_tool_calls(TRAJECTORY)[0]
    assert decision.action is Action.BLOCK and "closed" in decision.verdict.error
