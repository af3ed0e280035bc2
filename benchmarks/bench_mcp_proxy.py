"""Overhead of the MCP guard proxy: p50 latency of a judged `tools/call` and of a passthrough
request (`tools/list`), through the proxy (scripted judge) and against the server directly,
in the same run, with the `mcp` SDK's client over stdio.

    python benchmarks/bench_mcp_proxy.py [--calls 200]

Prints the p50s, the added milliseconds and the ratio; wall-clock figures vary with the
machine, the ratio and the added time are the numbers to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
SERVER = [sys.executable, str(ROOT / "examples" / "mcp_files_server.py")]
LAUNCHER = str(ROOT / "tests" / "mcp_proxy_scripted.py")
#: every call is judged (no rule short-circuits), by the scripted judge
POLICY = {"version": 1, "judges": {"soda": {"kind": "soda", "model": "scripted"}}}


async def p50(calls: int, once: Callable[[], Awaitable[Any]]) -> float:
    for _ in range(10):
        await once()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await once()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


async def measure(params: StdioServerParameters, calls: int) -> dict[str, float]:
    async with Client(params) as client:
        await client.list_tools()
        return {
            "tools/call": await p50(calls, lambda: client.call_tool("read_file", {"path": "notes.txt"})),
            "tools/list": await p50(calls, client.list_tools),
        }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(json.dumps(POLICY))
        direct = StdioServerParameters(command=SERVER[0], args=SERVER[1:])
        proxied = StdioServerParameters(command=sys.executable, args=[LAUNCHER, str(policy), "never-unsafe", "--", *SERVER])
        base = await measure(direct, args.calls)
        guarded = await measure(proxied, args.calls)
    print(f"{'request':<12} {'direct p50 ms':>14} {'proxy p50 ms':>13} {'added ms':>9} {'ratio':>6}")
    for kind in base:
        added = guarded[kind] - base[kind]
        print(f"{kind:<12} {base[kind]:>14.2f} {guarded[kind]:>13.2f} {added:>9.2f} {guarded[kind] / base[kind]:>6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
