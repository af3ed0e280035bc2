"""Audit sinks: where every decision is written before it is returned to the caller.

The guarantee the log gives: a decision the caller has received is in the log, as one complete
JSON line, even if the process is killed with SIGKILL right after (the bytes are in the kernel
before `write` returns) and, with fsync on, even after a power cut. Several processes may append
to one file: each batch goes in under an exclusive `flock`, so records never interleave, and a
line left torn by a writer that died mid-write is closed off by the next writer and skipped by
the reader instead of corrupting the record after it.

Waiting for another writer is bounded: `write(..., deadline=t)` gives up at `t`
(`time.monotonic`) with an `AuditError` instead of waiting as long as the other writer holds
the file or the database, so a stuck writer in another process cannot hold a guard call past
its deadline.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

from soda_guard.errors import AuditError
from soda_guard.verdict import Decision

FsyncMode = Literal["decision", "batch", "off"]

#: the longest pause between two tries of a lock another writer holds
_MAX_POLL_S = 0.02


class AuditSink(Protocol):
    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        """Records every decision before returning, or raises. `deadline` (time.monotonic) is
        when the guard call that made them must end: a sink that waits for anything (a lock, a
        server) stops waiting then and raises `AuditError`; None waits as long as it takes."""
        ...


def _acquire(lock: threading.Lock, deadline: float | None, what: str) -> None:
    if not lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
        raise AuditError(f"{what}: another thread of this process held the sink past the deadline")


def _flock(fd: int, deadline: float | None, path: Path) -> None:
    """Non-blocking tries until the deadline (at least one): a blocking `flock` cannot be
    given up on, and the holder may be a hung process."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AuditError(f"audit log {path}: another process held its lock past the deadline") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_POLL_S)


def _fsync_mode(fsync: FsyncMode | bool) -> FsyncMode:
    if fsync is True:
        return "decision"
    if fsync is False:
        return "off"
    if fsync not in ("decision", "batch", "off"):
        raise ValueError(f"fsync must be 'decision', 'batch' or 'off', not {fsync!r}")
    return fsync


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class JsonlAuditSink:
    """Append-only JSONL on an `O_APPEND` handle under `flock`.

    `fsync="decision"` writes and fsyncs record by record, `"batch"` writes one guard call's
    records together with a single fsync, `"off"` only writes (durable against a crashed
    process, not against a crashed machine). In every mode the write completes before the
    decisions are returned."""

    def __init__(self, path: str | Path, *, fsync: FsyncMode | bool = "decision") -> None:
        self.path = Path(path)
        self.fsync = _fsync_mode(fsync)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        if not decisions:
            return
        records = [decision.model_dump_json().encode("utf-8") + b"\n" for decision in decisions]
        chunks = records if self.fsync == "decision" else [b"".join(records)]
        _acquire(self._lock, deadline, f"audit log {self.path}")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _flock(fd, deadline, self.path)
                if _ends_torn(fd):
                    _write_all(fd, b"\n")
                for chunk in chunks:
                    _write_all(fd, chunk)
                    if self.fsync != "off":
                        os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the flock
        finally:
            self._lock.release()


def _ends_torn(fd: int) -> bool:
    """Whether the file's last line lacks its newline (a writer died mid-record)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_audit(path: str | Path, *, on_skip: Callable[[int, bytes], None] | None = None) -> Iterator[Decision]:
    """Every complete record in order. A torn line (a crash mid-write: no newline, or cut JSON
    closed off by a later writer) is skipped, not an error; `on_skip(line_number, raw)` hears
    of each one."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if not raw.endswith(b"\n"):
                if on_skip is not None:
                    on_skip(number, raw)
                return
            try:
                yield Decision.model_validate(json.loads(raw))
            except ValueError:
                if on_skip is not None:
                    on_skip(number, raw)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    timestamp REAL NOT NULL,
    conversation_id TEXT,
    tool_call_id TEXT,
    tool_name TEXT,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    judge TEXT,
    label TEXT,
    score REAL,
    error TEXT,
    truncated INTEGER NOT NULL DEFAULT 0,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_conversation ON decisions (conversation_id, timestamp);
CREATE INDEX IF NOT EXISTS decisions_action ON decisions (action, timestamp);
"""


class SqliteAuditSink:
    """Decisions in an SQLite table (WAL, so readers never block the guard) for queries such as
    "every block in conversation X". Each batch is one transaction; `fsync` maps onto SQLite's
    `synchronous` setting (`decision`/`batch` → FULL, `off` → NORMAL, still crash-safe for the
    process). Several processes may write one database: SQLite locks it, with a busy timeout."""

    def __init__(self, path: str | Path, *, fsync: FsyncMode | bool = "decision", busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = _fsync_mode(fsync)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'NORMAL' if mode == 'off' else 'FULL'}")
        self._db.executescript(_SCHEMA)

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        """Another process's write transaction is waited for until `deadline` at most (SQLite's
        busy timeout, set per write), else `busy_timeout_s`."""
        if not decisions:
            return
        rows = [_row(decision) for decision in decisions]
        _acquire(self._lock, deadline, f"audit database {self.path}")
        try:
            wait_s = self.busy_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
            self._db.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise AuditError(f"audit database {self.path}: {error}") from error
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            self._lock.release()

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, parameters))

    def decisions(self, where: str = "1", parameters: Sequence[Any] = ()) -> list[Decision]:
        """Full records matching an SQL condition on the table's columns, oldest first."""
        rows = self.query(f"SELECT record FROM decisions WHERE {where} ORDER BY timestamp, rowid", parameters)
        return [Decision.model_validate_json(record) for (record,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(decision: Decision) -> tuple[Any, ...]:
    verdict = decision.verdict
    call = decision.tool_call
    return (
        decision.decision_id,
        decision.timestamp,
        decision.conversation_id,
        call.id if call else None,
        call.name if call else None,
        decision.action.value,
        decision.rule,
        verdict.judge if verdict else None,
        verdict.label.value if verdict and verdict.label else None,
        verdict.score if verdict else None,
        verdict.error if verdict else None,
        int(bool(verdict and verdict.truncated)),
        decision.model_dump_json(),
    )
