"""`benchmarks/bench_render.py` still runs and prints what its table claims, for both judges:
a row per length, every column a measurement. Its timings are not asserted."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_render.py"


@pytest.mark.parametrize("judge", ["soda", "gen"])
def test_the_render_benchmark_prints_every_column_at_each_length(judge: str) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeat", "1", "--steps", "10,300", "--judge", judge], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert "next, warmed" in header and "warm-up" in header
    assert [row.split()[0] for row in rows] == ["10", "300"]
    for row in rows:
        figures = [float(value) for value in row.split()[1:]]
        assert len(figures) == 10 and all(math.isfinite(value) and value > 0 for value in figures)
