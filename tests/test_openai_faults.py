"""Faults a judge server really produces, injected by a scripted ASGI app on loopback: every one
ends in an answer or in a JudgeError that names the cause, and only the retryable ones retry."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.backends.scripted import ScriptedBackend, soda_reply
from soda_guard.errors import JudgeError
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing_server import LoopbackServer, Reply, ScriptedHTTPApp, chat_reply, create_app

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "judge this"}], max_new_tokens=16, score=SodaJudge.score_spec)
OK = chat_reply(soda_reply(True))


def backend(*urls: str, **options: Any) -> OpenAIBackend:
    settings: dict[str, Any] = {"retries": 2, "backoff_s": 0.005, "timeout_s": 5.0}
    settings.update(options)
    return OpenAIBackend("m", base_urls=list(urls), **settings)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_connection_refused_retries_then_raises_with_the_cause() -> None:
    with backend(closed_port_url(), retries=2) as client, pytest.raises(JudgeError) as raised:
        client.generate([REQUEST])
    assert "after 3 attempts" in str(raised.value) and "ConnectError" in str(raised.value)


def test_500_is_retried_and_a_later_success_is_returned() -> None:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=500, body=b"boom") if i < 2 else OK)
    with LoopbackServer(app) as server, backend(server.base_url, retries=2) as client:
        [result] = client.generate([REQUEST])
    assert app.stats.served == 3 and result.score == 1.0


def test_500_beyond_the_retries_raises_with_status_and_body() -> None:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=503, body=b"overloaded engine"))
    with LoopbackServer(app) as server, backend(server.base_url, retries=1) as client, pytest.raises(JudgeError) as raised:
        client.generate([REQUEST])
    assert app.stats.served == 2
    assert "HTTP 503" in str(raised.value) and "overloaded engine" in str(raised.value)


def test_429_waits_for_retry_after_then_succeeds() -> None:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=429, body=b"slow down", headers={"retry-after": "0.01"}) if i == 0 else OK)
    with LoopbackServer(app) as server, backend(server.base_url, retries=1) as client:
        [result] = client.generate([REQUEST])
    assert app.stats.served == 2 and result.text == soda_reply(True)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=status, body=b"bad request detail"))
    with LoopbackServer(app) as server, backend(server.base_url, retries=3) as client, pytest.raises(JudgeError) as raised:
        client.generate([REQUEST])
    assert app.stats.served == 1
    assert f"HTTP {status}" in str(raised.value) and "bad request detail" in str(raised.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        ({"choices": []}, "not a chat completion"),
        ({"choices": [{"message": {"content": 42}}]}, "not a chat completion"),
        ({"object": "error"}, "not a chat completion"),
        (
            {"choices": [{"message": {"content": "[Reason] r\n[Verdict] SAFE"}, "logprobs": {"content": [
                {"token": "[Reason] r\n[Verdict] ", "logprob": 0.0},
                {"token": "SAFE", "logprob": "high", "top_logprobs": [{"token": "SAFE", "logprob": "high"}]},
            ]}}]},
            "malformed logprobs",
        ),
    ],
)
def test_malformed_bodies_raise_without_retry(body: Any, message: str) -> None:
    app = ScriptedHTTPApp(lambda i, _: Reply(body=body))
    with LoopbackServer(app) as server, backend(server.base_url, retries=3) as client, pytest.raises(JudgeError, match=message):
        client.generate([REQUEST])
    assert app.stats.served == 1


def test_a_slow_server_hits_the_judgment_deadline() -> None:
    release = threading.Event()

    async def slow(index: int, body: dict) -> Reply:
        await asyncio.to_thread(release.wait, 10)
        return OK

    app = ScriptedHTTPApp(slow)
    server = LoopbackServer(app).start()
    try:
        with backend(server.base_url, timeout_s=0.3) as client, pytest.raises(JudgeError, match=r"timed out after 0.3s"):
            client.generate([REQUEST])
    finally:
        release.set()
        server.kill()
    assert app.stats.served == 1


async def test_deadline_covers_retries_and_backoff() -> None:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=429, headers={"retry-after": "30"}))
    with LoopbackServer(app) as server, backend(server.base_url, retries=5, timeout_s=0.3) as client:
        with pytest.raises(JudgeError, match=r"timed out .*HTTP 429"):
            await client.agenerate([REQUEST])
    assert app.stats.served == 1


def test_a_failed_server_cools_down_and_the_other_takes_the_traffic() -> None:
    bad = ScriptedHTTPApp(lambda i, body: Reply(status=500, body=b"down"))
    good = ScriptedHTTPApp(lambda i, body: OK)
    with LoopbackServer(bad) as first, LoopbackServer(good) as second:
        with backend(first.base_url, second.base_url, retries=1, cooldown_s=60) as client:
            results = [client.generate([REQUEST])[0] for _ in range(6)]
    assert all(r.score == 1.0 for r in results)
    assert bad.stats.served == 1 and good.stats.served == 6


def _echo(request: GenerationRequest) -> str:
    return soda_reply(False, request.messages[-1]["content"])


async def test_a_server_dying_mid_run_is_replaced_without_losing_answers() -> None:
    doomed = LoopbackServer(create_app(ScriptedBackend(_echo, delay_s=0.02), model_id="m")).start()
    survivor = LoopbackServer(create_app(ScriptedBackend(_echo, delay_s=0.02), model_id="m")).start()
    requests = [
        GenerationRequest(messages=[{"role": "user", "content": f"judgment-{n}"}], score=SodaJudge.score_spec, cache_key=f"conv-{n % 7}")
        for n in range(60)
    ]
    try:
        async with backend(doomed.base_url, survivor.base_url, max_concurrency=6, retries=2, cooldown_s=60) as client:
            running = asyncio.ensure_future(asyncio.gather(*(client.agenerate([r]) for r in requests)))
            for _ in range(500):
                if doomed.app.state.stats.served >= 5:
                    break
                await asyncio.sleep(0.01)
            await asyncio.to_thread(doomed.kill)
            answers = [batch[0] for batch in await running]
    finally:
        doomed.kill()
        survivor.stop()
    assert [a.text for a in answers] == [soda_reply(False, f"judgment-{n}") for n in range(60)]
    assert 5 <= doomed.app.state.stats.served < 60 and survivor.app.state.stats.served > 0


async def _trickling_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 and then one byte every 0.1 s for 2 s: no single read ever times out, so
    only the judgment's deadline can end the wait."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    for _ in range(20):
        await send({"type": "http.response.body", "body": b" ", "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_trickling_server_cannot_hold_the_caller_past_the_deadline(mode: str) -> None:
    import time

    with LoopbackServer(_trickling_app) as server, backend(server.base_url, timeout_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(JudgeError, match=r"timed out after 0.3s \(no answer from the worker by then\)"):
            if mode == "sync":
                client.generate([REQUEST])
            else:
                asyncio.run(client.agenerate([REQUEST]))
        assert time.monotonic() - started < 1.5
