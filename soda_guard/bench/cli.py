"""`soda-guard bench`: every benchmark section this build has, one table each, and with --json one
object merging all their figures."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import typer
from rich.console import Console

from soda_guard._extras import needs_extra
from soda_guard.bench.report import BenchSection
from soda_guard.errors import MissingExtraError


class Section(str, Enum):
    judging = "judging"
    stream = "stream"
    http = "http"


def run_section(section: Section, quick: bool, device: str) -> BenchSection:
    """One section; a library its extra brings that is missing raises MissingExtraError naming
    that extra (judging and stream need `[local]`, http the `[testing]` server)."""
    with needs_extra(f"bench section {section.value}"):
        module = importlib.import_module(f"soda_guard.bench.{section.value}")
        run: Any = module.run
        kwargs = {"device": device} if "device" in inspect.signature(run).parameters else {}
        return run(quick, **kwargs)


@dataclass
class BenchRun:
    sections: list[BenchSection] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One line per section whose extra is missing."""
    failed: list[str] = field(default_factory=list)
    """One line per section that raised: the others' figures are still reported."""


def run_sections(
    quick: bool, device: str, only: list[Section] | None = None, on_done: Callable[[BenchSection], None] | None = None
) -> BenchRun:
    """Every section that can run here, and one line for each that could not: a section whose
    extra is missing is skipped, one that fails is reported in a line, neither ends the run,
    and each finished one is handed to `on_done` at once."""
    run = BenchRun()
    sections, skipped = run.sections, run.skipped
    for section in only or list(Section):
        try:
            result = run_section(section, quick, device)
        except MissingExtraError as error:
            skipped.append(f"section {section.value} skipped: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - reported, and the finished sections kept
            run.failed.append(f"section {section.value} failed: {type(error).__name__}: {error}")
            continue
        sections.append(result)
        if on_done is not None:
            on_done(result)
    return run


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        quick: bool = typer.Option(False, "--quick", help="the CPU part only, about a minute and a half on 2 cores"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object of all figures"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto: where the judging section runs its model"),
        section: list[Section] = typer.Option([], "--section", help="only these sections (repeat for several)"),
    ) -> None:
        """Benchmarks: our engine and backends against naive baselines, same process. A section
        whose extra is not installed is skipped with one line, one that fails is reported in
        one line after the others ran; exit 1 when one failed, 2 when none could run."""
        console = Console()
        run = run_sections(quick, device, section or None, None if as_json else lambda done: done.print(console))
        for line in run.skipped + run.failed:
            typer.echo(f"soda-guard bench: {line}", err=True)
        if as_json and run.sections:
            figures: dict[str, Any] = {}
            for result in run.sections:
                figures.update(result.figures)
            typer.echo(json.dumps(figures))
        if run.failed:
            raise typer.Exit(1)
        if not run.sections:
            raise typer.Exit(2)
