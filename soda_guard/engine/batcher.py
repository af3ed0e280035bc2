"""Gathering concurrent judgments into one forward batch.

Parallel tool calls, many agents, threads and asyncio tasks all submit here; one worker thread
takes whatever is queued, waits at most `max_wait_s` for more (up to `max_batch_size`), runs
the batch and answers each caller's future as soon as its row ends. A model forward is not
re-entrant, so the single worker is also the lock. An item whose caller has given up
(`expired`) is failed with `TimeoutError` instead of run, so abandoned work never queues ahead
of live calls.

`close` abandons the batch in hand (`abandon`: the engine drops its rows at the next step) and
joins the worker, so no thread is inside the model when the interpreter tears torch down: at
exit every live batcher is closed that way even if nobody called `close` (a daemon thread killed
mid-kernel aborted the process with "terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()
_live: weakref.WeakSet[MicroBatcher[object, object]] = weakref.WeakSet()
_exiting = threading.Event()


@atexit.register
def _close_all() -> None:
    _exiting.set()
    for batcher in list(_live):
        batcher.close()


def _after_fork() -> None:
    for batcher in list(_live):
        batcher._start_empty()


os.register_at_fork(after_in_child=_after_fork)


def _closing_error() -> RuntimeError:
    return RuntimeError("judgment dropped: the backend is closing")


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Item], Callable[[int, Result | BaseException], None]], None],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.002,
        name: str = "soda-guard-batcher",
        expired: Callable[[Item], bool] = lambda item: False,
        abandon: Callable[[Item], None] = lambda item: None,
        urgent: Callable[[Item], bool] = lambda item: True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self._expired = expired
        self._abandon = abandon
        self._urgent = urgent
        self._closing = False
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._name = name
        self._start_empty()

    def _start_empty(self) -> None:
        """No worker and nothing queued; also what a forked child has (`_after_fork`): its
        parent's worker is not copied, and seen as started it was never started again, so every
        judgment in the child waited out its deadline."""
        self._urgent_queued = 0
        self._count_lock = threading.Lock()
        self._in_hand: list[Item] = []
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._queue.qsize()

    @property
    def urgent_pending(self) -> int:
        """Urgent items (`urgent`: judgments, not warm-ups) queued and not yet taken into a
        batch: what a batch in hand doing optional work should make way for."""
        return self._urgent_queued

    def submit(self, items: Sequence[Item]) -> list[Future[Result]]:
        futures: list[Future[Result]] = [Future() for _ in items]
        if _exiting.is_set():
            for future in futures:
                future.set_exception(RuntimeError("the interpreter is exiting"))
            return futures
        self._ensure_started()
        self._enqueue(items, futures)
        return futures

    def _enqueue(self, items: Sequence[Item], futures: Sequence[Future[Result]]) -> None:
        urgent = sum(map(self._urgent, items))
        if urgent:  # counted before they are queued, so never below zero once taken
            with self._count_lock:
                self._urgent_queued += urgent
        for item, future in zip(items, futures):
            self._queue.put((item, future))

    def _taken(self, entry: tuple[Item, Future[Result]]) -> tuple[Item, Future[Result]]:
        if self._urgent(entry[0]):
            with self._count_lock:
                self._urgent_queued -= 1
        return entry

    def close(self) -> None:
        """Drops the work in hand and queued (their callers get an error) and joins the worker."""
        with self._start_lock:
            if self._thread is not None:
                self._closing = True
                for item, future in list(self._in_hand):
                    if not future.done():  # an answered caller's request is its own again
                        self._abandon(item)
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None
                self._drop_queued()
                self._closing = False

    def requeue(self, item: Item) -> Future[Result] | None:
        """Queue `item` again from a callback of a batch, on the worker's own thread. Unlike
        `submit` it never takes the start lock, which `close` holds while it joins this very
        thread. None once the batcher is closing or closed."""
        if self._closing or self._thread is None:
            return None
        future: Future[Result] = Future()
        self._enqueue([item], [future])
        return future

    def _drop_queued(self) -> None:
        """Fail what is still queued once the worker has stopped: put there after `close`'s stop
        mark, nothing would ever answer it."""
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP:
                item, future = self._taken(entry)  # type: ignore[arg-type]
                if future.set_running_or_notify_cancel():
                    future.set_exception(_closing_error())

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
                _live.add(self)  # type: ignore[arg-type]

    def _gather(self, first: tuple[Item, Future[Result]]) -> tuple[list[tuple[Item, Future[Result]]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _STOP:
                stop = True
                break
            batch.append(self._taken(entry))  # type: ignore[arg-type]
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(self._taken(first))  # type: ignore[arg-type]
            self._run([entry for entry in batch if entry[1].set_running_or_notify_cancel() and self._live(entry)])
            if stop:
                return

    def _live(self, entry: tuple[Item, Future[Result]]) -> bool:
        item, future = entry
        if self._closing:
            future.set_exception(_closing_error())
            return False
        if self._expired(item):
            future.set_exception(TimeoutError("judgment abandoned: its deadline passed before it started"))
            return False
        return True

    def _run(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        if not batch:
            return

        def answer(index: int, result: Result | BaseException) -> None:
            if isinstance(result, BaseException):
                batch[index][1].set_exception(result)
            else:
                batch[index][1].set_result(result)

        self._in_hand = batch
        try:
            if self._closing:  # close() began after this batch was gathered, before it was in hand
                for item, _ in batch:
                    self._abandon(item)
            self._run_batch([item for item, _ in batch], answer)
        except BaseException as error:  # every caller must hear about it, whatever it is
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._in_hand = []
