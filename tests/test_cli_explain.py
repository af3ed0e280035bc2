"""`soda-guard explain`: the rule, condition, judge and cascade stages a conversation's
pending calls would hit, from the policy alone (the judges named here have no weights at all,
so any attempt to load or ask one would fail the command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from soda_guard.cli import app

runner = CliRunner()

POLICY = """
judges:
  words: {kind: keywords, unsafe: ['rm -rf'], safe: ['^get_weather ']}
  soda: {kind: soda, model: /nonexistent/soda}
  results: {kind: qwen3guard, model: /nonexistent/gen}
  tiered: {kind: cascade, stages: [words, soda]}
defaults: {judge: tiered}
rules:
  - {name: big-transfer, tools: ["transfer_*"], when: {args: {amount: {gt: 1000}}}, action: escalate}
  - {name: exfiltration, tools: ["send_email"], when: {flows_from: {tools: ["fetch_*"], into: args.body}}, action: block}
  - {name: pii, tools: ["lookup_*"], judge: results, when: {verdict: {categories: [PII]}}, action: block}
"""

SECRET = "Customer list: Ada Lovelace, 12 Analytical Row, London; Alan Turing, 3 Bletchley Way."


def conversation(tmp_path: Path, *calls: tuple[str, dict[str, Any]], history: bool = False) -> Path:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Help me out."}]
    if history:
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [{"id": "h", "type": "function", "function": {"name": "fetch_customers", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "h", "content": SECRET},
        ]
    messages.append(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}} for i, (name, args) in enumerate(calls)
            ],
        }
    )
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"messages": messages}))
    return path


def explain(tmp_path: Path, conversation_file: Path) -> list[dict[str, Any]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    result = runner.invoke(app, ["explain", str(conversation_file), "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["explain"]


def test_explain_names_rule_condition_and_action_without_a_judge(tmp_path: Path) -> None:
    [big, small] = explain(tmp_path, conversation(tmp_path, ("transfer_funds", {"amount": 5000}), ("transfer_funds", {"amount": 5})))
    assert (big["rule"], big["condition"], big["action"], big["judge"]) == ("big-transfer", "args.amount gt 1000", "escalate", None)
    assert (small["rule"], small["condition"], small["action"], small["judge"]) == ("defaults", None, None, "tiered")
    assert [stage["judge"] for stage in small["cascade"]["stages"]] == ["words", "soda"]


def test_explain_follows_the_thread_history(tmp_path: Path) -> None:
    [leak] = explain(tmp_path, conversation(tmp_path, ("send_email", {"body": "FYI " + SECRET}), history=True))
    assert (leak["rule"], leak["action"]) == ("exfiltration", "block")
    assert "fetch_customers" in leak["condition"]
    [fine] = explain(tmp_path, conversation(tmp_path, ("send_email", {"body": "See you at noon."}), history=True))
    assert fine["rule"] == "defaults"


def test_explain_shows_which_stage_settles_when_a_keyword_screen_can_tell(tmp_path: Path) -> None:
    [shell] = explain(tmp_path, conversation(tmp_path, ("shell", {"cmd": "rm -rf /"})))
    assert shell["stage"] == "words" and shell["cascade"]["stages"][0]["keywords"]["label"] == "unsafe"
    [weather] = explain(tmp_path, conversation(tmp_path, ("get_weather", {"city": "Oslo"})))
    assert weather["stage"] == "words"
    [other] = explain(tmp_path, conversation(tmp_path, ("list_files", {})))
    assert other["stage"] is None  # the model stage would be asked: unknown until it is


def test_explain_lists_verdict_rules_read_first(tmp_path: Path) -> None:
    [lookup] = explain(tmp_path, conversation(tmp_path, ("lookup_user", {"id": 3})))
    [candidate] = lookup["read_first"]
    assert (candidate["rule"], candidate["judge"], candidate["action"]) == ("pii", "results", "block")
    assert candidate["applies_if"] == {"categories": ["PII"]}
    assert (lookup["rule"], lookup["judge"]) == ("defaults", "tiered")


def test_explain_with_a_bad_policy_fails_naming_the_key(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - {tools: [a], when: {limit: {calls: -1}}, action: block}\n")
    result = runner.invoke(app, ["explain", str(conversation(tmp_path, ("a", {}))), "--policy", str(policy)])
    assert result.exit_code == 2 and "rules.0.when.limit.calls" in result.output
