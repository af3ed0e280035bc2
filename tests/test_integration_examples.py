"""The two examples run offline end to end (scripted model and judge), including a resume in a
second process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from soda_guard import read_audit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_guarded_agent_pauses_then_resumes_in_a_new_process(tmp_path: Path) -> None:
    first = run("guarded_agent.py", cwd=tmp_path)
    assert "PAUSED for review of transfer_money" in first and "delete_records: block" in first
    second = run("guarded_agent.py", "--resume", "reject", cwd=tmp_path)
    assert "review: reject -> refuse" in second and "final answer: Done." in second
    audit = list(read_audit(tmp_path / "guarded_agent.audit.jsonl"))
    assert [d.rule for d in audit].count("review") == 1 and len(audit) == 4
    [review] = [d for d in audit if d.rule == "review"]
    [escalation] = [d for d in audit if d.action.value == "escalate"]
    assert review.review.type == "reject" and review.review.answers == escalation.decision_id


def test_running_the_example_again_after_an_approval_asks_again(tmp_path: Path) -> None:
    """The approval was for that turn's transfer; the same request in a new turn (the agent
    asked again, here with fresh ids) is judged and reviewed again, not run on the old answer."""
    run("guarded_agent.py", cwd=tmp_path)
    assert "final answer: Done." in run("guarded_agent.py", "--resume", "approve", cwd=tmp_path)
    again = run("guarded_agent.py", cwd=tmp_path)
    assert "PAUSED for review of transfer_money" in again
    audit = list(read_audit(tmp_path / "guarded_agent.audit.jsonl"))
    assert [d.action.value for d in audit if d.tool_call and d.tool_call.name == "transfer_money"] == ["escalate", "allow", "escalate"]


def test_guard_node_graph_example(tmp_path: Path) -> None:
    out = run("guard_node_graph.py", cwd=tmp_path)
    assert "post_message: escalate" in out and "-> refuse" in out and "final answer:" in out
