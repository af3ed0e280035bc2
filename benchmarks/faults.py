"""Fault figures of issue 22, in one short run (about 40 s; loopback only):

    python benchmarks/faults.py            # the figures in SECURITY.md
    python benchmarks/faults.py --json faults.json

1. mixed servers: one judge per server, a hanging one and a healthy one, many concurrent
   checks at `timeout_s: 1` with only the hanging judge's share of judge threads: how far any
   check went past its deadline, and how many healthy checks were not allowed;
2. cancellation: async checks against the hanging server cancelled mid-request: workers still
   busy 0.5 s later;
3. TLS on a plain port: checks that end by their deadline, and sockets open after close;
4. `Retry-After: 3600`: how long the decision took and whether it names the 429;
5. converters: parse time of three pathological actions at 256 KB and 512 KB (a ratio near 2
   is linear, 4 quadratic; before the fix one of them took 9.7 s at 32 KB), and a 100k-rule policy (refused by the cap) and a 10k-rule one;
6. exit without `close()` while the in-process engine decodes: exit codes of a few processes.
Ratios and maxima are printed; nothing here is a pass/fail threshold except the exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_faults_deadlines import CALL, SilentServer  # noqa: E402
from test_faults_engine import EXIT_WITHOUT_CLOSE  # noqa: E402

from soda_guard import Guard, Policy, from_openai_messages  # noqa: E402
from soda_guard.backends.scripted import soda_reply  # noqa: E402
from soda_guard.converters import parse_action  # noqa: E402
from soda_guard.errors import PolicyError  # noqa: E402
from soda_guard.testing import make_tiny_judge  # noqa: E402
from soda_guard.testing.server import LoopbackServer, Reply, ScriptedHTTPApp, chat_reply  # noqa: E402

OTHER = from_openai_messages(
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "other", "arguments": "{}"}}]},
    ]
)


def mixed(silent: SilentServer, good_url: str, checks: int) -> dict[str, Any]:
    policy = Policy.from_yaml(
        f"judges: {{bad: {{kind: soda, model: m, backend: openai, base_url: '{silent.url()}', retries: 0}},"
        f" good: {{kind: soda, model: m, backend: openai, base_url: '{good_url}', retries: 0}}}}\n"
        "defaults: {judge: bad, timeout_s: 1}\nrules: [{tools: [pay], judge: good}]"
    )
    overruns: list[float] = []
    good_ms: list[float] = []
    good_blocked = 0
    lock = threading.Lock()
    with Guard(policy) as guard:

        def one(n: int) -> None:
            nonlocal good_blocked
            started = time.monotonic()
            decision = guard.check_tool_calls(CALL if n % 2 else OTHER)[0]
            took = time.monotonic() - started
            with lock:
                overruns.append(took - 1.0)
                if n % 2:
                    good_ms.append(took * 1000)
                    good_blocked += decision.action.value != "allow"

        with ThreadPoolExecutor(50) as pool:
            list(pool.map(one, range(checks)))
    return {
        "checks": checks,
        "max_past_deadline_s": round(max(overruns), 3),
        "good_checks": len(good_ms),
        "good_not_allowed": good_blocked,
        "good_ms_p50": round(statistics.median(good_ms), 1),
        "good_ms_max": round(max(good_ms), 1),
    }


def cancelled(silent: SilentServer, rounds: int) -> dict[str, Any]:
    policy = Policy.from_yaml(
        f"judges: {{bad: {{kind: soda, model: m, backend: openai, base_url: '{silent.url()}', retries: 0}}}}\ndefaults: {{timeout_s: 30}}"
    )
    guard = Guard(policy)

    async def run() -> None:
        tasks = [asyncio.ensure_future(guard.acheck_tool_calls(CALL)) for _ in range(rounds)]
        await asyncio.sleep(0.3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    time.sleep(0.5)
    busy = guard.runner("bad").backend.in_flight  # type: ignore[attr-defined]
    guard.close()
    return {"cancelled_checks": rounds, "workers_busy_0_5s_later": busy}


def tls(silent: SilentServer, checks: int) -> dict[str, Any]:
    policy = Policy.from_yaml(
        f"judges: {{t: {{kind: soda, model: m, backend: openai, base_url: '{silent.url('https')}', retries: 0}}}}\ndefaults: {{timeout_s: 0.25}}"
    )
    for peer in silent.peers:  # the server's ends of earlier phases, in this same process
        peer.close()
    silent.peers.clear()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    took = []
    with Guard(policy) as guard:
        for _ in range(checks):
            started = time.monotonic()
            guard.check_tool_calls(CALL)
            took.append(time.monotonic() - started)
    for peer in silent.peers:
        peer.close()
    gc.collect()
    return {"checks": checks, "max_s": round(max(took), 3), "fds_left_open": len(os.listdir("/proc/self/fd")) - before}


def retry_after() -> dict[str, Any]:
    app = ScriptedHTTPApp(lambda i, body: Reply(status=429, headers={"retry-after": "3600"}))
    with LoopbackServer(app) as server:
        policy = Policy.from_yaml(
            f"judges: {{s: {{kind: soda, model: m, backend: openai, base_url: '{server.base_url}', retries: 3}}}}\ndefaults: {{timeout_s: 5}}"
        )
        with Guard(policy) as guard:
            started = time.monotonic()
            decision = guard.check_tool_calls(CALL)[0]
            took = time.monotonic() - started
    return {"decision_s": round(took, 3), "names_429": "HTTP 429" in decision.why, "action": decision.action.value}


def converters_and_policy() -> dict[str, Any]:
    def parse_s(size: int) -> float:
        inputs = ["Search(query=" + " " * size + "x", "```bash\n" + "ls \n" * (size // 4), "{Tool: {" + " }" * (size // 2)]
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for action in inputs:
                parse_action(action)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = parse_s(256 * 1024), parse_s(512 * 1024)
    rules = [{"tools": [f"t{i}"], "action": "allow"} for i in range(100_000)]
    started = time.perf_counter()
    try:
        Policy.from_dict({"rules": rules})
        refused = False
    except PolicyError:
        refused = True
    refuse_s = time.perf_counter() - started
    started = time.perf_counter()
    Policy.from_dict({"rules": rules[:10_000]})
    return {
        "actions_256kb_ms": round(small * 1000, 2),
        "actions_512kb_ms": round(large * 1000, 2),
        "doubling_ratio": round(large / small, 2),
        "rules_100k_refused": refused,
        "rules_100k_refuse_s": round(refuse_s, 3),
        "rules_10k_load_s": round(time.perf_counter() - started, 3),
    }


def exits(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny_judge(Path(folder) / "judge", seed=5)
        codes = []
        aborts = 0
        for _ in range(rounds):
            done = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(model)], capture_output=True, text=True, timeout=120)
            codes.append(done.returncode)
            aborts += "terminate called" in done.stderr
    return {"rounds": rounds, "exit_codes": codes, "terminate_called": aborts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--exit-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    good_app = ScriptedHTTPApp(lambda i, body: chat_reply(soda_reply(False)))
    with LoopbackServer(good_app) as good:
        silent = SilentServer()
        figures["mixed_servers"] = mixed(silent, good.base_url, args.checks)
        figures["cancellation"] = cancelled(silent, 20)
        figures["tls_on_plain_port"] = tls(silent, 40)
        silent.close()
    figures["retry_after_3600"] = retry_after()
    figures["converters_and_policy"] = converters_and_policy()
    figures["exit_without_close"] = exits(args.exit_rounds)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(code == 0 for code in figures["exit_without_close"]["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
