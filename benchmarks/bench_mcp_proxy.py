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
CONTEXT = {"soda-guard/context": {"messages": [{"role": "user", "content": "What is in notes.txt?"}]}}


async def timed(once: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await once()
    return (time.perf_counter() - start) * 1000.0


async def measure(direct: StdioServerParameters, proxied: StdioServerParameters, calls: int) -> dict[str, tuple[float, float]]:
    """Both connections open at once and the requests alternate between them, so a busy
    moment on the machine hits both sides alike."""
    async with Client(direct) as plain, Client(proxied) as guarded:
        await plain.list_tools()
        await guarded.list_tools()
        figures = {}
        for kind, make in (
            ("tools/call", lambda client: lambda: client.call_tool("read_file", {"path": "notes.txt"})),
            # a client that sends its context each call: the session restarts from it
            ("tools/call+ctx", lambda client: lambda: client.call_tool("read_file", {"path": "notes.txt"}, meta=CONTEXT)),
            ("tools/list", lambda client: client.list_tools),
        ):
            base: list[float] = []
            through: list[float] = []
            for index in range(calls + 10):
                first, second = (plain, guarded) if index % 2 else (guarded, plain)
                a, b = await timed(make(first)), await timed(make(second))
                if index >= 10:
                    base.append(a if first is plain else b)
                    through.append(b if first is plain else a)
            figures[kind] = (statistics.median(base), statistics.median(through))
        return figures


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(json.dumps(POLICY))
        direct = StdioServerParameters(command=SERVER[0], args=SERVER[1:])
        proxied = StdioServerParameters(command=sys.executable, args=[LAUNCHER, str(policy), "never-unsafe", "--", *SERVER])
        figures = await measure(direct, proxied, args.calls)
    print(f"{'request':<15} {'direct p50 ms':>14} {'proxy p50 ms':>13} {'added ms':>9} {'ratio':>6}")
    for kind, (base, guarded) in figures.items():
        print(f"{kind:<15} {base:>14.2f} {guarded:>13.2f} {guarded - base:>9.2f} {guarded / base:>6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
