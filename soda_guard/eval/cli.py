"""`soda-guard eval`: judge a labeled dataset with a judge and a policy, and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from soda_guard._extras import needs_extra
from soda_guard.errors import MissingExtraError, ModelLoadError, PolicyError
from soda_guard.eval.dataset import load_dataset
from soda_guard.eval.results import EvalError
from soda_guard.policy import resolve_policy


def _fail(message: str) -> typer.Exit:
    typer.echo(f"soda-guard: {message}", err=True)
    return typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        dataset: Path = typer.Argument(..., help="R-Judge/AgentHarm .json, {messages,label} .jsonl, or a folder of them"),
        model: Optional[str] = typer.Option(None, "--model", help="hub id or local folder of the judge"),
        judge: Optional[str] = typer.Option(
            None,
            "--judge",
            metavar="<soda|qwen3guard|NAME>",
            help="default soda; with --policy: NAME, a judge it declares (default: its default judge)",
        ),
        policy: Optional[Path] = typer.Option(None, "--policy", help="policy YAML (rules, thresholds, backend)"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N records, in file order"),
        out: Path = typer.Option(Path("soda-guard-eval"), "--out", help="folder for results.jsonl, report.json, plots"),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
        per_step: bool = typer.Option(False, "--per-step", help="judge before every tool call, as the guard does"),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="records per backend call"),
        target_recall: float = typer.Option(0.9, "--target-recall", min=0.0, max=1.0, help="recall the threshold sweep must meet"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ... (without --policy)"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    ) -> None:
        """Measure a judge and a policy on labeled agent trajectories (1 = unsafe). Exits 1 when
        no record got a verdict (the most common causes are printed under the table)."""
        try:
            # metrics and plots need numpy and matplotlib: the [eval] extra, imported only here
            # so the rest of the command line runs on the base install
            with needs_extra("soda-guard eval"):
                from soda_guard.eval.report import print_report, write_report
                from soda_guard.eval.runner import run_eval
        except MissingExtraError as error:
            raise _fail(str(error)) from None
        try:
            loaded = load_dataset(dataset, limit=limit)
            chosen, _ = resolve_policy(policy, judge, model, device=device)
        except (FileNotFoundError, PolicyError) as error:
            raise _fail(str(error)) from None
        mode = "per-step" if per_step else "whole"
        console = Console(stderr=True, quiet=quiet)
        progress = Progress(
            TextColumn("judging"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} records/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        task = progress.add_task("judging", total=len(loaded.records), rate="-")

        first: dict[str, float] = {}

        def on_progress(done: int, total: int) -> None:
            """The first call reports the resumed records: reset so they do not inflate the rate."""
            if not first:
                first.update(done=done, start=time.perf_counter())
                progress.reset(task, completed=done, total=total, rate="-")
                return
            elapsed = time.perf_counter() - first["start"]
            rate = f"{(done - first['done']) / elapsed:.1f}" if elapsed > 0 else "-"
            progress.update(task, completed=done, rate=rate)

        settings = {"dataset": str(dataset.resolve()), "limit": limit}
        try:
            with progress:
                run = run_eval(
                    loaded,
                    chosen,
                    out,
                    mode=mode,
                    batch_size=batch_size,
                    resume=resume,
                    settings=settings,
                    on_progress=on_progress,
                )
        except (EvalError, ModelLoadError) as error:
            raise _fail(str(error)) from None
        report = write_report(
            out, run.results, loaded.unreadable, mode=mode, target_recall=target_recall, wall_s=run.wall_s, judged_now=run.judged_now
        )
        print_report(report, Console())
        typer.echo(f"wrote {out / 'report.json'} (judged {run.judged_now}, resumed {run.resumed})")
        if report["dataset"]["judged"] and report["failures"]["coverage"] == 0:
            typer.echo("soda-guard: no record got a verdict from the judge (causes above)", err=True)
            raise typer.Exit(1)
