"""What the HTTP judge backend itself costs: the same judgments in process and through a
loopback OpenAI-compatible server.

A scripted backend answers instantly behind both, so the difference is the client plus the
HTTP round trip (serialisation, the socket, the server framework, the logprob parsing); a real
judge adds its model time to both sides equally. The server runs in its own process, as vLLM
or SGLang would: in this process it would share the client's GIL, and every socket write would
wait for the server thread, charging the server's Python to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

import httpx

from soda_guard.backends.base import Backend, GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.backends.scripted import ScriptedBackend, keyword_responder
from soda_guard.bench.report import BenchSection, percentile, time_each
from soda_guard.judges.soda import SodaJudge
from soda_guard.trajectory import Trajectory


def _requests(count: int, max_new_tokens: int) -> list[GenerationRequest]:
    judge = SodaJudge()
    requests = []
    for n in range(count):
        tool = "transfer_money" if n % 3 == 0 else "get_balance"
        trajectory = Trajectory.from_openai(
            [
                {"role": "user", "content": f"Request {n}: move the savings of account {n:06d} to the offshore account."},
                {"role": "assistant", "content": "Checking the account first.", "tool_calls": [
                    {"id": f"c{n}", "type": "function", "function": {"name": tool, "arguments": f'{{"account": "{n:06d}"}}'}}
                ]},
            ],
            conversation_id=f"conversation-{n % 50}",
        )
        requests.append(
            GenerationRequest(
                messages=judge.render(trajectory).messages,
                max_new_tokens=max_new_tokens,
                score=judge.score_spec,
                cache_key=trajectory.conversation_id,
            )
        )
    return requests


def _sequential_ms(call: Callable[[GenerationRequest], object], requests: Sequence[GenerationRequest]) -> tuple[list[float], float]:
    latencies, elapsed = time_each(call, requests)
    return [seconds * 1000.0 for seconds in latencies], elapsed


def _row(mode: str, latencies: Sequence[float], elapsed_s: float, count: int) -> dict[str, object]:
    return {
        "mode": mode,
        "judgments": count,
        "judgments_per_s": count / elapsed_s if elapsed_s > 0 else None,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p95_ms": percentile(latencies, 0.95) if latencies else None,
    }


async def _concurrent(client: OpenAIBackend, requests: Sequence[GenerationRequest]) -> float:
    begin = time.perf_counter()
    await asyncio.gather(*(client.agenerate([request]) for request in requests))
    return time.perf_counter() - begin


@contextlib.contextmanager
def _server_process(model_dir: str | None) -> Iterator[str]:
    from soda_guard.testing.server import LOOPBACK  # the `testing` extra, which this benchmark needs

    command = [sys.executable, "-m", "soda_guard.testing.server"] + (["--model", model_dir] if model_dir else [])
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the benchmark's judge server did not start (said {line!r})")
        yield f"http://{LOOPBACK}:{int(line.split()[1])}/v1"
        process.stdin.close()
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _compare(
    label: str, backend: Backend, model_dir: str | None, requests: list[GenerationRequest], warmup: int
) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Rows for in-process vs HTTP, sequential p50/p95 (one judgment at a time, so no queueing
    hides in the figures), a bare httpx POST of the same body to the same server (the part of the
    overhead that is HTTP and the server, not this client), and the HTTP backend's throughput
    with 16 judgments in flight."""
    rows = []
    for request in requests[:warmup]:
        backend.generate([request])
    local, local_s = _sequential_ms(lambda r: backend.generate([r]), requests)
    rows.append(_row(f"{label} in-process", local, local_s, len(requests)))
    with _server_process(model_dir) as base_url:
        with OpenAIBackend(backend.model_id, base_url=base_url, max_concurrency=16, timeout_s=60) as client:
            for request in requests[:warmup]:
                client.generate([request])
            remote, remote_s = _sequential_ms(lambda r: client.generate([r]), requests)
            rows.append(_row(f"{label} http", remote, remote_s, len(requests)))
            with httpx.Client(base_url=base_url, timeout=60) as bare:
                raw, raw_s = _sequential_ms(lambda r: bare.post("/chat/completions", json=client.body(r)).json(), requests)
            rows.append(_row(f"{label} bare httpx POST (reference)", raw, raw_s, len(requests)))
            concurrent_s = asyncio.run(_concurrent(client, requests))
            rows.append(_row(f"{label} http, 16 in flight", [], concurrent_s, len(requests)))
    figures = {
        "overhead_p50": statistics.median(remote) - statistics.median(local),
        "overhead_p95": percentile(remote, 0.95) - percentile(local, 0.95),
        "client_p50": statistics.median(remote) - statistics.median(raw),
    }
    return rows, figures


def run(quick: bool) -> BenchSection:
    section = BenchSection(title="HTTP judge backend: client overhead over loopback")
    count = 300 if quick else 3000
    scripted = ScriptedBackend(keyword_responder([r"transfer_money"]))
    rows, figures = _compare("scripted", scripted, None, _requests(count, 128), warmup=30)
    section.rows.extend(rows)
    section.figures["http_overhead_ms_p50"] = figures["overhead_p50"]
    section.figures["http_overhead_ms_p95"] = figures["overhead_p95"]
    section.figures["http_client_ms_p50_over_bare_httpx"] = figures["client_p50"]
    section.figures["http_judgments_per_s_16_in_flight"] = rows[-1]["judgments_per_s"]  # type: ignore[assignment]
    if not quick:
        from soda_guard.backends.transformers_backend import TransformersBackend
        from soda_guard.testing import make_tiny_judge

        with tempfile.TemporaryDirectory() as folder:
            model_dir = str(make_tiny_judge(folder))
            tiny = TransformersBackend(model_dir, device="cpu", dtype="float32")
            model_rows, model_figures = _compare("tiny model", tiny, model_dir, _requests(40, 16), warmup=3)
        section.rows.extend(model_rows)
        section.figures["http_overhead_ms_p50_tiny_model"] = model_figures["overhead_p50"]
    return section
