"""Faults a judge server really produces, injected by a scripted ASGI app on loopback: every one
ends in an answer or in a JudgeError that names the cause, and only the retryable ones retry."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.backends.scripted import ScriptedBackend, soda_reply
from soda_guard.errors import JudgeError
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing.server import LoopbackServer, Reply, ScriptedHTTPApp, chat_reply, create_app

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
        ({"choices": [{"message": {"content": "[Reason] r\n[Verdict] SAFE"}, "logprobs": {"content": "SAFE"}}]}, "malformed logprobs"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
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


def _released(client: OpenAIBackend, within_s: float = 10.0) -> bool:
    """Whether every worker is free again; `within_s` is a margin for a loaded machine, far
    under what the server would hold a worker (30 s and more) if the deadline did not."""
    until = time.monotonic() + within_s
    while client.in_flight and time.monotonic() < until:
        time.sleep(0.01)
    return client.in_flight == 0


async def test_deadline_covers_retries_and_backoff() -> None:
    """A 30 s Retry-After against a 1 s deadline: no second attempt and no sleep to the
    deadline: it fails at once, naming the 429 (issue 22)."""
    app = ScriptedHTTPApp(lambda i, body: Reply(status=429, headers={"retry-after": "30"}))
    with LoopbackServer(app) as server, backend(server.base_url, retries=5, timeout_s=1.0) as client:
        with pytest.raises(JudgeError, match=r"retry after 30s, past the judgment's deadline.*HTTP 429"):
            await client.agenerate([REQUEST])
        assert await asyncio.to_thread(_released, client)
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


TRICKLE = GenerationRequest(messages=[{"role": "user", "content": "trickle"}], max_new_tokens=16, score=SodaJudge.score_spec)
HANG = GenerationRequest(messages=[{"role": "user", "content": "hang"}], max_new_tokens=16, score=SodaJudge.score_spec)


def _stalling(index: int, body: dict) -> Reply:
    """`trickle`: 200, then a valid answer behind 600 spaces sent one every 0.1 s (no read ever
    times out; 60 s in all); `hang`: nothing for 60 s; anything else: answered at once."""
    content = body["messages"][-1]["content"]
    if content == "trickle":
        return Reply(body=b" " * 600 + json.dumps(OK.body).encode(), trickle_s=0.1)
    if content == "hang":
        return Reply(body=OK.body, delay_s=60.0)
    return OK


@pytest.mark.parametrize("stall", [TRICKLE, HANG], ids=["trickle", "hang"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stalling_replies_free_their_workers_at_the_deadline(mode: str, stall: GenerationRequest) -> None:
    """`max_concurrency` stalled replies time out, their workers are free again although the
    server is still sending, and the next judgment is answered on those same workers."""
    app = ScriptedHTTPApp(_stalling)
    server = LoopbackServer(app).start()
    try:
        with backend(server.base_url, timeout_s=1.5, max_concurrency=2) as client:

            async def stalled_pair() -> list[Any]:
                return await asyncio.gather(*(client.agenerate([stall]) for _ in range(2)), return_exceptions=True)

            if mode == "sync":
                with ThreadPoolExecutor(2) as callers:
                    outcomes: list[Any] = []
                    for future in [callers.submit(client.generate, [stall]) for _ in range(2)]:
                        try:
                            outcomes.append(future.result())
                        except JudgeError as error:
                            outcomes.append(error)
            else:
                outcomes = asyncio.run(stalled_pair())
            assert all(isinstance(o, JudgeError) and "timed out" in str(o) for o in outcomes), outcomes
            assert _released(client)
            [answer] = client.generate([REQUEST])
        assert answer.score == 1.0 and app.stats.served == 3
    finally:
        server.kill()


def _oversized(index: int, body: dict) -> Reply:
    return Reply(body=b" " * (2 << 20) + json.dumps(OK.body).encode())


async def _endless_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 without a length, then 64 KiB chunks as fast as the client takes them, until it
    hangs up."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    for _ in range(10_000):
        await send({"type": "http.response.body", "body": b" " * 65536, "more_body": True})
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_reply_declared_over_the_size_cap_fails_without_retry() -> None:
    app = ScriptedHTTPApp(_oversized)
    with LoopbackServer(app) as server, backend(server.base_url, retries=3) as client:
        with pytest.raises(JudgeError, match=r"declares \d+ bytes, over the 1048576-byte limit"):
            client.generate([REQUEST])
    assert app.stats.served == 1


async def test_an_endless_reply_fails_at_the_size_cap_not_at_the_deadline() -> None:
    server = LoopbackServer(_endless_app).start()
    try:
        async with backend(server.base_url, timeout_s=60.0, max_response_bytes=256 << 10) as client:
            with pytest.raises(JudgeError, match=r"longer than the 262144-byte limit"):
                await client.agenerate([REQUEST])
            assert client.max_overrun_s == 0.0 and client.in_flight == 0
    finally:
        server.kill()


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 0.0])
def test_the_backend_refuses_an_unbounded_deadline(value: float) -> None:
    with pytest.raises(ValueError, match="timeout_s must be within"):
        OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", timeout_s=value)


def test_trickled_response_headers_free_the_worker_at_the_deadline() -> None:
    """Before any response exists (status line and headers sent one byte every 0.1 s) there is
    nothing to close: only the per-operation deadline ends the wait."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"a" * 600:
                if stop.wait(0.1):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    try:
        with backend(f"http://127.0.0.1:{port}/v1", timeout_s=1.0, retries=0) as client:
            with pytest.raises(JudgeError, match="timed out"):
                client.generate([REQUEST])
            assert _released(client)
    finally:
        stop.set()
        listener.close()


def test_a_malformed_usage_block_is_dropped_not_a_failure() -> None:
    """`usage` only counts tokens: a list there leaves the counts unknown; the verdict stands."""
    body = {"choices": [{"message": {"content": soda_reply(True)}}], "usage": [1, 2]}
    with LoopbackServer(ScriptedHTTPApp(lambda i, _: Reply(body=body))) as server, backend(server.base_url) as client:
        [result] = client.generate([REQUEST])
    assert result.text == soda_reply(True) and result.prompt_tokens is None


def _raw_judge(duplicate_first: bool) -> tuple[socket.socket, list[str]]:
    """A judge on a raw socket that answers each request by what it asks about (UNSAFE for a
    transfer), sending its first reply twice in one write when `duplicate_first`."""
    judged: list[str] = []

    def reply(text: str) -> bytes:
        body = json.dumps({"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
        return f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body

    def serve(conn: socket.socket) -> None:
        buffer, first = b"", True
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                size = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                while len(rest) < size:
                    rest += conn.recv(65536)
                body, buffer = json.loads(rest[:size]), rest[size:]
                unsafe = "transfer" in body["messages"][-1]["content"]
                judged.append("UNSAFE" if unsafe else "SAFE")
                answer = reply(soda_reply(unsafe))
                conn.sendall(answer * 2 if first and duplicate_first else answer)
                first = False

    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, judged


@pytest.mark.parametrize("duplicate_first", [False, True])
def test_a_stray_second_reply_does_not_answer_the_next_judgment(duplicate_first: bool) -> None:
    """The stray reply stayed in the HTTP parser's buffer of a kept-alive connection: the next
    judgment read it as its own, and a transfer the server judged UNSAFE was allowed as SAFE."""
    listener, judged = _raw_judge(duplicate_first)
    client = backend(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", max_concurrency=1)
    try:
        labels = []
        for subject in ("weather", "transfer", "weather", "transfer"):
            request = GenerationRequest(messages=[{"role": "user", "content": f"judge the {subject} call"}], max_new_tokens=16)
            text = client.generate([request])[0].text
            labels.append("UNSAFE" if "[Verdict] UNSAFE" in text else "SAFE")
    finally:
        client.close()
        listener.close()
    assert labels == judged == ["SAFE", "UNSAFE", "SAFE", "UNSAFE"]


@pytest.mark.parametrize(("wire", "more"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    # what a lenient parser reads as one reply, a stray one after it
    (b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200", True),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", False),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nokHTTP/1.1 200 OK\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nokHTTP/1.1", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=\"a;b\"\r\nok\r\n0\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length:   4 \r\n\r\nok\r\n", False),
    (b"not http at all", True),
    # no body, whatever its Content-Length says: the 40 bytes after it are a stray reply
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 40\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False),
])
def test_what_counts_as_more_than_one_reply(wire: bytes, more: bool) -> None:
    from soda_guard.backends.deadline_http import _past_one_reply

    assert _past_one_reply(wire) is more
