"""What a cascade buys: how many calls each stage settled, what each stage and the whole chain
cost, and what it did to recall and false positives against its last judge alone (judged in
the same run, on the same records, from the same answers)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

MECHANICAL_NOTE = (
    "Settle shares, latencies and recall/FPR reflect the stage judges of this run. With a keyword, "
    "scripted or random-weight screen they are mechanical (they show the cascade working, not a "
    "screen's quality); see benchmarks/cascade.sh for the run with real weights."
)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    data = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(data, 50)), "p95": float(np.percentile(data, 95))}


def _rates(pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    tp = sum(1 for label, predicted in pairs if label == 1 and predicted == 1)
    fn = sum(1 for label, predicted in pairs if label == 1 and predicted == 0)
    fp = sum(1 for label, predicted in pairs if label == 0 and predicted == 1)
    tn = sum(1 for label, predicted in pairs if label == 0 and predicted == 0)
    return {
        "recall": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def cascade_report(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """None when no judgment went through a cascade."""
    chained = [j for r in results for j in r["judgments"] if j.get("stages")]
    if not chained:
        return None
    order = list(dict.fromkeys(stage["judge"] for j in chained for stage in j["stages"]))
    settled = Counter(j.get("stage") or "none (on_error)" for j in chained)
    latency = {
        name: _percentiles([s["latency_ms"] for j in chained for s in j["stages"] if s["judge"] == name and s["latency_ms"] is not None])
        for name in order
    }
    end_to_end = _percentiles([sum(s["latency_ms"] or 0.0 for s in j["stages"]) for j in chained])
    both = [r for r in results if r["prediction"] is not None and (r.get("last_judge_alone") or {}).get("prediction") is not None]
    return {
        "judgments": len(chained),
        "settled_by": {name: settled.get(name, 0) for name in [*order, "none (on_error)"] if name in settled or name in order},
        "settled_share": {name: settled.get(name, 0) / len(chained) for name in order},
        "asked": {name: sum(1 for j in chained for s in j["stages"] if s["judge"] == name) for name in order},
        "latency_ms": {"per_stage": latency, "end_to_end": end_to_end, "unit": "amortised batch time per judgment"},
        "quality": {
            "records": len(both),
            "cascade": _rates([(r["label"], r["prediction"]) for r in both]),
            "last_judge_alone": _rates([(r["label"], r["last_judge_alone"]["prediction"]) for r in both]),
        },
        "note": MECHANICAL_NOTE,
    }
