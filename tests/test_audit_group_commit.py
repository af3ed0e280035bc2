"""The JSONL sink keeps its file open and shares one fsync among concurrent writers, without
weakening the guarantee: a write returns only after an fsync that began after its record was
in the file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from soda_guard import AuditError, Decision, read_audit
from soda_guard.audit import JsonlAuditSink
from soda_guard.verdict import Action


def _decision(tag: str) -> Decision:
    return Decision(action=Action.ALLOW, why=tag, rule="test")


class _SlowFsync:
    """Counts fsyncs and remembers the file size each one covered (taken as it starts)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pause_s: float = 0.02, fail: bool = False) -> None:
        self.real = os.fsync
        self.covered: list[int] = []
        self.lock = threading.Lock()
        self.pause_s = pause_s
        self.fail = fail
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(self.pause_s)
        if self.fail:
            raise OSError(5, "Input/output error")
        self.real(fd)
        with self.lock:
            self.covered.append(size)


def test_concurrent_writers_share_fsyncs_and_each_returns_after_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsync = _SlowFsync(monkeypatch)
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    ends: dict[str, int] = {}
    unsynced: list[str] = []

    def writer(tag: str) -> None:
        sink.write([_decision(tag)])
        raw = (tmp_path / "audit.jsonl").read_bytes()
        ends[tag] = raw.index(tag.encode()) + len(tag)
        with fsync.lock:
            if not any(size >= ends[tag] for size in fsync.covered):
                unsynced.append(tag)

    threads = [threading.Thread(target=writer, args=(f"w{index:03d}",)) for index in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not unsynced
    assert len(fsync.covered) < len(threads)  # shared: the writers that came during one fsync share the next
    assert sorted(d.why for d in read_audit(tmp_path / "audit.jsonl")) == sorted(ends)
    sink.close()


def test_the_file_is_opened_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda path, *args: opened.append(str(path)) or real(path, *args))
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    for index in range(5):
        sink.write([_decision(str(index))])
    assert opened == [str(tmp_path / "audit.jsonl")]
    sink.close()


def test_a_rotated_log_is_followed_to_the_new_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(log)
    sink.write([_decision("before")])
    os.rename(log, tmp_path / "audit.jsonl.1")
    sink.write([_decision("after")])
    assert [d.why for d in read_audit(log)] == ["after"]
    assert [d.why for d in read_audit(tmp_path / "audit.jsonl.1")] == ["before"]
    sink.close()


def test_a_failed_fsync_fails_every_write_it_covered_and_the_next_write_starts_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsync = _SlowFsync(monkeypatch, fail=True)
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    failures: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            sink.write([_decision(tag)])
        except AuditError as error:
            failures.append(error)

    threads = [threading.Thread(target=writer, args=(f"w{index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 6 and all("fsync" in str(error) for error in failures)
    fsync.fail = False
    sink.write([_decision("later")])  # a fresh handle, not the one whose error the kernel may have cleared
    assert fsync.covered
    sink.close()


def test_a_writer_waiting_on_an_fsync_gives_up_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _SlowFsync(monkeypatch, pause_s=0.5)
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    leader = threading.Thread(target=sink.write, args=([_decision("leader")],))
    leader.start()
    time.sleep(0.05)
    with pytest.raises(AuditError, match="deadline"):
        sink.write([_decision("late")], deadline=time.monotonic() + 0.05)
    leader.join()
    sink.close()
