"""The shape every benchmark section returns, so `soda-guard bench` can print one table per
section and merge all figures into one JSON object."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

T = TypeVar("T")


@dataclass
class BenchSection:
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, float | str | None] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(title=self.title)
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        for column in columns:
            table.add_column(column)
        for row in self.rows:
            table.add_row(*(_cell(row.get(column)) for column in columns))
        return table

    def records(self) -> Table:
        """One `field  value` block per row: what a table too wide for the terminal turns into,
        instead of columns squeezed to one word per line."""
        table = Table(title=self.title, show_header=False)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value")
        for row in self.rows:
            for index, (key, value) in enumerate(row.items()):
                table.add_row(key, _cell(value), end_section=index == len(row) - 1)
        return table

    def print(self, console: Console) -> None:
        table = self.table()
        unbounded = console.options.update_width(1_000_000)
        fits = Measurement.get(console, unbounded, table).maximum <= console.width
        console.print(table if fits else self.records())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def time_each(call: Callable[[T], object], items: Sequence[T]) -> tuple[list[float], float]:
    """Seconds per call, one after another (so no queueing hides in them), and the total."""
    latencies = []
    begin = time.perf_counter()
    for item in items:
        start = time.perf_counter()
        call(item)
        latencies.append(time.perf_counter() - start)
    return latencies, time.perf_counter() - begin
