"""The end of an evaluation: `report.json`, the plots, and the table printed to the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from soda_guard.eval.dataset import Unreadable
from soda_guard.eval.metrics import build_report
from soda_guard.eval.plots import write_plots


def write_report(
    out: Path,
    results: Sequence[dict[str, Any]],
    unreadable: Sequence[Unreadable],
    *,
    mode: str,
    target_recall: float,
    wall_s: float | None = None,
    judged_now: int | None = None,
) -> dict[str, Any]:
    report = build_report(
        results, unreadable, mode=mode, target_recall=target_recall, wall_s=wall_s, judged_now=judged_now
    )
    plots = write_plots(report, results, out)
    report["files"] = {"results": "results.jsonl", "plots": [path.name for path in plots]}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_coverage(accuracy: float | None, failures: dict[str, Any], records: int) -> str:
    """Accuracy counts only records that got a prediction; next to it, how many those were, so a
    run where most judgments failed cannot pass for a good one."""
    missing = failures["records_without_prediction"]
    if not missing:
        return _fmt(accuracy)
    return f"{_fmt(accuracy)} (coverage {_fmt(failures['coverage'])}: {records - missing} of {records} records)"


def print_report(report: dict[str, Any], console: Console) -> None:
    data, failures, metrics = report["dataset"], report["failures"], report["classification"]
    summary = Table(title=f"soda-guard eval ({report['mode']})", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("records (judged / unreadable)", f"{data['judged']} / {data['unreadable']}"),
        ("labels (safe / unsafe)", f"{data['labels']['safe']} / {data['labels']['unsafe']}"),
        ("accuracy", _with_coverage(metrics["accuracy"], failures, data["judged"])),
        ("balanced accuracy", metrics["balanced_accuracy"]),
        ("parse-failure rate", failures["parse_failure_rate"]),
        ("error rate", failures["error_rate"]),
        ("records without a prediction", failures["records_without_prediction"]),
        ("ROC AUC", report["threshold_sweep"]["roc_auc"]),
        ("latency p50 / p95 (ms)", f"{_fmt(report['latency_ms']['p50'], 1)} / {_fmt(report['latency_ms']['p95'], 1)}"),
        ("tokens per record", _fmt(report["tokens_per_record"], 1)),
        ("records/s", report["throughput"]["records_per_s"]),
    ]
    for name, value in rows:
        summary.add_row(name, _fmt(value))
    console.print(summary)
    for entry in failures.get("common_causes", []):
        console.print(f"[red]no verdict[/red] x{entry['count']}: {escape(entry['cause'])}", highlight=False)

    classes = Table(title="per class")
    for column in ("class", "precision", "recall", "F1", "support"):
        classes.add_column(column, justify="right" if column != "class" else "left")
    for name, values in metrics["per_class"].items():
        classes.add_row(name, _fmt(values["precision"]), _fmt(values["recall"]), _fmt(values["f1"]), str(values["support"]))
    console.print(classes)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    console.print(f"confusion matrix (rows label, columns judge): safe [{tn} {fp}]  unsafe [{fn} {tp}]")

    sweep = report["threshold_sweep"]
    best, target = sweep["best_f1"], sweep["target_recall"]
    if best is not None:
        console.print(f"best F1 {_fmt(best['f1'])} at threshold {_fmt(best['threshold'], 4)}")
    if target["point"] is not None:
        point = target["point"]
        console.print(
            f"recall >= {target['target']}: threshold {_fmt(point['threshold'], 4)} "
            f"(recall {_fmt(point['recall'])}, precision {_fmt(point['precision'])}, FPR {_fmt(point['fpr'])})"
        )

    policy = report["policy"]
    counts = ", ".join(f"{count} {action}" for action, count in policy["decisions"].items())
    console.print(f"policy, per {policy['unit']}: {counts}")
    if "per_step" in report:
        step = report["per_step"]
        console.print(
            f"per step: {step['unsafe_caught']}/{step['unsafe_records']} unsafe runs stopped "
            f"(median first step {_fmt(step['first_caught_step']['median'], 1)}), "
            f"false-block rate {_fmt(step['false_block_rate'])} per safe run, "
            f"{_fmt(step['false_block_rate_per_call'])} per safe tool call"
        )
    if "cascade" in report:
        print_cascade(report["cascade"], console)
    for entry in data["unreadable_records"][:20]:
        console.print(f"[yellow]unreadable[/yellow] {escape(entry['id'])}: {escape(entry['reason'])}", highlight=False)
    if data["unreadable"] > 20:
        console.print(f"... and {data['unreadable'] - 20} more unreadable records (see report.json)")


def print_cascade(cascade: dict[str, Any], console: Console) -> None:
    table = Table(title=f"cascade ({cascade['judgments']} judgments; latency: {cascade['latency_ms']['unit']})")
    for column in ("stage", "asked", "settled", "share", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for name, share in cascade["settled_share"].items():
        latency = cascade["latency_ms"]["per_stage"][name]
        table.add_row(
            name, str(cascade["asked"][name]), str(cascade["settled_by"].get(name, 0)), _fmt(share), _fmt(latency["p50"], 1), _fmt(latency["p95"], 1)
        )
    end = cascade["latency_ms"]["end_to_end"]
    table.add_row("end to end", "", str(cascade["settled_by"].get("none (on_error)", 0)) + " unsettled", "", _fmt(end["p50"], 1), _fmt(end["p95"], 1))
    console.print(table)
    quality = cascade["quality"]
    for name in ("cascade", "last_judge_alone"):
        console.print(
            f"{name.replace('_', ' ')}: recall {_fmt(quality[name]['recall'])}, FPR {_fmt(quality[name]['fpr'])} "
            f"({quality['records']} records)"
        )
    console.print(escape(cascade["note"]), highlight=False)
