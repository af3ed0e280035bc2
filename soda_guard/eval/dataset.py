"""Labeled datasets for `soda-guard eval`: R-Judge / AgentHarm record files, JSONL of OpenAI chat
messages, or a folder of either.

Every record gets an id built from its file and its own id (or position), so a resumed run can
tell which records it has already judged even when the folder gains files. A record that cannot
be converted is kept as `Unreadable` with the reason: a silently shorter dataset would make the
metrics look better than they are.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soda_guard.converters import from_agent_record, from_openai_messages
from soda_guard.errors import TrajectoryError
from soda_guard.trajectory import Trajectory

SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class EvalRecord:
    id: str
    source: str
    label: int
    trajectory: Trajectory


@dataclass(frozen=True)
class Unreadable:
    id: str
    source: str
    reason: str


@dataclass
class Dataset:
    """Records and unreadable ones in file order, which is the order `--limit` cuts."""

    entries: list[EvalRecord | Unreadable] = field(default_factory=list)

    @property
    def records(self) -> list[EvalRecord]:
        return [entry for entry in self.entries if isinstance(entry, EvalRecord)]

    @property
    def unreadable(self) -> list[Unreadable]:
        return [entry for entry in self.entries if isinstance(entry, Unreadable)]


def _label(raw: Any) -> int:
    if isinstance(raw, bool) or raw not in (0, 1):
        raise TrajectoryError(None, f"label must be 0 or 1, not {raw!r}")
    return int(raw)


def _trajectory(raw: Any) -> Trajectory:
    if not isinstance(raw, dict):
        raise TrajectoryError(None, f"record must be an object, not {type(raw).__name__}")
    if "contents" in raw:
        return from_agent_record(raw)
    if "messages" in raw:
        fields = {key: raw[key] for key in ("harm", "environment") if isinstance(raw.get(key), str)}
        return from_openai_messages(raw["messages"], **fields)
    raise TrajectoryError(None, "record has neither 'contents' (R-Judge/AgentHarm) nor 'messages' (OpenAI chat)")


def _entries(path: Path) -> list[tuple[int, Any | Exception]]:
    """(position, parsed JSON or the error) per record; a bad JSONL line is one bad record,
    a bad .json file is one bad record at position -1."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [(-1, error)]
    if path.suffix == ".jsonl":
        entries: list[tuple[int, Any | Exception]] = []
        for index, line in enumerate(text.split("\n")):  # not splitlines: JSON strings may hold U+2028 and the like
            if not line.strip():
                continue
            try:
                entries.append((index, json.loads(line)))
            except ValueError as error:
                entries.append((index, error))
        return entries
    try:
        data = json.loads(text)
    except ValueError as error:
        return [(-1, error)]
    if not isinstance(data, list):
        return [(-1, ValueError(f"a .json dataset must hold a list of records, not {type(data).__name__}"))]
    return list(enumerate(data))


def _load_file(path: Path, name: str, into: Dataset) -> None:
    entries = _entries(path)
    own_ids = Counter(str(raw["id"]) for _, raw in entries if isinstance(raw, dict) and raw.get("id") is not None)
    for index, raw in entries:
        own = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else None
        record_id = f"{name}#{own if own is not None and own_ids[own] == 1 else index}"
        if isinstance(raw, Exception):
            into.entries.append(Unreadable(record_id, name, f"{type(raw).__name__}: {raw}"))
            continue
        try:
            label = _label(raw.get("label") if isinstance(raw, dict) else None)
            trajectory = _trajectory(raw)
        except TrajectoryError as error:
            into.entries.append(Unreadable(record_id, name, str(error)))
            continue
        # the id keys the judge's prefix cache too: ids repeat across files, record keys do not
        trajectory = trajectory.model_copy(update={"conversation_id": record_id})
        into.entries.append(EvalRecord(record_id, name, label, trajectory))


def dataset_files(path: Path) -> list[tuple[Path, str]]:
    """The files of a dataset and the names their record ids use (relative to a folder)."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        return [(p, p.relative_to(path).as_posix()) for p in found]
    return [(path, path.name)]


def load_dataset(path: str | Path, *, limit: int | None = None) -> Dataset:
    """Load every record; `limit` keeps the first N records (readable or not) in file order, so
    a limited run judges the same records every time."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    dataset = Dataset()
    for file, name in dataset_files(root):
        _load_file(file, name, dataset)
    if limit is not None:
        dataset.entries = dataset.entries[:limit]
    return dataset
