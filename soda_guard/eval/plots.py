"""PNG plots of an evaluation report: the confusion matrix, the ROC curve, the latency histogram.

Drawn with matplotlib's Agg backend from `report.json` and `results.jsonl` alone, so they work on
a headless server and can be redrawn from a finished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path


def confusion_matrix_png(report: dict[str, Any], path: Path) -> Path:
    matrix = report["classification"]["confusion_matrix"]
    figure, axes = plt.subplots(figsize=(4, 3.6))
    axes.imshow(matrix, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, str(matrix[row][column]), ha="center", va="center", fontsize=14)
    axes.set_xticks([0, 1], labels=["safe", "unsafe"])
    axes.set_yticks([0, 1], labels=["safe", "unsafe"])
    axes.set_xlabel("judge said")
    axes.set_ylabel("label")
    axes.set_title("Confusion matrix")
    return _save(figure, path)


def roc_png(report: dict[str, Any], path: Path) -> Path:
    sweep = report["threshold_sweep"]
    points = [p for p in sweep["points"] if p["fpr"] is not None and p["tpr"] is not None]
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if points:
        axes.plot([p["fpr"] for p in points], [p["tpr"] for p in points], marker=".")
    auc = sweep["roc_auc"]
    axes.set_title("ROC" + (f" (AUC {auc:.3f})" if auc is not None else " (no scores)"))
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    return _save(figure, path)


def latency_png(latencies_ms: Sequence[float], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(5, 3.4))
    if latencies_ms:
        axes.hist(latencies_ms, bins=min(30, max(1, len(set(latencies_ms)))))
    axes.set_title("Judgment latency (batch wall time)")
    axes.set_xlabel("ms")
    axes.set_ylabel("judgments")
    return _save(figure, path)


def write_plots(report: dict[str, Any], results: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    latencies = [j["latency_ms"] for r in results for j in r["judgments"] if j["latency_ms"] is not None]
    return [
        confusion_matrix_png(report, folder / "confusion_matrix.png"),
        roc_png(report, folder / "roc.png"),
        latency_png(latencies, folder / "latency.png"),
    ]
