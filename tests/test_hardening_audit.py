"""Audit durability: every decision returned to a caller is in the log, whole, even after
SIGKILL mid-burst and with several processes appending to one file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from soda_guard import Action, AuditError, Decision, Guard, Policy, ScriptedBackend, from_openai_messages, read_audit
from soda_guard.audit import JsonlAuditSink, SqliteAuditSink
from soda_guard.backends.scripted import soda_reply
from soda_guard.trajectory import ToolCall

WRITER = textwrap.dedent(
    """
    import sys
    from soda_guard import Guard, Policy, ScriptedBackend, from_openai_messages
    from soda_guard.backends.scripted import soda_reply

    log, fsync, rounds, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    policy = Policy.from_dict({
        "judges": {"soda": {"kind": "soda", "model": "scripted"}},
        "audit": {"jsonl": log, "fsync": fsync},
    })
    guard = Guard(policy, backends={"soda": ScriptedBackend([soda_reply(False)])})
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}} for i in range(3)]
    trajectory = from_openai_messages(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}],
        conversation_id=tag,
    )
    n = 0
    while rounds < 0 or n < rounds:
        for decision in guard.check_tool_calls(trajectory):
            sys.stdout.write(decision.decision_id + "\\n")
        sys.stdout.flush()
        n += 1
    """
)


def _writer(log: Path, fsync: str, rounds: int, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log), fsync, str(rounds), tag],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.parametrize("fsync", ["decision", "off"])
def test_sigkill_mid_burst_loses_no_returned_decision(tmp_path: Path, fsync: str) -> None:
    log = tmp_path / "audit.jsonl"
    process = _writer(log, fsync, -1, "burst")
    assert process.stdout is not None
    returned: list[str] = []
    try:
        while len(returned) < 1500:
            line = process.stdout.readline()
            assert line, "writer exited early"
            returned.append(line.strip())
        os.kill(process.pid, signal.SIGKILL)
        returned.extend(line.strip() for line in process.stdout.read().splitlines())
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    logged = {decision.decision_id for decision in read_audit(log)}
    missing = [d for d in returned if d and d not in logged]
    assert not missing and len(returned) >= 1500


def test_several_processes_append_whole_records(tmp_path: Path) -> None:
    log = tmp_path / "shared.jsonl"
    processes = [_writer(log, "batch", 60, f"proc{i}") for i in range(3)]
    printed: list[str] = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        printed.extend(out.split())
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line)["decision_id"] for line in lines[:-1])
    recorded = [decision.decision_id for decision in read_audit(log)]
    assert sorted(recorded) == sorted(printed) and len(recorded) == 3 * 60 * 3


def _decision(index: int) -> Decision:
    return Decision(action=Action.BLOCK, rule="defaults", why="test", tool_call=ToolCall(id=f"t{index}", name="x"))


def test_torn_line_is_skipped_and_closed_off_by_the_next_writer(tmp_path: Path) -> None:
    log = tmp_path / "torn.jsonl"
    sink = JsonlAuditSink(log)
    sink.write([_decision(0)])
    whole = _decision(1).model_dump_json().encode()
    with open(log, "ab") as handle:
        handle.write(whole[: len(whole) // 2])
    skipped: list[int] = []
    assert [d.tool_call.id for d in read_audit(log, on_skip=lambda n, raw: skipped.append(n))] == ["t0"]
    assert skipped == [2]
    sink.write([_decision(2), _decision(3)])
    skipped.clear()
    assert [d.tool_call.id for d in read_audit(log, on_skip=lambda n, raw: skipped.append(n))] == ["t0", "t2", "t3"]
    assert skipped == [2]


@pytest.mark.parametrize("mode", ["decision", "batch", "off", True, False])
def test_every_fsync_mode_writes_complete_lines(tmp_path: Path, mode: object) -> None:
    log = tmp_path / "modes.jsonl"
    sink = JsonlAuditSink(log, fsync=mode)  # type: ignore[arg-type]
    sink.write([_decision(i) for i in range(5)])
    sink.write([])
    assert [d.tool_call.id for d in read_audit(log)] == [f"t{i}" for i in range(5)]


def test_unknown_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        JsonlAuditSink(tmp_path / "x.jsonl", fsync="sometimes")  # type: ignore[arg-type]


def test_sqlite_sink_from_policy_is_queryable(tmp_path: Path) -> None:
    database = tmp_path / "audit.sqlite"
    policy = Policy.from_dict(
        {
            "judges": {"soda": {"kind": "soda", "model": "scripted"}},
            "audit": {"sqlite": str(database), "jsonl": str(tmp_path / "a.jsonl"), "fsync": "batch"},
        }
    )
    guard = Guard(policy, backends={"soda": ScriptedBackend([soda_reply(True)])})
    calls = [{"id": f"q{i}", "type": "function", "function": {"name": "wipe", "arguments": "{}"}} for i in range(2)]
    trajectory = from_openai_messages(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}],
        conversation_id="conv-sql",
    )
    returned = guard.check_tool_calls(trajectory)
    sink = next(s for s in guard.sinks if isinstance(s, SqliteAuditSink))
    assert sink.query("PRAGMA journal_mode") == [("wal",)]
    rows = sink.query("SELECT tool_call_id, action, label FROM decisions WHERE conversation_id = ?", ["conv-sql"])
    assert sorted(rows) == [("q0", "block", "unsafe"), ("q1", "block", "unsafe")]
    assert [d.decision_id for d in sink.decisions("action = ?", ["block"])] == [d.decision_id for d in returned]
    guard.close()
    reopened = SqliteAuditSink(database)
    assert len(reopened.decisions()) == 2
    reopened.close()


def _audited_guard(tmp_path: Path, *, on_error: str = "block", sinks: list[Any] | None = None, **audit: str) -> Guard:
    """A guard whose judge always says SAFE, so every decision that is not `allow` came from
    the audit failure, with a 0.3 s deadline."""
    policy = Policy.from_dict(
        {
            "judges": {"soda": {"kind": "soda", "model": "scripted"}},
            "defaults": {"timeout_s": 0.3, "on_error": on_error},
            "audit": audit or {"jsonl": str(tmp_path / "held.jsonl")},
        }
    )
    return Guard(policy, backends={"soda": ScriptedBackend([soda_reply(False)])}, sinks=sinks)


LOCKED_CALL = from_openai_messages(
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "k1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
    ],
    conversation_id="conv-lock",
)


def _in_thread(check: Callable[[], Any], within_s: float = 20.0) -> Any:
    """The check's outcome, from a thread that must finish while the lock is still held:
    `within_s` is a margin for a loaded machine, the holder would hold it for ever."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(check())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within_s)
    assert not thread.is_alive(), "the check waited on the audit lock past its deadline"
    return outcome[0]


@contextlib.contextmanager
def _flock_held(path: Path) -> Iterator[None]:
    """Another open file description holding the flock: to the sink, another process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_held_audit_lock_ends_the_check_in_on_error_unrecorded(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "held.jsonl"
    guard = _audited_guard(tmp_path)
    check = (lambda: guard.check_tool_calls(LOCKED_CALL)) if mode == "sync" else (lambda: asyncio.run(guard.acheck_tool_calls(LOCKED_CALL)))
    with _flock_held(log):
        [decision] = _in_thread(check)
    assert decision.action is Action.BLOCK and decision.tool_call.id == "k1"
    assert "audit sink unavailable" in decision.why and "held its lock past the deadline" in decision.why
    assert "not recorded either" in decision.why and decision.verdict.label.value == "safe"
    assert list(read_audit(log)) == []


def test_a_held_audit_lock_never_returns_an_unrecorded_allow(tmp_path: Path) -> None:
    log = tmp_path / "held.jsonl"
    guard = _audited_guard(tmp_path, on_error="allow")
    with _flock_held(log):
        raised = _in_thread(lambda: guard.check_tool_calls(LOCKED_CALL))
    assert isinstance(raised, AuditError) and "nor their on_error allow" in str(raised)
    assert list(read_audit(log)) == []


class DiskFullOnce:
    """A sink whose first write fails the way a full disk does."""

    def __init__(self) -> None:
        self.writes: list[list[Decision]] = []

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        if not self.writes:
            self.writes.append([])
            raise OSError(28, "No space left on device")
        self.writes.append(list(decisions))


def test_a_failed_sink_turns_the_decisions_into_recorded_on_error_decisions(tmp_path: Path) -> None:
    log = tmp_path / "held.jsonl"
    flaky = DiskFullOnce()
    guard = _audited_guard(tmp_path, on_error="escalate", sinks=[flaky])
    [decision] = guard.check_tool_calls(LOCKED_CALL)
    assert decision.action is Action.ESCALATE and "No space left on device" in decision.why
    assert "not recorded" not in decision.why
    # the sink after the failed one still took the decision made, then the one that replaced it
    made, replaced = read_audit(log)
    assert (made.action, replaced.decision_id) == (Action.ALLOW, decision.decision_id)
    assert f"replaces decision {made.decision_id}" in decision.why
    assert [d.decision_id for d in flaky.writes[1]] == [decision.decision_id]


class DiskFull:
    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_sink_that_keeps_failing_does_not_keep_the_records_from_the_sinks_after_it(tmp_path: Path, mode: str) -> None:
    """A full volume under one sink once stopped every later sink from hearing of anything:
    the policy's own JSONL was left without the decision or its replacement."""
    log = tmp_path / "held.jsonl"
    guard = _audited_guard(tmp_path, sinks=[DiskFull()])
    [decision] = guard.check_tool_calls(LOCKED_CALL) if mode == "sync" else asyncio.run(guard.acheck_tool_calls(LOCKED_CALL))
    assert decision.action is Action.BLOCK and "not recorded either by every sink" in decision.why
    assert [(d.action, d.decision_id) for d in read_audit(log)][1:] == [(Action.BLOCK, decision.decision_id)]


def test_a_batch_the_disk_takes_only_part_of_leaves_no_record_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The volume fills up after the first of two records: without its end the batch is cut
    back, so the log does not say the first call was allowed when the caller got a block (nor
    a half of the replacement batch, which the full disk does not take either)."""
    import soda_guard.audit as audit

    write_all = audit._write_all

    def fills_up(fd: int, payload: bytes) -> None:
        first = payload.split(b"\n", 1)[0] + b"\n"
        write_all(fd, first)
        if len(first) < len(payload):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "_write_all", fills_up)
    log = tmp_path / "held.jsonl"
    log.write_bytes(b"")
    guard = _audited_guard(tmp_path)
    calls = [{"id": f"p{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}} for i in range(2)]
    trajectory = from_openai_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}])
    decisions = guard.check_tool_calls(trajectory)
    assert [d.action for d in decisions] == [Action.BLOCK, Action.BLOCK]
    assert log.read_bytes() == b""


def test_a_locked_audit_database_ends_the_check_in_on_error(tmp_path: Path) -> None:
    database = tmp_path / "held.sqlite"
    guard = _audited_guard(tmp_path, sqlite=str(database))
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        [decision] = _in_thread(lambda: guard.check_tool_calls(LOCKED_CALL))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert decision.action is Action.BLOCK and "database is locked" in decision.why
    guard.close()


def test_a_sink_waits_for_the_lock_while_the_deadline_allows(tmp_path: Path) -> None:
    """Bounded is not impatient: a lock released before the deadline is taken and the decision
    recorded."""
    log = tmp_path / "wait.jsonl"
    sink = JsonlAuditSink(log)
    fd = os.open(log, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.2, os.close, args=[fd]).start()
    sink.write([_decision(7)], deadline=time.monotonic() + 30.0)
    assert [d.tool_call.id for d in read_audit(log)] == ["t7"]


class _FullDisk:
    """A connection whose inserts fail as a full disk does: SQLite has rolled back already."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def executemany(self, sql: str, rows: Any) -> Any:
        self._db.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")


def test_a_full_database_says_so_not_that_no_transaction_is_active(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself when the disk fills; the sink's own ROLLBACK then
    failed with "cannot rollback - no transaction is active", which hid the cause."""
    sink = SqliteAuditSink(tmp_path / "full.sqlite")
    sink._db = _FullDisk(sink._db)  # type: ignore[assignment]
    decision = Decision(action=Action.BLOCK, rule="r", why="w", tool_call=ToolCall(id="a", name="t", args={}))
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        sink.write([decision])
    sink._db = sink._db._db  # type: ignore[attr-defined]
    sink.write([decision])
    assert len(sink.decisions()) == 1
    sink.close()


def _decided(why: str = "x", **args: Any) -> Decision:
    return Decision(action=Action.BLOCK, rule="r", why=why, tool_call=ToolCall(id="c", name="pay", args=args))


def test_a_process_forked_after_a_write_takes_its_own_log_handle_and_lock(tmp_path: Path) -> None:
    """A worker forked after the first write shared the log's open file, whose `flock` the
    kernel grants to that file, not the process: the worker wrote through a lock the parent
    held (and a failed batch of its own could cut back the parent's records)."""
    sink = JsonlAuditSink(tmp_path / "audit.jsonl", fsync="off")
    sink.write([_decided("before the fork")])
    assert sink._log is not None
    fcntl.flock(sink._log.fd, fcntl.LOCK_EX)  # the parent holds the log's lock
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            sink.write([_decided("child")], deadline=time.monotonic() + 0.3)
        except Exception:
            os._exit(0)  # it waited for the parent's lock, and gave up at its deadline
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    fcntl.flock(sink._log.fd, fcntl.LOCK_UN)
    assert os.waitstatus_to_exitcode(status) == 0


class _PausingConnection:
    """The sink's connection, pausing inside a write's transaction until `go` is set."""

    def __init__(self, db: sqlite3.Connection, go: threading.Event) -> None:
        self.db, self.go, self.inside = db, go, threading.Event()

    def executemany(self, *args: Any) -> Any:
        self.inside.set()
        assert self.go.wait(10)
        return self.db.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_worker_forked_while_the_parent_writes_to_an_sqlite_sink_writes_its_own_records(tmp_path: Path) -> None:
    """A worker forked while a thread of the parent was inside a write (gunicorn `--preload`)
    inherited the parent's connection and its lock state: a connection of its own found the
    database locked for good, and every check of the worker failed, unrecorded. A fork now
    waits for the write to end and carries no connection across."""
    sink = SqliteAuditSink(tmp_path / "audit.db")
    sink.write([_decided("before the fork")])
    go = threading.Event()
    sink._db = pausing = _PausingConnection(sink._db, go)  # type: ignore[assignment]
    writer = threading.Thread(target=sink.write, args=([_decided("the parent's write")],))
    writer.start()
    assert pausing.inside.wait(10)
    threading.Timer(0.3, go.set).start()  # the write ends while the fork waits for it
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            sink.write([_decided("child")], deadline=time.monotonic() + 5)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    writer.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.write([_decided("parent after")])
    assert sorted(d.why for d in sink.decisions()) == sorted(["before the fork", "the parent's write", "child", "parent after"])
    assert sink.query("PRAGMA integrity_check") == [("ok",)]


def test_a_closed_sqlite_sink_refuses_writes_and_connects_no_more(tmp_path: Path) -> None:
    sink = SqliteAuditSink(tmp_path / "audit.db")
    sink.close()
    with pytest.raises(AuditError, match="closed"):
        sink.write([_decided()])


def test_a_guard_never_closed_does_not_keep_its_audit_log_open(tmp_path: Path) -> None:
    """One guard per request, never closed: each kept a descriptor on the log until the
    process ran out of them, and every later call was blocked."""
    import gc

    log = tmp_path / "audit.jsonl"
    policy = Policy.from_dict({"rules": [{"action": "allow"}], "audit": {"jsonl": str(log), "fsync": "off"}})
    trajectory = from_openai_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "read", "arguments": "{}"}}]}])
    for _ in range(30):
        Guard(policy).check_tool_calls(trajectory)
    gc.collect()
    open_on_log = [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(log.resolve())]
    assert len(open_on_log) <= 1


def test_an_sqlite_database_removed_under_the_sink_is_opened_again(tmp_path: Path) -> None:
    """Writes went on into the removed file, returned as recorded, readable by nobody."""
    path = tmp_path / "audit.db"
    sink = SqliteAuditSink(path)
    sink.write([_decided("first")])
    for leftover in tmp_path.glob("audit.db*"):
        leftover.unlink()
    sink.write([_decided("after removal")])
    assert [d.why for d in SqliteAuditSink(path).decisions()] == ["after removal"]


def test_infinite_and_nan_arguments_are_recorded_as_themselves(tmp_path: Path) -> None:
    """They were written as JSON null: the log named another call than the one decided."""
    log = tmp_path / "audit.jsonl"
    JsonlAuditSink(log, fsync="off").write([_decided(amount=float("inf"))])
    [read] = read_audit(log)
    assert read.tool_call is not None and read.tool_call.args == {"amount": float("inf")}


def test_a_line_nested_past_reading_is_skipped_not_the_end_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(log, fsync="off")
    sink.write([_decided("first")])
    with open(log, "ab") as handle:
        handle.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    sink.write([_decided("third")])
    skipped: list[int] = []
    assert [d.why for d in read_audit(log, on_skip=lambda number, raw: skipped.append(number))] == ["first", "third"]
    assert skipped == [2]
