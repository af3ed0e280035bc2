"""DIR/results.jsonl: one JSON line per judged record, written and flushed as each batch ends.

A crash can leave at most a torn last line; resuming drops it (and anything else that does not
parse) and rewrites the file before appending, so a new line never glues onto a torn one and no
record is judged twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from soda_guard.errors import SodaGuardError


class EvalError(SodaGuardError):
    """An evaluation that cannot run as asked (a results folder from another run, a bad option)."""


def read_results(path: Path) -> list[dict[str, Any]]:
    """The complete result lines of `path`, first occurrence of each id, in file order."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    results: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line in data.split(b"\n")[:-1]:  # what follows the last newline is torn or empty
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and isinstance(result.get("id"), str) and result["id"] not in seen:
            seen.add(result["id"])
            results.append(result)
    return results


class ResultsWriter:
    def __init__(self, folder: Path, settings: dict[str, Any], *, resume: bool) -> None:
        """Start a run in `folder`; with `resume`, keep the complete results of an earlier run with
        the same settings, else refuse a folder that already holds results."""
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "results.jsonl"
        settings_path = folder / "run.json"
        if resume:
            if settings_path.is_file():
                earlier = json.loads(settings_path.read_text(encoding="utf-8"))
                changed = sorted(key for key in settings if earlier.get(key) != settings[key])
                if changed:
                    raise EvalError(f"{folder} holds a run with other settings ({', '.join(changed)}); use another --out")
            self.done = read_results(self.path)
        else:
            if self.path.is_file() and self.path.stat().st_size:
                raise EvalError(
                    f"{self.path} already holds results: continue that run (--resume; resume=True in Python) "
                    "or write to another folder (--out)"
                )
            self.done = []
        settings_path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        temporary = self.path.with_suffix(".jsonl.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(result, ensure_ascii=False) + "\n" for result in self.done)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        self._handle: TextIO = self.path.open("a", encoding="utf-8")

    @property
    def done_ids(self) -> set[str]:
        return {result["id"] for result in self.done}

    def write(self, results: list[dict[str, Any]]) -> None:
        for result in results:
            self._handle.write(json.dumps(result, ensure_ascii=False) + "\n")
            self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.extend(results)

    def close(self) -> None:
        self._handle.close()
