"""Warm-up requests that a newer one of the same conversation makes pointless.

While the agent's model thinks, the guard sends the judge the conversation so far, so that the
judge's prefix cache already holds it when the tool calls arrive (`Guard.warm_up`). A warm-up
still queued when a newer one of the same conversation comes would prefill a prefix of what the
newer one prefills, and one still queued when the conversation's judgment comes would prefill
what the judgment prefills itself: it is cancelled instead of run.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Hashable


class LatestPerKey:
    """The pending warm-up of each conversation; registering a newer one cancels the older
    (a no-op once it runs). Entries leave as their futures finish, so it holds only what is
    queued or running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Hashable, Future[Any]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def replace(self, key: Hashable, future: Future[Any]) -> None:
        with self._lock:
            older = self._pending.get(key)
            self._pending[key] = future
        if older is not None:
            older.cancel()
        future.add_done_callback(lambda done: self._forget(key, done))

    def cancel(self, key: Hashable) -> None:
        """Cancel the conversation's pending warm-up: its judgment has come, and prefills what
        the warm-up would have itself."""
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            pending.cancel()

    def _forget(self, key: Hashable, done: Future[Any]) -> None:
        with self._lock:
            if self._pending.get(key) is done:
                del self._pending[key]
