"""Where the parallel calls of one model turn meet when no guard node or middleware judged the
turn first (the `ToolNode` wrapper alone): one leader judges and asks, the others follow."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import OrderedDict
from typing import Callable

from langgraph.errors import GraphInterrupt

from soda_guard.records import TurnRecords

Key = tuple[str, str | None, str]


class _Attempt:
    def __init__(self, followers: int, task: str | None) -> None:
        self.task = task
        self.done = False
        self.turn: TurnRecords | None = None
        self.error: BaseException | None = None
        self.followers = followers


class TurnCoordinator:
    """Lets the parallel calls of one model turn agree on one judgment and one review when no
    guard node or middleware judged the turn first, whether they run in one `ToolNode` or are
    split over several (each with its own wrapper): entries are keyed by policy, thread and
    turn, not by wrapper, and one coordinator serves the whole process.

    The call that comes first in the model's message leads: it judges the whole turn and, if
    anything is escalated, raises the single interrupt. The others wait for its result, or
    re-raise its interrupt, so no call of the turn runs before the reviewer answers, and on
    resume none runs twice. Async followers wait on the event loop (an `asyncio.Event` woken
    from whichever thread the leader finishes on), never on an executor thread, so a turn
    wider than the default executor cannot starve its own leader. An attempt is dropped once
    each of its followers has read it, so a later run (a resume) never sees it; an attempt
    that ended in an interrupt and is still present may be an earlier run's, so a newer one
    is awaited for `grace_s` before it is trusted. Entries are bounded in number."""

    def __init__(self, size: int = 1024, grace_s: float = 1.0) -> None:
        self._latest: OrderedDict[Key, _Attempt] = OrderedDict()
        self._wakers: dict[Key, list[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._size = size
        self.grace_s = grace_s

    def _wake(self, key: Key) -> None:
        for wake in self._wakers.pop(key, []):
            wake()

    def lead(self, key: Key, followers: int, task: str | None = None) -> _Attempt:
        attempt = _Attempt(followers, task)
        with self._lock:
            self._latest[key] = attempt
            self._latest.move_to_end(key)
            while len(self._latest) > self._size:
                self._latest.popitem(last=False)
            self._wake(key)
        return attempt

    def finish(self, key: Key, attempt: _Attempt, turn: TurnRecords | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            attempt.turn, attempt.error, attempt.done = turn, error, True
            if attempt.followers <= 0 and self._latest.get(key) is attempt:
                del self._latest[key]
            self._wake(key)

    def _forget(self, key: Key, waker: Callable[[], None]) -> None:
        with self._lock:
            wakers = self._wakers.get(key, [])
            if waker in wakers:
                wakers.remove(waker)
            if not wakers:
                self._wakers.pop(key, None)

    def _poll(self, key: Key, stale: _Attempt | None, waker: Callable[[], None]) -> tuple[_Attempt | None, float | None]:
        """The attempt to use now, or None and how long to wait (None: the caller's bound)
        with `waker` registered for the next change of `key`."""
        with self._lock:
            attempt = self._latest.get(key)
            if attempt is not None and attempt.done and (attempt.error is None or attempt is not stale):
                return attempt, None
            self._wakers.setdefault(key, []).append(waker)
            return None, (None if attempt is not None and not attempt.done else self.grace_s)

    def _take(self, key: Key, attempt: _Attempt | None, task: str | None) -> TurnRecords | None:
        if attempt is None:
            return None
        with self._lock:
            attempt.followers -= 1
            if attempt.followers <= 0 and self._latest.get(key) is attempt:
                del self._latest[key]
        if isinstance(attempt.error, GraphInterrupt) and attempt.task != task:
            # another node's task asks the question: this one pauses without asking it twice
            # (an empty interrupt saves nothing, so this task runs again on resume)
            raise GraphInterrupt(())
        if attempt.error is not None:
            raise attempt.error
        return attempt.turn

    def _first(self, key: Key) -> _Attempt | None:
        with self._lock:
            attempt = self._latest.get(key)
        return attempt if attempt is not None and attempt.done and attempt.error is not None else None

    def follow(self, key: Key, wait_s: float, task: str | None = None) -> TurnRecords | None:
        """The leader's records; its exception (an interrupt) re-raised; None when no leader
        shows up within the grace period (the caller then judges its call on its own)."""
        stale, deadline = self._first(key), time.monotonic() + wait_s
        grace_end = time.monotonic() + self.grace_s
        while True:
            event = threading.Event()
            attempt, wait = self._poll(key, stale, event.set)
            if attempt is not None:
                return self._take(key, attempt, task)
            end = deadline if wait is None else min(deadline, grace_end)
            try:
                if not event.wait(max(0.0, end - time.monotonic())):
                    return self._expired(key, stale, wait is None, wait_s, task)
            finally:
                self._forget(key, event.set)

    async def afollow(self, key: Key, wait_s: float, task: str | None = None) -> TurnRecords | None:
        """`follow` for the event loop: waits on an `asyncio.Event`, holding no thread."""
        loop = asyncio.get_running_loop()
        stale, deadline = self._first(key), loop.time() + wait_s
        grace_end = loop.time() + self.grace_s
        while True:
            event = asyncio.Event()
            waker = functools.partial(_wake_loop, loop, event)
            attempt, wait = self._poll(key, stale, waker)
            if attempt is not None:
                return self._take(key, attempt, task)
            end = deadline if wait is None else min(deadline, grace_end)
            try:
                await asyncio.wait_for(event.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                return self._expired(key, stale, wait is None, wait_s, task)
            finally:
                self._forget(key, waker)

    def _expired(
        self, key: Key, stale: _Attempt | None, leading: bool, wait_s: float, task: str | None
    ) -> TurnRecords | None:
        if leading:
            raise TimeoutError(f"the judgment of this turn did not finish within {wait_s:.0f}s")
        return self._take(key, stale, task)


def _wake_loop(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Set `event` on its own loop from any thread; a loop that closed meanwhile has nobody
    left to wake."""
    try:
        loop.call_soon_threadsafe(event.set)
    except RuntimeError:
        pass


# one for the process: the calls of a turn split over several ToolNodes meet here
TURNS = TurnCoordinator()
