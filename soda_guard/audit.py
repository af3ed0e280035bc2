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

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

from soda_guard.converters import model_json
from soda_guard.errors import AuditError
from soda_guard.verdict import Decision

FsyncMode = Literal["decision", "batch", "off"]

#: the longest pause between two tries of a lock another writer holds
_MAX_POLL_S = 0.02


class AuditSink(Protocol):
    """Where decisions are recorded. A sink whose `write` never waits (no lock, file or
    server) may also answer `instant` (an attribute or property) with True: an async check
    then writes to it in the caller's task instead of on a worker thread."""

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


class _GroupSync:
    """The fsyncs of one open log, shared by the writers waiting for them (group commit).

    Each write gets a ticket as its record is in the file; it returns once an fsync that
    began after that has finished. While one fsync runs, the writers that arrive queue their
    records and the next fsync covers them all, so concurrent checks pay for about one fsync
    each round instead of one each. A failed fsync fails every write it covered and leaves the
    handle broken for good: the kernel may clear the error, so a retry on the same handle
    could report data as durable that is lost."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self._cond = threading.Condition()
        self._written = 0
        self._durable = 0
        self._syncing = False
        self.broken: OSError | None = None

    def ticket(self) -> int:
        with self._cond:
            self._written += 1
            return self._written

    def wait_durable(self, ticket: int, deadline: float | None) -> None:
        with self._cond:
            while self._durable < ticket:
                if self.broken is not None:
                    raise AuditError(f"audit log {self.path}: fsync failed: {self.broken}")
                if not self._syncing:
                    self._lead()
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AuditError(f"audit log {self.path}: its fsync did not finish by the deadline")
                self._cond.wait(left)

    def _lead(self) -> None:
        """One fsync for every record written so far; called, and returns, holding `_cond`."""
        self._syncing = True
        target = self._written
        self._cond.release()
        failure: OSError | None = None
        try:
            os.fsync(self.fd)
        except OSError as error:
            failure = error
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        if failure is not None:
            self.broken = failure
        else:
            self._durable = max(self._durable, target)


class JsonlAuditSink:
    """Append-only JSONL on an `O_APPEND` handle under `flock`, kept open between writes.

    With `fsync` on (`"decision"` or `"batch"`, the same since group commit) a write returns
    only after its records are fsynced, one fsync shared by the writes that arrive together
    (`_GroupSync`); `"off"` only writes (durable against a crashed process, not against a
    crashed machine). In every mode the write completes before the decisions are returned. A
    log renamed or removed (rotation) is followed: the next write opens the file at `path`."""

    def __init__(self, path: str | Path, *, fsync: FsyncMode | bool = "decision") -> None:
        self.path = Path(path)
        self.fsync = _fsync_mode(fsync)
        self._lock = threading.Lock()
        self._log: _GroupSync | None = None
        self._identity: tuple[int, int] | None = None
        self._retired: list[_GroupSync] = []
        self._fds: set[int] = set()
        self._pid = os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a guard never closed (one built per request) must not keep its log's descriptors
        weakref.finalize(self, _close_fds, self._fds, self._pid)

    def _forked(self) -> None:
        """In a process forked from the one that opened the log, the handle (and its `flock`,
        which belongs to the open file, not the process) is shared with the parent: the child
        opens its own, and a lock the parent held at the fork is not the child's to wait on."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.Lock()
        for fd in list(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)  # the child's copy only: the parent's stays open
        self._fds.clear()
        self._log, self._retired, self._identity = None, [], None

    def _open(self) -> _GroupSync:
        """The open log, reopened when `path` names another file now or its fsync failed;
        a replaced handle stays open (writers may still be waiting on its fsync) until
        `close`. Called holding `_lock`."""
        current = _identity(self.path)
        if self._log is not None and self._log.broken is None and current == self._identity:
            return self._log
        if self._log is not None:
            self._retired.append(self._log)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._fds.add(fd)
        opened = os.fstat(fd)
        self._identity = (opened.st_dev, opened.st_ino)
        self._log = _GroupSync(fd, self.path)
        return self._log

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        if not decisions:
            return
        payload = b"".join(model_json(decision).encode("utf-8") + b"\n" for decision in decisions)
        self._forked()
        _acquire(self._lock, deadline, f"audit log {self.path}")
        try:
            log = self._open()
            _flock(log.fd, deadline, self.path)
            try:
                _append(log.fd, payload)
            finally:
                fcntl.flock(log.fd, fcntl.LOCK_UN)
            ticket = log.ticket()
        finally:
            self._lock.release()
        if self.fsync != "off":
            log.wait_durable(ticket, deadline)

    def close(self) -> None:
        with self._lock:
            for log in [*self._retired, *([self._log] if self._log else [])]:
                os.close(log.fd)
                self._fds.discard(log.fd)
            self._log, self._retired, self._identity = None, [], None


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` names now (None: none): a log rotated or removed under a sink is
    another file, or no file, at the same path."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _close_fds(fds: set[int], pid: int) -> None:
    if os.getpid() != pid:
        return
    for fd in list(fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _append(fd: int, payload: bytes) -> None:
    """Append a batch whole or not at all: a write that fails part way (disk full, a file size
    limit) is cut back to where the batch began, so the log never holds the first records of a
    batch the caller did not get (an allow the guard then replaced with its `on_error` block,
    which the full disk may not take either). Called holding the file's `flock`."""
    start = os.fstat(fd).st_size
    try:
        if _ends_torn(fd):
            _write_all(fd, b"\n")
        _write_all(fd, payload)
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # the first error says what went wrong; a torn tail is skipped by readers
        raise


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
            except (ValueError, RecursionError):  # nested past reading is no record either
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


_sqlite_sinks: weakref.WeakSet[SqliteAuditSink] = weakref.WeakSet()
_held_at_fork: list[SqliteAuditSink] = []


def _sqlite_before_fork() -> None:
    """No fork lands inside a write, and none carries a connection: SQLite forbids using one
    across a fork, and even a fresh connection in the child shares the inherited one's lock
    state (SQLite keeps it per file per process), so a worker forked while the parent was
    writing found the database locked for good. Each sink's lock is held over the fork (a write
    under way finishes first) and its connection closed; each process connects again at its
    next write."""
    for sink in list(_sqlite_sinks):
        sink._lock.acquire()
        _held_at_fork.append(sink)
        sink._disconnect()


def _sqlite_after_fork_in_parent() -> None:
    while _held_at_fork:
        _held_at_fork.pop()._lock.release()


def _sqlite_after_fork_in_child() -> None:
    while _held_at_fork:
        _held_at_fork.pop()._lock = threading.Lock()  # the held one is the parent's thread's


os.register_at_fork(before=_sqlite_before_fork, after_in_parent=_sqlite_after_fork_in_parent,
                    after_in_child=_sqlite_after_fork_in_child)


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
        self._synchronous = "NORMAL" if mode == "off" else "FULL"
        self._closed = False
        self._db: sqlite3.Connection | None
        self._db, self._identity = self._connect()
        _sqlite_sinks.add(self)

    def _disconnect(self) -> None:
        """Holding `_lock`."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(_SCHEMA)
        return db, _identity(self.path)

    def _current(self) -> sqlite3.Connection:
        """The connection to the database at `path` now: one removed or replaced (rotation, a
        cleanup) would take every later write into a file nobody can read; none since a fork.
        Holding `_lock`."""
        if self._closed:
            raise AuditError(f"audit database {self.path}: the sink is closed")
        if self._db is None or _identity(self.path) != self._identity:
            self._disconnect()
            self._db, self._identity = self._connect()
        return self._db

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        """Another process's write transaction is waited for until `deadline` at most (SQLite's
        busy timeout, set per write), else `busy_timeout_s`."""
        if not decisions:
            return
        rows = [_row(decision) for decision in decisions]
        _acquire(self._lock, deadline, f"audit database {self.path}")
        try:
            try:
                db = self._current()
            except (OSError, sqlite3.Error) as error:
                raise AuditError(f"audit database {self.path}: cannot open it again: {error}") from error
            wait_s = self.busy_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
            db.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise AuditError(f"audit database {self.path}: {error}") from error
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
                db.execute("COMMIT")
            except BaseException:
                # a full disk rolls the transaction back itself: a ROLLBACK then fails with "no
                # transaction is active", which must not stand in for why the write failed
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        finally:
            self._lock.release()

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._current().execute(sql, parameters))

    def decisions(self, where: str = "1", parameters: Sequence[Any] = ()) -> list[Decision]:
        """Full records matching an SQL condition on the table's columns, oldest first."""
        rows = self.query(f"SELECT record FROM decisions WHERE {where} ORDER BY timestamp, rowid", parameters)
        return [Decision.model_validate_json(record) for (record,) in rows]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()
        _sqlite_sinks.discard(self)


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
        model_json(decision),
    )
