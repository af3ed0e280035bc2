"""`soda-guard eval`: measure a judge and a policy on labeled agent trajectories."""

from soda_guard.eval.dataset import Dataset, EvalRecord, Unreadable, load_dataset
from soda_guard.eval.metrics import build_report, classification, threshold_sweep
from soda_guard.eval.report import print_report, write_report
from soda_guard.eval.results import EvalError, read_results
from soda_guard.eval.runner import EvalRun, run_eval, step_views

__all__ = [
    "Dataset",
    "EvalError",
    "EvalRecord",
    "EvalRun",
    "Unreadable",
    "build_report",
    "classification",
    "load_dataset",
    "print_report",
    "read_results",
    "run_eval",
    "step_views",
    "threshold_sweep",
    "write_report",
]
