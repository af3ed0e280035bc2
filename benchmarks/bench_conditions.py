"""What `when:` conditions cost per tool call: `Policy.route` over every pending call of the
shared R-Judge trajectories, for a policy with every condition but `verdict`, against the
name-only lookup of the same rules. Prints microseconds per call and their ratio.

    python benchmarks/bench_conditions.py [path/to/rjudge.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from soda_guard import Policy
from soda_guard.converters import from_agent_record
from soda_guard.eval.runner import step_views

POLICY = """
rules:
  - {tools: ["*Send*", "*Post*", "*Share*"], when: {flows_from: {tools: ["*"]}}, action: block}
  - {tools: ["*Transfer*", "*Pay*"], when: {args: {amount: {gt: 1000}}}, action: escalate}
  - {tools: ["*"], when: {args: {path: {glob: "/etc/*"}}}, action: block}
  - {tools: ["*Delete*"], when: {limit: {calls: 3}}, action: block}
  - {tools: ["*Post*"], when: {after: ["*Read*"]}, action: escalate}
"""


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/datasets/rjudge.json")
    policy = Policy.from_yaml(POLICY)
    views = [view for record in json.loads(source.read_text()) for view in step_views(from_agent_record(record))]
    calls = [(call, view) for view in views for call in view.pending_tool_calls()]
    for name, run in (("route", lambda: [policy.route(c, v) for c, v in calls]), ("rule_for", lambda: [policy.rule_for(c.name) for c, _ in calls])):
        best = min(_timed(run) for _ in range(5))
        print(f"{name}: {best / len(calls) * 1e6:.1f} us per call ({len(calls)} calls)")
        if name == "route":
            routed = best
    print(f"route / rule_for: {routed / best:.1f}x")


def _timed(run) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
