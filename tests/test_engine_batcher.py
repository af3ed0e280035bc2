"""The batcher's bookkeeping for warm-ups that make way for judgments: how many judgments are
queued (`urgent_pending`, what a warm-up in hand looks at between chunks), and putting a cut
warm-up back in the queue from its own batch's callback without ever waiting on `close`, which
holds the start lock while it joins the worker."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from soda_guard.engine.batcher import MicroBatcher


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


class _Held:
    """A batch runner that holds its first batch until released, answering every item with
    its own value."""

    def __init__(self) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, items: Sequence[str], answer: Callable[[int, Any], None]) -> None:
        self.batches.append(list(items))
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(10)
        for index, item in enumerate(items):
            answer(index, item)


def test_the_batcher_counts_the_urgent_items_queued_and_not_yet_taken() -> None:
    held = _Held()
    batcher: MicroBatcher[str, str] = MicroBatcher(held, max_wait_s=0.0, urgent=lambda item: not item.startswith("warm"))
    try:
        first = batcher.submit(["judge-0"])
        assert held.inside.wait(10)
        assert batcher.urgent_pending == 0  # taken into the batch in hand
        later = batcher.submit(["warm-a", "judge-1", "judge-2"])
        assert batcher.urgent_pending == 2
        held.release.set()
        assert [future.result(10) for future in [*first, *later]] == ["judge-0", "warm-a", "judge-1", "judge-2"]
        assert batcher.urgent_pending == 0
    finally:
        batcher.close()


def test_a_batch_s_callback_requeues_without_waiting_for_close_and_gets_none_while_closing() -> None:
    held = _Held()
    batcher: MicroBatcher[str, str] = MicroBatcher(held, max_wait_s=0.0)
    requeued: list[Future[str] | None] = []
    (first,) = batcher.submit(["a"])
    first.add_done_callback(lambda _: requeued.append(batcher.requeue("a again")))  # on the worker's thread
    assert held.inside.wait(10)
    closing = threading.Thread(target=batcher.close, daemon=True)
    closing.start()
    _until(lambda: batcher._closing)  # close holds the start lock and waits for the worker
    held.release.set()
    closing.join(10)
    assert not closing.is_alive()  # `submit` here would have waited for the lock: a deadlock
    assert requeued == [None]


def test_a_requeued_item_runs_in_a_later_batch() -> None:
    held = _Held()
    held.inside.set()  # nothing held
    batcher: MicroBatcher[str, str] = MicroBatcher(held, max_wait_s=0.0)
    again: list[Future[str] | None] = []
    try:
        (first,) = batcher.submit(["a"])
        first.add_done_callback(lambda _: again.append(batcher.requeue("a again")))
        assert first.result(10) == "a"
        _until(lambda: bool(again))
        assert again[0] is not None and again[0].result(10) == "a again"
        assert held.batches == [["a"], ["a again"]]
    finally:
        batcher.close()


def test_close_fails_what_is_left_in_the_queue_behind_its_stop_mark() -> None:
    held = _Held()
    batcher: MicroBatcher[str, str] = MicroBatcher(held, max_wait_s=0.0)
    batcher.submit(["a"])
    assert held.inside.wait(10)
    closing = threading.Thread(target=batcher.close, daemon=True)
    closing.start()
    _until(lambda: batcher._closing and batcher.pending == 1)  # the stop mark is queued
    late: Future[str] = Future()
    batcher._queue.put(("late", late))  # a requeue that passed its check as close began
    held.release.set()
    closing.join(10)
    assert not closing.is_alive()
    assert isinstance(late.exception(1), RuntimeError)
