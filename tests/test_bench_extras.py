"""`soda-guard bench` runs each section it has the extras for: a missing extra skips that
section with one line naming the install, the others still run, and a finished section is
reported before the next one starts (a later failure cannot take it away)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from soda_guard.bench import cli as bench_cli
from soda_guard.bench.cli import Section, run_sections
from soda_guard.bench.report import BenchSection
from soda_guard.errors import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]


def refusing(*libraries: str) -> str:
    return textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {libraries!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Refuse())
        from soda_guard.cli import main
        sys.argv = ["soda-guard", *sys.argv[1:]]
        main()
        """
    )


def test_each_section_without_its_extra_is_skipped_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", refusing("torch", "transformers", "fastapi", "uvicorn"), "bench", "--quick", "--section", "judging", "--section", "http"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr  # nothing could run
    assert len(lines) == 2, done.stderr
    assert "section judging skipped" in lines[0] and "pip install 'soda-guard[local]'" in lines[0]
    assert "section http skipped" in lines[1] and "pip install 'soda-guard[testing]'" in lines[1]


def test_sections_that_can_run_do_and_each_is_handed_over_when_it_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def fake(section: Section, quick: bool, device: str) -> BenchSection:
        order.append(f"run {section.value}")
        if section is Section.stream:
            raise MissingExtraError("bench section stream needs torch, which is not installed: pip install 'soda-guard[local]'")
        return BenchSection(title=section.value, figures={section.value: 1.0})

    monkeypatch.setattr(bench_cli, "run_section", fake)
    run = run_sections(True, "cpu", None, lambda done: order.append(f"done {done.title}"))
    assert [s.title for s in run.sections] == ["judging", "http"]
    assert order == ["run judging", "done judging", "run stream", "run http", "done http"]
    assert run.skipped == ["section stream skipped: bench section stream needs torch, which is not installed: pip install 'soda-guard[local]'"]
    assert run.failed == []


def test_a_failing_section_is_one_line_and_the_finished_figures_are_still_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from soda_guard.cli import app

    def fake(section: Section, quick: bool, device: str) -> BenchSection:
        if section is Section.stream:
            raise RuntimeError("the model step blew up")
        return BenchSection(title=section.value, figures={f"{section.value}_speedup": 2.0})

    monkeypatch.setattr(bench_cli, "run_section", fake)
    done = CliRunner().invoke(app, ["bench", "--quick", "--json"])
    assert done.exit_code == 1
    assert json.loads(done.stdout.strip().splitlines()[0]) == {"judging_speedup": 2.0, "http_speedup": 2.0}
    assert "soda-guard bench: section stream failed: RuntimeError: the model step blew up" in done.stderr
