"""The threads a check relies on are the guard's own, and a forked worker gets its own.

An async check used the event loop's default executor (shared with the application: LangChain
runs sync tools there) for its audit write and its render: with that executor busy, a check
waited past its deadline. A process forked after the guard had worked (gunicorn `--preload`
after a warm-up check) inherited thread counts and keep-alive sockets of threads and
connections it does not have: its first checks all timed out into `on_error`."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from soda_guard import Guard, Policy, from_openai_messages
from soda_guard.backends.scripted import ScriptedBackend, soda_reply
from soda_guard.testing.server import LoopbackServer, ScriptedHTTPApp, chat_reply
from soda_guard.verdict import Action

CALL = from_openai_messages([
    {"role": "user", "content": "pay the invoice"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "pay", "arguments": "{}"}}]},
])
LONG = from_openai_messages([
    {"role": "user", "content": "summarise this"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "r", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "r", "content": "lorem ipsum dolor sit amet\n" * 4000},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "pay", "arguments": "{}"}}]},
], conversation_id="long")


async def test_an_async_check_does_not_wait_for_the_event_loops_default_executor(tmp_path: Path) -> None:
    """The default executor's only worker is held until the checks are over: they finish all
    the same (render off the loop, routing that scans results, the JSONL audit write)."""
    policy = Policy.from_yaml(
        "judges: {soda: {kind: soda, model: m}}\n"
        f"rules: [{{tools: [never], when: {{flows_from: {{tools: [read]}}}}, action: block}}]\n"
        f"defaults: {{timeout_s: 30}}\naudit: {{jsonl: '{tmp_path / 'audit.jsonl'}'}}\n"
    )
    guard = Guard(policy, backends={"soda": ScriptedBackend([soda_reply(False)] * 2, delay_s=0.01)})
    loop = asyncio.get_running_loop()
    held, release = threading.Event(), threading.Event()
    default = ThreadPoolExecutor(1)
    loop.set_default_executor(default)

    def hold() -> None:
        held.set()
        release.wait(60)

    busy = loop.run_in_executor(None, hold)
    assert held.wait(5)
    try:
        decisions = await asyncio.wait_for(
            asyncio.gather(guard.acheck_tool_calls(CALL), guard.acheck_tool_calls(LONG)), timeout=20
        )
    finally:
        release.set()
        await busy
        guard.close()
    assert [d.action for [d] in decisions] == [Action.ALLOW, Action.ALLOW]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="fork")
def test_a_forked_worker_judges_with_threads_and_connections_of_its_own() -> None:
    app = ScriptedHTTPApp(lambda index, body: chat_reply("[Reason] Harmless.\n[Verdict] SAFE"))
    server = LoopbackServer(app).start()
    try:
        policy = Policy.from_yaml(
            f"judges: {{soda: {{kind: soda, model: m, backend: openai, base_url: '{server.base_url}'}}}}\n"
            "defaults: {timeout_s: 5, on_error: block}\n"
        )
        guard = Guard(policy)
        warm = [threading.Thread(target=guard.check_tool_calls, args=(CALL,)) for _ in range(4)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        pid = os.fork()
        if pid == 0:  # the child: every check must be judged, not time out into on_error
            code = 0
            try:
                for _ in range(6):
                    [decision] = guard.check_tool_calls(CALL)
                    code |= decision.action is not Action.ALLOW
                code |= asyncio.run(guard.acheck_tool_calls(CALL))[0].action is not Action.ALLOW
            except BaseException:  # noqa: BLE001 - reported through the exit status
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        [decision] = guard.check_tool_calls(CALL)  # and the parent goes on with its own
        assert decision.action is Action.ALLOW
        guard.close()
    finally:
        server.stop()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="fork")
def test_a_forked_worker_judges_with_an_in_process_judge_and_warms_it_up(tmp_path: Path) -> None:
    """The engine's batcher and the guard's warm-up thread were the parent's: the child queued
    every judgment to a worker that was never started, and its warm-ups never ran."""
    from soda_guard.testing import make_tiny_judge

    judge = make_tiny_judge(tmp_path / "judge", seed=3)
    policy = Policy.from_yaml(
        f"judges: {{soda: {{kind: soda, model: '{judge}', device: cpu, dtype: float32, max_new_tokens: 4}}}}\n"
        "defaults: {timeout_s: 20, on_error: block}\n"
    )
    guard = Guard(policy)
    [decision] = guard.check_tool_calls(CALL)  # the random judge writes no verdict: a parse failure
    assert decision.verdict is not None and "timed out" not in (decision.verdict.error or "")
    guard.warm_up(CALL).result(20)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            [decision] = guard.check_tool_calls(CALL)
            code |= decision.verdict is None or "timed out" in (decision.verdict.error or "")
            for queued in guard.warm_up(CALL).result(10):
                if queued is not None:
                    queued.result(10)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 2
        os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    guard.close()
    assert os.waitstatus_to_exitcode(status) == 0


async def test_a_cascade_stage_loading_holds_its_judges_threads_not_every_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cascade's later stage loaded on the offload pool: 64 checks waiting for the load took
    every thread, and another guard's checks waited for one for their audit write, past their
    deadlines. The load now holds the guard's threads for that judge."""
    import soda_guard.guard as guard_module

    loading, loaded = threading.Event(), threading.Event()

    def slow_backend(config: object) -> ScriptedBackend:
        loading.set()
        loaded.wait(60)
        return ScriptedBackend([soda_reply(False)] * 1000)

    monkeypatch.setattr(guard_module, "make_backend", slow_backend)
    tiered = Guard(Policy.from_yaml(
        "judges:\n  screen: {kind: keywords, unsafe: ['rm -rf']}\n"
        "  soda: {kind: soda, model: big, backend: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "  tiered: {kind: cascade, stages: [screen, soda]}\n"
        "defaults: {judge: tiered, timeout_s: 30, on_error: block}\n"
    ))
    other = Guard(Policy.from_yaml(
        f"judges: {{soda: {{kind: soda, model: m}}}}\ndefaults: {{timeout_s: 30}}\naudit: {{jsonl: '{tmp_path / 'b.jsonl'}'}}\n"
    ), backends={"soda": ScriptedBackend([soda_reply(False)] * 10, delay_s=0.01)})
    waiting = [asyncio.ensure_future(tiered.acheck_tool_calls(CALL)) for _ in range(70)]
    try:
        assert await asyncio.to_thread(loading.wait, 20)
        await asyncio.sleep(0.2)  # every check has reached the load
        [decision] = await asyncio.wait_for(other.acheck_tool_calls(CALL), timeout=20)
        assert decision.action is Action.ALLOW
    finally:
        loaded.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        tiered.close()
        other.close()
