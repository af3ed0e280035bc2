"""`soda-guard bench`: every benchmark section this build has, one table each, and with --json one
object merging all their figures."""

from __future__ import annotations

import importlib
import inspect
import json
from enum import Enum
from typing import Any

import typer
from rich.console import Console

from soda_guard._extras import needs_extra
from soda_guard.bench.report import BenchSection
from soda_guard.errors import MissingExtraError


class Section(str, Enum):
    judging = "judging"
    stream = "stream"
    http = "http"


def run_sections(quick: bool, device: str, only: list[Section] | None = None) -> list[BenchSection]:
    sections = []
    for section in only or list(Section):
        # every section runs models in process: torch and transformers (the [local] extra)
        with needs_extra("soda-guard bench"):
            module = importlib.import_module(f"soda_guard.bench.{section.value}")
        run: Any = module.run
        kwargs = {"device": device} if "device" in inspect.signature(run).parameters else {}
        sections.append(run(quick, **kwargs))
    return sections


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        quick: bool = typer.Option(False, "--quick", help="the CPU part only, in under a minute"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object of all figures"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto: where the judging section runs its model"),
        section: list[Section] = typer.Option([], "--section", help="only these sections (repeat for several)"),
    ) -> None:
        """Benchmarks: our engine and backends against naive baselines, same process."""
        try:
            sections = run_sections(quick, device, section or None)
        except MissingExtraError as error:
            typer.echo(f"soda-guard: {error}", err=True)
            raise typer.Exit(2) from None
        if as_json:
            figures: dict[str, Any] = {}
            for result in sections:
                figures.update(result.figures)
            typer.echo(json.dumps(figures))
            return
        console = Console()
        for result in sections:
            result.print(console)
