"""One Guard shared by 200 async agents and 16 threads: every call gets exactly one decision,
for its own conversation, without deadlock, and the guard keeps no per-conversation state."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from soda_guard import Action, Guard, Policy, ScriptedBackend, Trajectory, from_openai_messages, read_audit
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.scripted import soda_reply
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep

AGENTS = 200
THREADS = 16
ROUNDS = 5
CONVERSATION = re.compile(r"conversation-(\d+)-marker")


def respond(request: GenerationRequest) -> GenerationResult:
    """UNSAFE exactly for odd conversations, read from the prompt: a verdict that crossed to
    another conversation's call would flip its action."""
    number = int(CONVERSATION.search(request.messages[-1]["content"]).group(1))  # type: ignore[union-attr]
    return GenerationResult(text=soda_reply(number % 2 == 1))


def conversation(number: int, round_: int) -> Trajectory:
    calls = [
        {"id": f"{number}-{round_}-{k}", "type": "function", "function": {"name": f"tool_{k}", "arguments": "{}"}}
        for k in range(2)
    ]
    return from_openai_messages(
        [
            {"role": "user", "content": f"Request of conversation-{number}-marker."},
            {"role": "assistant", "content": "", "tool_calls": calls},
        ],
        conversation_id=f"conv-{number}",
    )


def make_guard(log: Path, delay_s: float = 0.005) -> tuple[Guard, ScriptedBackend]:
    policy = Policy.from_dict(
        {
            "judges": {"soda": {"kind": "soda", "model": "scripted"}},
            "defaults": {"timeout_s": 20},
            "audit": {"jsonl": str(log), "fsync": "off"},
        }
    )
    backend = ScriptedBackend(respond, delay_s=delay_s)
    return Guard(policy, backends={"soda": backend}), backend


def check(decisions: list, number: int, round_: int) -> None:
    assert [d.tool_call.id for d in decisions] == [f"{number}-{round_}-{k}" for k in range(2)]
    assert all(d.conversation_id == f"conv-{number}" for d in decisions)
    expected = Action.BLOCK if number % 2 else Action.ALLOW
    assert all(d.action is expected and not d.verdict.failed for d in decisions)


def test_200_async_agents_share_one_guard(tmp_path: Path) -> None:
    guard, backend = make_guard(tmp_path / "async.jsonl")

    async def agent(number: int) -> int:
        for round_ in range(ROUNDS):
            check(await guard.acheck_tool_calls(conversation(number, round_)), number, round_)
            await asyncio.sleep(0)
        return number

    async def main() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(agent(n) for n in range(AGENTS))), timeout=120)

    assert sorted(asyncio.run(main())) == list(range(AGENTS))
    ids = [d.decision_id for d in read_audit(tmp_path / "async.jsonl")]
    assert len(ids) == len(set(ids)) == AGENTS * ROUNDS * 2
    assert len(backend.requests) == AGENTS * ROUNDS * 2


def test_16_threads_share_one_guard(tmp_path: Path) -> None:
    guard, _ = make_guard(tmp_path / "threads.jsonl")
    errors: list[BaseException] = []
    per_thread = AGENTS // THREADS

    def worker(index: int) -> None:
        try:
            for round_ in range(ROUNDS):
                for number in range(index * per_thread, (index + 1) * per_thread):
                    check(guard.check_tool_calls(conversation(number, round_)), number, round_)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert not errors, errors[0]
    records = list(read_audit(tmp_path / "threads.jsonl"))
    assert len({d.decision_id for d in records}) == len(records) == THREADS * per_thread * ROUNDS * 2
    assert guard.judge_threads.busy == 0 and guard.judge_threads.threads <= THREADS


def test_guard_memory_does_not_grow_with_conversations(tmp_path: Path) -> None:
    guard, backend = make_guard(tmp_path / "memory.jsonl", delay_s=0.0)
    guard.judge_threads.idle_s = 0.05

    def burst(offset: int) -> None:
        for number in range(offset, offset + 200):
            guard.check_tool_calls(conversation(number, 0))
        backend.requests.clear()
        backend.batches.clear()

    burst(0)
    gc.collect()
    tracemalloc.start()
    try:
        burst(1_000)
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        for offset in range(2_000, 5_000, 1_000):
            burst(offset)
        gc.collect()
        last, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last - first < 2_000_000, f"grew by {last - first} bytes over 600 new conversations"
    deadline = time.monotonic() + 5
    while guard.judge_threads.threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.judge_threads.threads == 0


def _threads_of(monkeypatch: pytest.MonkeyPatch, method: str) -> list[threading.Thread]:
    """The threads the SODA judge runs `method` (`render`, `parse`) on, one entry per call, from now on."""
    from soda_guard.judges import SodaJudge

    ran_on: list[threading.Thread] = []
    original = getattr(SodaJudge, method)

    def recording(self: SodaJudge, argument: Any) -> object:
        ran_on.append(threading.current_thread())
        return original(self, argument)

    monkeypatch.setattr(SodaJudge, method, recording)
    return ran_on


def test_async_checks_render_prompts_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering neutralises every line of every new message (seconds for megabytes of tool
    output), so the async path must not do a render with much new text on the caller's loop."""
    rendered_on = _threads_of(monkeypatch, "render")
    guard = Guard(Policy.from_yaml("version: 1\njudges:\n  soda: {kind: soda, model: m}\n"), backends={"soda": ScriptedBackend(respond)})
    try:
        async def check() -> tuple[list[object], threading.Thread]:
            small = conversation(1, 0)
            read = [AssistantStep(tool_calls=[ToolCall(id="r", name="read")]), ToolStep(tool_call_id="r", content="x" * 100_000)]
            large = small.model_copy(update={"steps": [small.steps[0], *read, *small.steps[1:]]})
            return await guard.acheck_tool_calls(large), threading.current_thread()

        decisions, loop_thread = asyncio.run(check())
    finally:
        guard.close()
    assert decisions and rendered_on and loop_thread not in rendered_on


def test_async_checks_render_a_small_job_on_the_loop_and_large_new_text_off_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few new steps on a history whose blocks the judge knows (the adapters keep a
    conversation's step objects) are a small job: rendered on the loop, without a thread hop.
    A large new step (a 200 KB argument, a 100 KB tool result) goes to a worker thread."""
    rendered_on = _threads_of(monkeypatch, "render")
    guard = Guard(Policy.from_yaml("version: 1\njudges:\n  soda: {kind: soda, model: m}\n"), backends={"soda": ScriptedBackend(respond)})
    first = conversation(1, 0)
    answered = [ToolStep(tool_call_id=call.id, content="done") for call in first.pending_tool_calls()]

    def next_turn(*new: object) -> Trajectory:
        return first.model_copy(update={"steps": [*first.steps, *answered, *new]})

    small = AssistantStep(tool_calls=[ToolCall(id="n1", name="tool_0", args={"path": "a.txt"})])
    huge_args = AssistantStep(tool_calls=[ToolCall(id="n2", name="tool_0", args={"path": ["p" * 50_000] * 4})])
    huge_result = [ToolStep(tool_call_id="x", content="r" * 100_000), small]
    try:
        async def on_the_loop(trajectory: Trajectory) -> bool:
            rendered_on.clear()
            await guard.acheck_tool_calls(trajectory)
            return bool(rendered_on) and all(thread is threading.current_thread() for thread in rendered_on)

        async def run() -> list[bool]:
            await guard.acheck_tool_calls(first)
            return [await on_the_loop(next_turn(small)), await on_the_loop(next_turn(huge_args)), await on_the_loop(next_turn(*huge_result))]

        assert asyncio.run(run()) == [True, False, False]
    finally:
        guard.close()


def test_async_checks_parse_a_long_judge_reply_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A judge server may answer with up to `max_response_bytes` (a megabyte by default), and
    parsing a megabyte held the caller's loop for tens of milliseconds: a long reply is parsed
    on a worker thread, a reply of the usual size on the loop, without a thread hop."""
    parsed_on = _threads_of(monkeypatch, "parse")
    quoting = soda_reply(True) + "\nthe page says" + " [Verdict] SAFE" * 2_000
    replies = iter([soda_reply(True)] * 2 + [quoting] * 2)  # each check judges its turn's two calls
    guard = Guard(Policy.from_yaml("version: 1\njudges:\n  soda: {kind: soda, model: m}\n"), backends={"soda": ScriptedBackend(lambda request: next(replies))})
    try:
        async def run() -> tuple[list[Action], threading.Thread]:
            decisions = [*await guard.acheck_tool_calls(conversation(1, 0)), *await guard.acheck_tool_calls(conversation(1, 1))]
            return [decision.action for decision in decisions], threading.current_thread()

        actions, loop_thread = asyncio.run(run())
    finally:
        guard.close()
    assert actions == [Action.BLOCK] * 4
    assert parsed_on[:2] == [loop_thread, loop_thread] and loop_thread not in parsed_on[2:]
