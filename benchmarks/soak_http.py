"""Soak run of the HTTP judge backend against a loopback server that answers healthy, hangs, or
trickles its reply one byte at a time, in turn.

    python benchmarks/soak_http.py                   # 60 s, the figures in SECURITY.md
    python benchmarks/soak_http.py --seconds 10 --json soak.json

Sync threads and asyncio tasks call one `OpenAIBackend` for `--seconds`, each with at most one
judgment in flight, so that a healthy judgment never has to queue for a worker (callers =
`max_concurrency`) and every failure seen is the server's doing. It checks what the deadline
promises: every call returns by its deadline (plus the caller's grace for the worker's own
account), every healthy reply is answered, every stalled one ends as a timeout reported by the
worker itself, and no worker goes on past a judgment's deadline by more than that grace
(`OpenAIBackend.max_overrun_s`: scheduling delay only; `in_flight` sampled throughout). Loopback only (127.0.0.1); bounded by `--seconds` and `--max-checks`. Exit status 1
when a promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import DEADLINE_GRACE_S, OpenAIBackend
from soda_guard.backends.scripted import soda_reply
from soda_guard.errors import JudgeError
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing.server import LoopbackServer, Reply, ScriptedHTTPApp, chat_reply

KINDS = ("healthy", "hang", "trickle")
HEALTHY = chat_reply(soda_reply(False))


def _script(trickle_every_s: float, hang_s: float) -> Any:
    def answer(index: int, body: dict[str, Any]) -> Reply:
        kind = body["messages"][-1]["content"]
        if kind == "hang":
            return Reply(body=HEALTHY.body, delay_s=hang_s)
        if kind == "trickle":
            return Reply(body=b" " * 400 + json.dumps(HEALTHY.body).encode(), trickle_s=trickle_every_s)
        return HEALTHY

    return answer


@dataclass
class Tally:
    calls: list[tuple[str, float, str]] = field(default_factory=list)
    """(kind, seconds from call to return, outcome: answered | timeout | error: ...)"""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, outcome: str) -> None:
        with self.lock:
            self.calls.append((kind, seconds, outcome))


def _request(kind: str) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": kind}], max_new_tokens=16, score=SodaJudge.score_spec)


def _classify(error: JudgeError) -> str:
    """A timeout the worker reported itself means it stopped at the deadline; one where the
    caller stopped waiting for it means the worker was still busy past deadline + grace."""
    message = str(error)
    if "no answer from the worker" in message:
        return "timeout, worker still busy"
    return "timeout" if "timed out" in message else f"error: {message}"


def _outcome(call: Any) -> str:
    try:
        call()
    except JudgeError as error:
        return _classify(error)
    return "answered"


def _sync_caller(backend: OpenAIBackend, offset: int, until: float, budget: threading.Semaphore, tally: Tally) -> None:
    turn = offset
    while time.monotonic() < until and budget.acquire(blocking=False):
        kind = KINDS[turn % len(KINDS)]
        turn += 1
        start = time.monotonic()
        outcome = _outcome(lambda: backend.generate([_request(kind)]))
        tally.add(kind, time.monotonic() - start, outcome)


async def _async_callers(backend: OpenAIBackend, offsets: range, until: float, budget: threading.Semaphore, tally: Tally) -> None:
    async def caller(offset: int) -> None:
        turn = offset
        while time.monotonic() < until and budget.acquire(blocking=False):
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            start = time.monotonic()
            try:
                await backend.agenerate([_request(kind)])
                outcome = "answered"
            except JudgeError as error:
                outcome = _classify(error)
            tally.add(kind, time.monotonic() - start, outcome)

    await asyncio.gather(*(caller(offset) for offset in offsets))


def soak(seconds: float, timeout_s: float, concurrency: int, trickle_every_s: float, max_checks: int) -> dict[str, Any]:
    server = LoopbackServer(ScriptedHTTPApp(_script(trickle_every_s, hang_s=5 * timeout_s))).start()
    backend = OpenAIBackend("soak", base_url=server.base_url, timeout_s=timeout_s, max_concurrency=concurrency, retries=0)
    tally = Tally()
    budget = threading.Semaphore(max_checks)
    peak_in_flight = 0
    started = time.monotonic()
    until = started + seconds
    sync_count = concurrency // 2
    try:
        threads = [
            threading.Thread(target=_sync_caller, args=(backend, offset, until, budget, tally)) for offset in range(sync_count)
        ]
        threads.append(
            threading.Thread(
                target=asyncio.run, args=(_async_callers(backend, range(sync_count, concurrency), until, budget, tally),)
            )
        )
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak_in_flight = max(peak_in_flight, backend.in_flight)
            time.sleep(0.01)
        wall_s = time.monotonic() - started
        in_flight_after = backend.in_flight
    finally:
        backend.close()
        # the hangs still sleeping are cancelled by the kill: expected, not worth a traceback each
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        server.kill()
    return _report(tally, timeout_s, concurrency, wall_s, peak_in_flight, in_flight_after, backend.max_overrun_s)


def _report(
    tally: Tally, timeout_s: float, concurrency: int, wall_s: float, peak: int, after: int, overrun_s: float
) -> dict[str, Any]:
    bound_s = timeout_s + DEADLINE_GRACE_S
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        rows = [(seconds, outcome) for k, seconds, outcome in tally.calls if k == kind]
        durations = sorted(seconds for seconds, _ in rows)
        outcomes: dict[str, int] = {}
        for _, outcome in rows:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        kinds[kind] = {
            "calls": len(rows),
            "outcomes": outcomes,
            "median_s": round(statistics.median(durations), 4) if durations else None,
            "max_s": round(durations[-1], 4) if durations else None,
            "past_bound": sum(1 for seconds in durations if seconds > bound_s),
        }
    expected = {"healthy": "answered", "hang": "timeout", "trickle": "timeout"}
    promises = {
        "every call returned by its deadline + grace": all(kinds[k]["past_bound"] == 0 for k in KINDS),
        "every healthy reply answered, every stalled one a timeout": all(
            set(kinds[k]["outcomes"]) <= {expected[k]} for k in KINDS
        ),
        "no worker went on past a deadline by more than the grace": overrun_s <= DEADLINE_GRACE_S,
        "workers never over max_concurrency, all free at the end": peak <= concurrency and after == 0,
    }
    return {
        "seconds": round(wall_s, 1),
        "timeout_s": timeout_s,
        "bound_s": bound_s,
        "max_concurrency": concurrency,
        "checks": len(tally.calls),
        "kinds": kinds,
        "max_worker_overrun_s": round(overrun_s, 4),
        "peak_in_flight": peak,
        "in_flight_after": after,
        "promises": promises,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the callers run (at most 600)")
    parser.add_argument("--timeout", type=float, default=1.0, help="the backend's timeout_s")
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency, and as many callers")
    parser.add_argument("--trickle-every", type=float, default=0.5, help="seconds between two trickled bytes")
    parser.add_argument("--max-checks", type=int, default=100_000)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be within (0, 600]")
    report = soak(args.seconds, args.timeout, args.concurrency, args.trickle_every, args.max_checks)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    raise SystemExit(0 if all(report["promises"].values()) else 1)


if __name__ == "__main__":
    main()
