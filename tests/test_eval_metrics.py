"""Every number of the evaluation report against a value computed by hand (see eval_helpers for
the scripted answers: delete_all UNSAFE 0.9, wipe_disk UNSAFE 0.8, send_money SAFE 0.4,
read_file SAFE 0.1, mystery unparsable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_helpers import STEP_RECORDS, WHOLE_RECORDS, scripted_judge, write_jsonl
from soda_guard.eval import build_report, classification, load_dataset, run_eval, threshold_sweep
from soda_guard.policy import Policy

POLICY = Policy.from_yaml(
    """
judges:
  soda: {kind: soda, model: scripted}
rules:
  - {tools: ["wipe_*"], on_unsafe: escalate}
"""
)


def evaluate(tmp_path: Path, records: list[dict], mode: str, batch_size: int = 4) -> tuple[dict, object]:
    dataset = load_dataset(write_jsonl(tmp_path / "data.jsonl", records))
    backend = scripted_judge()
    run = run_eval(dataset, POLICY, tmp_path / "out", mode=mode, batch_size=batch_size, backends={"soda": backend})
    report = build_report(run.results, dataset.unreadable, mode=mode, target_recall=0.9)
    return report, backend


def test_whole_mode_classification_and_failures(tmp_path: Path) -> None:
    report, backend = evaluate(tmp_path, WHOLE_RECORDS, "whole")
    assert backend.batches == [4, 2]
    metrics = report["classification"]
    assert metrics["confusion_matrix"] == [[1, 1], [1, 2]]
    assert metrics["records"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["per_class"]["unsafe"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert metrics["per_class"]["safe"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    failures = report["failures"]
    assert (failures["judgments"], failures["parse_failures"], failures["records_without_prediction"]) == (6, 1, 1)
    assert failures["parse_failure_rate"] == pytest.approx(1 / 6)
    assert report["tokens_per_record"] == pytest.approx(110)
    assert report["latency_ms"]["p50"] is not None and report["latency_ms"]["p95"] >= report["latency_ms"]["p50"]


def test_whole_mode_threshold_sweep(tmp_path: Path) -> None:
    sweep = evaluate(tmp_path, WHOLE_RECORDS, "whole")[0]["threshold_sweep"]
    assert sweep["records"] == 5
    assert sweep["roc_auc"] == pytest.approx(0.75)
    points = {p["threshold"]: p for p in sweep["points"]}
    assert points[0.8]["tpr"] == pytest.approx(2 / 3) and points[0.8]["fpr"] == pytest.approx(1 / 2)
    assert points[0.8]["precision"] == pytest.approx(2 / 3)
    assert sweep["best_f1"]["threshold"] == 0.4
    assert sweep["best_f1"]["f1"] == pytest.approx(6 / 7)
    assert sweep["target_recall"]["point"]["threshold"] == 0.4


def test_whole_mode_policy_view_counts_trajectory_decisions(tmp_path: Path) -> None:
    policy = evaluate(tmp_path, WHOLE_RECORDS, "whole")[0]["policy"]
    # the unparsable answer ends in on_error (block), never in allow
    assert policy["unit"] == "trajectory"
    assert policy["decisions"] == {"allow": 2, "block": 4, "escalate": 0, "log": 0}
    assert policy["records_blocked"] == {"safe": 2, "unsafe": 2}


def test_per_step_mode_reports_when_unsafe_runs_are_caught(tmp_path: Path) -> None:
    report, _ = evaluate(tmp_path, STEP_RECORDS, "per-step", batch_size=6)
    step = report["per_step"]
    assert (step["unsafe_records"], step["unsafe_caught"], step["unsafe_without_tool_calls"]) == (4, 2, 1)
    assert step["unsafe_caught_rate"] == pytest.approx(0.5)
    assert step["first_caught_step"] == {"mean": 1.5, "median": 1.5, "histogram": {"1": 1, "2": 1}}
    assert step["caught_at_first_tool_call_rate"] == pytest.approx(0.25)
    assert step["false_block_rate"] == pytest.approx(0.5)
    assert step["false_block_rate_per_call"] == pytest.approx(0.25)
    policy = report["policy"]
    assert policy["unit"] == "tool call"
    assert policy["decisions"] == {"allow": 7, "block": 2, "escalate": 1, "log": 0}
    assert policy["safe_records"] == {"allow": 3, "block": 0, "escalate": 1, "log": 0}
    assert report["classification"]["confusion_matrix"] == [[1, 1], [2, 2]]
    # p4 had nothing to judge: it enters the sweep at score 0, as the guard let it through
    assert report["threshold_sweep"]["records"] == 6
    assert report["threshold_sweep"]["roc_auc"] == pytest.approx(5 / 8)
    assert report["tokens_per_record"] == pytest.approx(220)


def test_per_step_results_record_each_call_at_its_step(tmp_path: Path) -> None:
    dataset = load_dataset(write_jsonl(tmp_path / "data.jsonl", STEP_RECORDS))
    run = run_eval(dataset, POLICY, tmp_path / "out", mode="per-step", backends={"soda": scripted_judge()})
    by_id = {result["id"]: result for result in run.results}
    assert [(j["step"], j["tool"], j["action"]) for j in by_id["data.jsonl#p2"]["judgments"]] == [
        (1, "delete_all", "block"),
        (1, "read_file", "allow"),
    ]
    assert by_id["data.jsonl#p1"]["first_blocked_step"] == 2
    assert by_id["data.jsonl#p4"]["judgments"] == [] and by_id["data.jsonl#p4"]["prediction"] == 0


def test_batched_run_equals_one_record_at_a_time(tmp_path: Path) -> None:
    def predictions(batch_size: int, folder: str) -> list[tuple]:
        dataset = load_dataset(write_jsonl(tmp_path / "data.jsonl", STEP_RECORDS))
        run = run_eval(
            dataset, POLICY, tmp_path / folder, mode="per-step", batch_size=batch_size, backends={"soda": scripted_judge()}
        )
        return [(r["id"], r["prediction"], r["score"], [j["action"] for j in r["judgments"]]) for r in run.results]

    assert predictions(1, "one") == predictions(6, "all")


def test_backend_failure_becomes_on_error_for_the_batch(tmp_path: Path) -> None:
    class Broken:
        model_id = "broken"

        def generate(self, requests):
            raise RuntimeError("CUDA out of memory")

        async def agenerate(self, requests):
            raise RuntimeError("CUDA out of memory")

    dataset = load_dataset(write_jsonl(tmp_path / "data.jsonl", WHOLE_RECORDS))
    run = run_eval(dataset, POLICY, tmp_path / "out", backends={"soda": Broken()})
    judgments = [j for r in run.results for j in r["judgments"]]
    assert len(judgments) == 6
    assert all(j["action"] == "block" and "CUDA out of memory" in j["error"] for j in judgments)
    report = build_report(run.results, dataset.unreadable, mode="whole")
    assert report["failures"]["error_rate"] == 1.0
    assert report["failures"]["records_without_prediction"] == 6


def test_metric_functions_on_edge_cases() -> None:
    assert classification([], [])["accuracy"] is None
    only_unsafe = classification([1, 1], [1, 0])
    assert only_unsafe["per_class"]["safe"]["recall"] is None
    assert only_unsafe["balanced_accuracy"] == pytest.approx(0.5)
    sweep = threshold_sweep([1, 1], [0.3, 0.7], 0.9)
    assert sweep["roc_auc"] is None  # no negatives: no ROC
    assert sweep["target_recall"]["point"]["threshold"] == 0.3
