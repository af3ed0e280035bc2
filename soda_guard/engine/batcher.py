"""Gathering concurrent judgments into one forward batch.

Parallel tool calls, many agents, threads and asyncio tasks all submit here; one worker thread
takes whatever is queued, waits at most `max_wait_s` for more (up to `max_batch_size`), runs
the batch and answers each caller's future as soon as its row ends. A model forward is not
re-entrant, so the single worker is also the lock. An item whose caller has given up
(`expired`) is failed with `TimeoutError` instead of run, so abandoned work never queues ahead
of live calls.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Item], Callable[[int, Result | BaseException], None]], None],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.002,
        name: str = "soda-guard-batcher",
        expired: Callable[[Item], bool] = lambda item: False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self._expired = expired
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._name = name
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._queue.qsize()

    def submit(self, items: Sequence[Item]) -> list[Future[Result]]:
        self._ensure_started()
        futures: list[Future[Result]] = []
        for item in items:
            future: Future[Result] = Future()
            futures.append(future)
            self._queue.put((item, future))
        return futures

    def close(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

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
            batch.append(entry)  # type: ignore[arg-type]
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)  # type: ignore[arg-type]
            self._run([entry for entry in batch if entry[1].set_running_or_notify_cancel() and self._live(entry)])
            if stop:
                return

    def _live(self, entry: tuple[Item, Future[Result]]) -> bool:
        item, future = entry
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

        try:
            self._run_batch([item for item, _ in batch], answer)
        except BaseException as error:  # every caller must hear about it, whatever it is
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
