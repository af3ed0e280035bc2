"""`python benchmarks/bench_checkpoint.py [--calls 150] [--parallel 1]`: what the guard adds to
a checkpointed agent run.

One `create_agent` run of N tool calls (one model turn per `--parallel` calls, then a final
answer) over `SqliteSaver`, once without the guard and once with `SodaGuardMiddleware` and a
scripted judge that answers at once on the caller's thread, as a keyword screen does (so the
figures are the guard's bookkeeping, not a model); `--judge-thread` puts it on a judge thread,
as a model or a server is, to show that hop's cost too; `--blocks` gives the model's turns
their content as a list of blocks (a text block and a `tool_use` block per call), as
Anthropic models send them, and the tool's results as a text block, as MCP tools do. Printed: the
checkpoint database's size and the run's wall time for both, and their ratios. Each run gets
a fresh database in a temporary folder; with `--repeat N` the two runs alternate N times (each
first every other time) and the fastest of each is kept (the sizes do not vary), so a busy
machine blurs the ratio less.
Each timed run starts from a collected heap (`gc.collect()`): otherwise a full collection
of ~100 ms that the earlier runs' garbage made due lands in whichever run comes next.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.backends.scripted import keyword_responder
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.testing import scripted_model, tool_calls_message


def _order(order_id: str) -> str:
    return f"order {order_id}: 2 items, shipped, tracking 1Z{order_id}99"


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return _order(order_id)


@tool
def lookup_order_blocks(order_id: str) -> list[dict[str, str]]:
    """Look up an order."""
    return [{"type": "text", "text": _order(order_id)}]


def replies(calls: int, parallel: int, blocks: bool = False) -> list[Any]:
    turns: list[Any] = []
    name = "lookup_order_blocks" if blocks else "lookup_order"
    for start in range(0, calls, parallel):
        batch = [(name, {"order_id": f"A{n:05d}"}) for n in range(start, min(calls, start + parallel))]
        message = tool_calls_message(*batch, text="Checking the next orders.")
        if blocks:
            message.content = [
                {"type": "text", "text": "Checking the next orders."},
                *({"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["args"]} for c in message.tool_calls),
            ]
        turns.append(message)
    return [*turns, "All orders are on their way."]


def run(
    calls: int, parallel: int, guarded: bool, folder: Path, judge_thread: bool = False, blocks: bool = False
) -> tuple[int, float]:
    path = folder / ("guarded.sqlite" if guarded else "plain.sqlite")
    middleware = []
    if guarded:
        policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}})
        responder = keyword_responder(["refund_everything"])
        if judge_thread:  # a responder not marked instant: answered on a judge thread, as a model is
            responder = functools.partial(responder)
        guard = Guard(policy, backends={"soda": ScriptedBackend(responder)})
        middleware = [SodaGuardMiddleware(guard, otel=False)]
    with sqlite3.connect(path, check_same_thread=False) as connection:
        agent = create_agent(scripted_model(replies(calls, parallel, blocks)), [lookup_order_blocks if blocks else lookup_order], middleware=middleware,
                             checkpointer=SqliteSaver(connection))
        gc.collect()  # each run starts from a collected heap: a collection the other left due lands in neither
        start = time.perf_counter()
        agent.invoke({"messages": [{"role": "user", "content": "Check all my orders."}]},
                     {"configurable": {"thread_id": "bench"}, "recursion_limit": 10 * calls + 10})
        elapsed = time.perf_counter() - start
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # count what the WAL still holds
    return sum(p.stat().st_size for p in folder.glob(path.name + "*")), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--parallel", type=int, default=1, help="tool calls per model turn")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--judge-thread", action="store_true", help="judge on a judge thread, as a model or server is")
    parser.add_argument("--blocks", action="store_true", help="content as lists of blocks, as Anthropic models and MCP tools send")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    plain_s = guarded_s = float("inf")
    for round_ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            # each goes first every other round, so neither always runs on what the other left
            for guarded in (False, True) if round_ % 2 == 0 else (True, False):
                size, elapsed = run(args.calls, args.parallel, guarded, Path(folder), guarded and args.judge_thread, args.blocks)
                if guarded:
                    guarded_size, guarded_s = size, min(guarded_s, elapsed)
                else:
                    plain_size, plain_s = size, min(plain_s, elapsed)
    figures = {
        "calls": args.calls,
        "parallel": args.parallel,
        "judge_thread": args.judge_thread,
        "blocks": args.blocks,
        "db_mb_unguarded": round(plain_size / 2**20, 2),
        "db_mb_guarded": round(guarded_size / 2**20, 2),
        "db_size_ratio": round(guarded_size / plain_size, 3),
        "time_s_unguarded": round(plain_s, 2),
        "time_s_guarded": round(guarded_s, 2),
        "time_ratio": round(guarded_s / plain_s, 3),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
