"""`soda-guard eval` with a cascade: settle shares, per-stage and end-to-end latency, and
recall / FPR of the cascade against its last judge alone, in one run, checked by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eval_helpers import WHOLE_RECORDS, scripted_judge, write_jsonl
from typer.testing import CliRunner

from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.scripted import ScriptedBackend, soda_reply
from soda_guard.cli import app
from soda_guard.eval.dataset import load_dataset
from soda_guard.eval.metrics import build_report
from soda_guard.eval.runner import last_stage_policy, run_eval
from soda_guard.policy import Policy

POLICY = Policy.from_yaml(
    """
judges:
  screen: {kind: soda, model: scripted-screen}
  soda: {kind: soda, model: scripted}
  tiered: {kind: cascade, stages: [screen, soda], settle_below: 0.05, settle_above: 0.95}
defaults: {judge: tiered}
"""
)
SCREEN = {"delete_all": (True, 0.99), "send_money": (True, 0.99), "read_file": (False, 0.01)}


def screen(request: GenerationRequest) -> GenerationResult:
    names = re.findall(r'"name": "([a-z_]+)"', request.messages[-1]["content"])
    unsafe, score = SCREEN.get(names[-1], (False, 0.5))
    return GenerationResult(text=soda_reply(unsafe), score=score)


def test_the_report_compares_the_cascade_with_its_last_judge_alone(tmp_path: Path) -> None:
    dataset = load_dataset(write_jsonl(tmp_path / "records.jsonl", WHOLE_RECORDS))
    soda = scripted_judge()
    run = run_eval(dataset, POLICY, tmp_path / "out", backends={"screen": ScriptedBackend(screen), "soda": soda})
    by_id = {r["id"].rpartition("#")[2]: r for r in run.results}
    assert {i: r["judgments"][0]["stage"] for i, r in by_id.items()} == {"a": "screen", "b": "screen", "c": "screen", "d": "soda", "e": "soda", "f": None}
    assert {i: r["prediction"] for i, r in by_id.items()} == {"a": 1, "b": 1, "c": 0, "d": 1, "e": 1, "f": None}
    assert {i: r["last_judge_alone"]["prediction"] for i, r in by_id.items()} == {"a": 1, "b": 0, "c": 0, "d": 1, "e": 1, "f": None}
    # the last judge was asked once per distinct conversation (d and e are the same one): its
    # answers serve both the chain and the comparison
    assert len(soda.requests) == 5
    cascade = build_report(run.results, [], mode="whole")["cascade"]
    assert cascade["settled_by"] == {"screen": 3, "soda": 2, "none (on_error)": 1}
    assert cascade["settled_share"] == {"screen": 0.5, "soda": 2 / 6}
    assert cascade["asked"] == {"screen": 6, "soda": 3}
    quality = cascade["quality"]
    assert quality["records"] == 5
    assert (quality["cascade"]["recall"], quality["cascade"]["fpr"]) == (1.0, 0.5)
    assert (quality["last_judge_alone"]["recall"], quality["last_judge_alone"]["fpr"]) == (2 / 3, 0.5)
    latency = cascade["latency_ms"]
    assert set(latency["per_stage"]) == {"screen", "soda"} and latency["end_to_end"]["p50"] is not None
    assert "mechanical" in cascade["note"]


def test_a_policy_without_a_cascade_has_no_comparison() -> None:
    assert last_stage_policy(Policy.from_yaml("judges:\n  soda: {kind: soda, model: m}\n")) is None
    alone = last_stage_policy(POLICY)
    assert alone is not None and alone.defaults.judge == "soda" and alone.judges == POLICY.judges


def test_eval_command_prints_the_cascade_table_with_a_keyword_screen(tmp_path: Path, tiny_judge_dir: Path) -> None:
    """A keyword screen settles the calls it is sure of; the rest reach a random-weight judge,
    whose answers are not verdicts: those records end in on_error, and the table says so."""
    records = write_jsonl(tmp_path / "records.jsonl", WHOLE_RECORDS)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "judges:\n"
        "  words: {kind: keywords, unsafe: ['delete_all'], safe: ['read_file'], match: all}\n"
        f"  soda: {{kind: soda, model: {tiny_judge_dir}, device: cpu, max_new_tokens: 4}}\n"
        "  tiered: {kind: cascade, stages: [words, soda]}\n"
        "defaults: {judge: tiered}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(records), "--policy", str(policy), "--out", str(out), "--quiet"])
    assert "cascade (6 judgments" in result.output and "last judge alone: recall" in result.output
    assert "mechanical" in result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["cascade"]["settled_by"] == {"words": 2, "soda": 0, "none (on_error)": 4}


def test_the_comparison_policy_keeps_rules_and_conditions_and_swaps_every_cascade() -> None:
    policy = Policy.from_yaml(
        """
judges:
  words: {kind: keywords, unsafe: [x]}
  soda: {kind: soda, model: m}
  tiered: {kind: cascade, stages: [words, soda]}
  result_words: {kind: keywords, unsafe: [x], match: all}
  results: {kind: qwen3guard, model: q, mode: tool_result}
  result_tiers: {kind: cascade, stages: [result_words, results]}
defaults: {judge: tiered}
rules:
  - {tools: [x], when: {args: {k: {in: [1, 2], eq: null}}}, action: block}
  - {tools: [y], judge: tiered, when: {verdict: {labels: [unsafe]}}, action: block}
tool_results: {judge: result_tiers}
"""
    )
    alone = last_stage_policy(policy)
    assert alone is not None
    assert (alone.defaults.judge, alone.rules[1].judge, alone.tool_results.judge) == ("soda", "soda", "results")
    assert alone.rules[0].when == policy.rules[0].when and alone.rules[1].when == policy.rules[1].when
