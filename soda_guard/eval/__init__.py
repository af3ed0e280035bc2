"""`soda-guard eval`: measure a judge and a policy on labeled agent trajectories."""

from importlib import import_module

from soda_guard._extras import needs_extra
from soda_guard.eval.dataset import Dataset, EvalRecord, Unreadable, load_dataset
from soda_guard.eval.results import EvalError, read_results

_NEEDS_EVAL_EXTRA = {
    "build_report": "metrics",
    "classification": "metrics",
    "threshold_sweep": "metrics",
    "print_report": "report",
    "write_report": "report",
    "EvalRun": "runner",
    "run_eval": "runner",
    "step_views": "runner",
}

__all__ = [
    "Dataset",
    "EvalError",
    "EvalRecord",
    "Unreadable",
    "load_dataset",
    "read_results",
    *_NEEDS_EVAL_EXTRA,
]


def __getattr__(name: str) -> object:
    """Metrics and plots need numpy and matplotlib (the [eval] extra): imported on first use, so
    the command line, which imports this package, still runs on the base install."""
    module = _NEEDS_EVAL_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with needs_extra(f"soda_guard.eval.{name}"):
        return getattr(import_module(f"soda_guard.eval.{module}"), name)
