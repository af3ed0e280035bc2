"""`python benchmarks/bench_instructions.py [--calls 150] [--parallel 1]`: what the guard adds
to a checkpointed agent run, counted in instructions instead of seconds.

On a shared machine the wall-clock ratio of `bench_checkpoint.py` moves by more than the
differences worth measuring; the instructions a run executes move far less (a few tenths of a
percent between invocations, where LangGraph's thread pools interleave differently: compare
changes larger than that, or count both versions side by side). This runs the same runs as
`bench_checkpoint.py` (unguarded, a pass-through middleware with the guard's hooks and state,
guarded) under `valgrind --tool=callgrind`, each kind in a process of its own: a warm-up run,
then two runs counted from just after the `gc.collect()` that precedes each (as
`bench_checkpoint.py` starts its clock) to the run's end.
Printed: instructions per run and the ratios to the unguarded run. Needs valgrind
(`apt-get install valgrind`); a few minutes. A count is not a time (it leaves out cache misses
and waits), so it complements the wall-clock benchmark rather than replacing it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

KINDS = ("unguarded", "pass-through", "guarded")
WARM_UP_RUNS = 1


def _middleware(kind: str) -> list[Any]:
    from langchain.agents.middleware import AgentMiddleware

    from soda_guard import Guard, Policy, ScriptedBackend
    from soda_guard.backends.scripted import keyword_responder
    from soda_guard.integrations.langchain import SodaGuardMiddleware, SodaGuardState

    class PassThrough(AgentMiddleware):
        state_schema = SodaGuardState

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request)

        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            return handler(request)

    if kind == "unguarded":
        return []
    if kind == "pass-through":
        return [PassThrough()]
    policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "scripted"}}})
    guard = Guard(policy, backends={"soda": ScriptedBackend(keyword_responder(["refund_everything"]))})
    return [SodaGuardMiddleware(guard, otel=False)]


def _child(kind: str, runs: int, calls: int, parallel: int, blocks: bool) -> None:
    """One process under valgrind: a warm-up run, an empty count (callgrind's first zeroing
    leaves the warm-up's worker threads counted: the window after it reads high), then `runs`
    measured ones."""
    import sqlite3

    from langchain.agents import create_agent
    from langgraph.checkpoint.sqlite import SqliteSaver

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_checkpoint import lookup_order, lookup_order_blocks, replies, scripted_model

    for index in range(-WARM_UP_RUNS + 1, 1 + runs):
        if index == 1:
            os.getppid()
            os.getpgrp()
        with tempfile.TemporaryDirectory() as folder, sqlite3.connect(Path(folder) / "run.sqlite", check_same_thread=False) as connection:
            agent = create_agent(scripted_model(replies(calls, parallel, blocks)), [lookup_order_blocks if blocks else lookup_order],
                                 middleware=_middleware(kind), checkpointer=SqliteSaver(connection))
            gc.collect()
            if index > 0:
                os.getppid()  # callgrind zeroes its counts here (`--zero-before`) ...
            agent.invoke({"messages": [{"role": "user", "content": "Check all my orders."}]},
                         {"configurable": {"thread_id": "bench"}, "recursion_limit": 10 * calls + 10})
            if index > 0:
                os.getpgrp()  # ... and writes them out here (`--dump-before`)


def _count(kind: str, runs: int, calls: int, parallel: int, blocks: bool) -> int:
    """Instructions of the `runs` measured runs of `kind`, summed."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--zero-before=getppid", "--dump-before=getpgrp", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--child", kind, "--runs", str(runs), "--calls", str(calls), "--parallel", str(parallel),
            *(["--blocks"] if blocks else []),
        ]
        subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
        parts = [Path(f"{out}.{part}") for part in range(2, runs + 2)]  # part 1: the empty count
        totals = [re.search(r"^summary:\s+(\d+)", path.read_text(), re.MULTILINE) for path in parts if path.exists()]
        if len(totals) != runs or any(total is None for total in totals):
            raise RuntimeError(f"callgrind wrote {len(totals)} of {runs} counts for {kind}")
        return sum(int(total.group(1)) for total in totals if total is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--parallel", type=int, default=1, help="tool calls per model turn")
    parser.add_argument("--blocks", action="store_true", help="content as lists of blocks (bench_checkpoint.py --blocks)")
    parser.add_argument("--runs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.runs, args.calls, args.parallel, args.blocks)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(KINDS, pool.map(lambda kind: _count(kind, args.runs, args.calls, args.parallel, args.blocks), KINDS)))
    per_run = {kind: counts[kind] // args.runs for kind in KINDS}
    figures: dict[str, Any] = {"calls": args.calls, "parallel": args.parallel, "blocks": args.blocks}
    for kind in KINDS:
        figures[f"instructions_{kind}"] = per_run[kind]
        figures[f"ratio_{kind}"] = round(per_run[kind] / per_run["unguarded"], 4)
    turns = -(-args.calls // args.parallel) + 1  # and the final answer
    figures["guard_instructions_per_turn"] = (per_run["guarded"] - per_run["pass-through"]) // turns
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>30}: {value}")


if __name__ == "__main__":
    main()
