"""The render and warm-up benchmarks still run and print what their tables claim: a row per
length or size, every column a measurement. Their timings are not asserted."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("judge", ["soda", "gen"])
def test_the_render_benchmark_prints_every_column_at_each_length(judge: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_render.py"), "--repeat", "1", "--steps", "10,300", "--judge", judge], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert "next, warmed" in header and "warm-up" in header
    assert [row.split()[0] for row in rows] == ["10", "300"]
    for row in rows:
        figures = [float(value) for value in row.split()[1:]]
        assert len(figures) == 10 and all(math.isfinite(value) and value > 0 for value in figures)


@pytest.mark.parametrize("judge", ["soda", "gen"])
def test_the_warm_up_agreement_benchmark_prints_a_share_per_result_size(judge: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_warm_agreement.py"), "--turns", "200", "--seeds", "1", "--judge", judge],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert "empty stand-in" in header and "latest action" in header
    assert [row.split()[0] for row in rows] == ["200-600", "500-4000", "2000-12000"]
    for row in rows:
        past, empty, latest = row.split()[1:]
        assert int(past) > 0 and 0.0 <= float(empty) <= 1.0 and 0.0 <= float(latest) <= 1.0


def test_the_warm_up_benchmark_prints_cold_and_warm_per_size_and_prefills_less_warmed() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_warmup.py"), "--repeat", "1", "--sizes", "100,400", "--behind", "1200"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    header, *rows, behind = done.stdout.strip().splitlines()
    whole, cut, ratio = re.search(r"([\d.]+) ms behind a warm-up in one piece, ([\d.]+) ms behind one cut .*\(([\d.]+)x\)", behind).groups()  # type: ignore[union-attr]
    assert float(whole) > 0 and float(cut) > 0 and math.isclose(float(ratio), float(cut) / float(whole), abs_tol=0.01)
    assert "warm/cold" in header
    assert [row.split()[0] for row in rows] == ["100", "400"]
    for row in rows:
        cold, warm, ratio, prefilled_cold, prefilled_warm, floor, floor_ratio = (float(value) for value in row.split()[2:])
        assert cold > 0 and warm > 0 and math.isclose(ratio, warm / cold, abs_tol=0.001)
        assert prefilled_warm < prefilled_cold
        assert 0 < floor and math.isclose(floor_ratio, floor / cold, abs_tol=0.001)
