"""The HTTP backend against a real OpenAI-compatible server: `transformers serve` on CPU with a
tiny random judge, on loopback ports this module picks, started and stopped here.

The stub server (`soda_guard.testing.server`) answers what a test scripts; this one is someone
else's implementation of the protocol, so it catches what the stub cannot: the request shape it
accepts, its usage figures, and that it returns no logprobs even when asked (scores then come
from the label, `score_source="label"`, which a random judge never writes: its verdicts are
parse failures, the policy's `on_error`). Every wait is bounded; where `transformers serve`
cannot start (no `serving` extra, no free port) the module skips.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from soda_guard import Action, Guard, Policy, Verdict, from_openai_messages
from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend, parse_completion
from soda_guard.judges.soda import SodaJudge
from soda_guard.trajectory import Trajectory

START_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 60.0
MAX_NEW_TOKENS = 4


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def completions_served(self) -> int:
        """The server's own access log: how many chat completions it answered."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return text.count('"POST /v1/chat/completions HTTP/1.1" 200')

    def requests_received(self) -> int:
        return self.log.read_text(encoding="utf-8", errors="replace").count("[Request received]")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(folder: Path, log: Path) -> Served:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
    )
    port = _free_port()
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Served(process, port, log)


def _wait_healthy(servers: list[Served]) -> str | None:
    """None once every server answers /health, else why not (by START_TIMEOUT_S at the latest)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                tail = server.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                return f"exited with {server.process.returncode}: {' | '.join(tail)}"
            try:
                if httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200:
                    pending.remove(server)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            return f"no answer on /health within {START_TIMEOUT_S:.0f}s"
        time.sleep(0.25)
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_judge_dir: Path) -> Iterator[list[Served]]:
    """Two servers of one tiny judge, started together (each loads torch: about ten seconds)."""
    logs = tmp_path_factory.mktemp("transformers-serve")
    started = [_start(tiny_judge_dir, logs / f"server-{n}.log") for n in range(2)]
    try:
        problem = _wait_healthy(started)
        if problem is not None:
            pytest.skip(f"`transformers serve` cannot start here ({problem})")
        yield started
    finally:
        for server in started:
            server.stop()


def _policy(model: Path, *urls: str, retries: int = 2) -> Policy:
    urls_yaml = ", ".join(f"'{url}'" for url in urls)
    return Policy.from_yaml(
        f"""
version: 1
judges:
  soda: {{kind: soda, model: '{model}', backend: openai, base_urls: [{urls_yaml}],
          max_new_tokens: {MAX_NEW_TOKENS}, timeout_s: {REQUEST_TIMEOUT_S}, retries: {retries}}}
defaults: {{on_error: log, timeout_s: {REQUEST_TIMEOUT_S}}}
"""
    )


def _pending(n: int) -> Trajectory:
    return from_openai_messages(
        [
            {"role": "user", "content": f"Wire ${n}00 to account {n}."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{n}", "type": "function", "function": {"name": "transfer", "arguments": f'{{"to": "{n}"}}'}}]},
        ],
        conversation_id=f"conversation-{n}",
    )  # fmt: skip


def _assert_judged_by_the_server(verdict: Verdict | None, model: Path) -> None:
    assert verdict is not None
    assert verdict.model == str(model)
    assert verdict.prompt_tokens and verdict.prompt_tokens > 100  # the server's usage figures
    assert verdict.generated_tokens == MAX_NEW_TOKENS
    assert verdict.parse_failure is True and verdict.score is None


def test_backend_asks_for_logprobs_and_falls_back_to_the_label(servers: list[Served], tiny_judge_dir: Path) -> None:
    request = GenerationRequest(
        messages=SodaJudge().render(_pending(0)).messages, max_new_tokens=MAX_NEW_TOKENS, score=SodaJudge.score_spec
    )
    backend = OpenAIBackend(str(tiny_judge_dir), base_url=servers[0].base_url, timeout_s=REQUEST_TIMEOUT_S)
    body = backend.body(request)
    assert body["logprobs"] is True and body["top_logprobs"] > 0
    payload = httpx.post(f"{servers[0].base_url}/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S).json()
    assert not payload["choices"][0].get("logprobs")  # asked for, not given (the README's table)
    assert payload["model"] == str(tiny_judge_dir)  # a folder's model answers by the path asked for: the judge's

    # the same answer with a verdict written in it scores from the label
    payload["choices"][0]["message"]["content"] = "[Reason] Wires savings to a stranger.\n[Verdict] UNSAFE"
    labelled = parse_completion(payload, SodaJudge.score_spec)
    assert (labelled.score, labelled.score_source) == (1.0, "label")
    assert labelled.generated_tokens == MAX_NEW_TOKENS

    with backend:
        [result] = backend.generate([request])
    assert result.generated_tokens == MAX_NEW_TOKENS and result.prompt_tokens


def test_guard_judges_through_a_real_server_sync(servers: list[Served], tiny_judge_dir: Path) -> None:
    guard = Guard(_policy(tiny_judge_dir, servers[0].base_url))
    before = servers[0].completions_served()
    try:
        [decision] = guard.check_tool_calls(_pending(1))
    finally:
        guard.close()
    assert decision.action is Action.LOG and decision.tool_call.name == "transfer"
    _assert_judged_by_the_server(decision.verdict, tiny_judge_dir)
    assert servers[0].completions_served() == before + 1


async def test_guard_judges_through_a_real_server_async(servers: list[Served], tiny_judge_dir: Path) -> None:
    guard = Guard(_policy(tiny_judge_dir, servers[0].base_url))
    try:
        results = await asyncio.gather(*(guard.acheck_tool_calls(_pending(n)) for n in range(2, 5)))
    finally:
        guard.close()
    for [decision] in results:
        _assert_judged_by_the_server(decision.verdict, tiny_judge_dir)


def test_two_servers_share_the_judgments(servers: list[Served], tiny_judge_dir: Path) -> None:
    before = [server.completions_served() for server in servers]
    guard = Guard(_policy(tiny_judge_dir, *(server.base_url for server in servers)))
    try:
        for n in range(10, 14):
            [decision] = guard.check_tool_calls(_pending(n))
            _assert_judged_by_the_server(decision.verdict, tiny_judge_dir)
    finally:
        guard.close()
    served = [server.completions_served() - start for server, start in zip(servers, before)]
    assert sum(served) == 4 and min(served) >= 1, served


async def test_a_server_killed_mid_run_loses_no_judgment(servers: list[Served], tiny_judge_dir: Path) -> None:
    """Runs last in this module: it kills the second server while judgments are in flight."""
    survivor, victim = servers
    received = victim.requests_received()
    guard = Guard(_policy(tiny_judge_dir, survivor.base_url, victim.base_url, retries=3))

    busy: list[bool] = []

    def victim_has_work() -> bool:
        """A judgment in flight to it (the client's view: a busy server logs a request only when
        it starts on it) or one it logged."""
        backend = guard._backends.get("soda")
        servers = backend.pool.servers if backend is not None else []
        in_flight = any(s.outstanding for s in servers if s.base_url.rstrip("/") == victim.base_url.rstrip("/"))
        return in_flight or victim.requests_received() > received

    async def kill_once_busy() -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while not victim_has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        busy.append(victim_has_work())
        victim.process.kill()
        victim.process.wait(timeout=10)

    try:
        killer = asyncio.create_task(kill_once_busy())
        results = await asyncio.gather(*(guard.acheck_tool_calls(_pending(n)) for n in range(20, 26)))
        await killer
    finally:
        guard.close()
    assert busy == [True]  # it was killed with work on it
    for [decision] in results:
        _assert_judged_by_the_server(decision.verdict, tiny_judge_dir)
        assert "attempt" not in (decision.verdict.error or "")  # an answer, not a connection failure
