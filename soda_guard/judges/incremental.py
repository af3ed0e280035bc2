"""Rendering that costs what is new, not what has been seen.

An agent's history is judged again at every tool call and once per parallel call of a turn:
rendered from scratch, every call of a 1,000-step conversation re-neutralises and re-fits all of
it. Two caches make a call's cost flat in the conversation's length, with output identical to
the uncached renderer (`fit_blocks`), which stays the reference:

- `BlockMemo`: a message's rendered block (neutralised text, structure parts), keyed by its
  content, so a message is neutralised once in the conversation, whichever turn sees it again;
- `HistoryMemo`: everything before the message being judged, keyed by the identity of its step
  objects (steps are values: nothing edits one in place), fitted once per turn as a
  `PreparedHistory` that the turn's calls share. `fit_blocks` elides along a fixed order while
  the prompt is too long; with the protected last message outside the history, the walk is the
  same for every call of the turn, so its running totals are computed once and each call finds
  where its own walk stops by bisection.
"""

from __future__ import annotations

import bisect
import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable, Generic, Hashable, TypeVar

from soda_guard.judges.context import Block, Omitted, omission_marker

V = TypeVar("V")


class Lru(Generic[V]):
    """A lock-guarded least-recently-used map bounded by a total weight."""

    def __init__(self, max_weight: int) -> None:
        self.max_weight = max_weight
        self.weight = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: V, weight: int) -> None:
        if weight > self.max_weight:
            return
        with self._lock:
            replaced = self._entries.pop(key, None)
            if replaced is not None:
                self.weight -= replaced[1]
            self._entries[key] = (value, weight)
            self.weight += weight
            while self.weight > self.max_weight:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.weight -= evicted


class BlockMemo:
    """Rendered blocks by content key, bounded by the characters they hold."""

    def __init__(self, max_chars: int = 32 << 20) -> None:
        self._lru: Lru[Block] = Lru(max_chars)

    def get(self, key: Hashable, make: Callable[[], Block]) -> Block:
        found = self._lru.get(key)
        if found is None:
            found = make()
            self._lru.put(key, found, len(found.text) + 64)
        return found


class PreparedHistory:
    """The messages before the last one, fitted for every stopping point of the elision walk.

    Built from the history's blocks (flags set as in the full list of `count` blocks) with the
    parameters `fit_blocks` gets. For a tail of protected, shown blocks, `items(removals)`
    followed by the tail `stop(tail, room)` returns is exactly what
    `fit_blocks(history + tail, room, ...)` returns; `stop` is None where it cannot say (the
    protected messages alone overflow and must be clipped to a common level: the caller runs
    `fit_blocks` itself)."""

    def __init__(
        self,
        blocks: Sequence[Block],
        count: int,
        *,
        overhead: Callable[[Block], int],
        marker_overhead: int,
        max_message_chars: int,
    ) -> None:
        self.overhead = overhead
        self.max_message_chars = max_message_chars
        self.clipped = [b if b.whole or not b.shown else b.clipped(max_message_chars) for b in blocks]
        self.truncated = any(c.text != b.text for c, b in zip(self.clipped, blocks))
        widest = len(omission_marker(count)) + marker_overhead
        size = len(self.clipped)
        removed = [not b.shown for b in self.clipped]
        gaps = sum(1 for i in range(size) if removed[i] and (i == 0 or not removed[i - 1]))
        total = sum(overhead(b) + len(b.text) for b, gone in zip(self.clipped, removed) if not gone)
        self.order = sorted(
            (i for i, b in enumerate(self.clipped) if not b.protected and b.shown), key=lambda i: (self.clipped[i].rank, i)
        )
        # lowest[k]: the least prompt length (tail excluded) the walk reaches within k removals,
        # negated so that it ascends and the first stop under a limit is found by bisection
        lowest: list[int] = []
        least = total + gaps * widest
        lowest.append(-least)
        for index in self.order:
            left = index > 0 and removed[index - 1]
            right = index + 1 < size and removed[index + 1]
            gaps += 1 - left - right
            removed[index] = True
            total -= overhead(self.clipped[index]) + len(self.clipped[index].text)
            least = min(least, total + gaps * widest)
            lowest.append(-least)
        self._lowest = lowest
        self._items: dict[int, tuple[Block | Omitted, ...]] = {}
        self._rendered: dict[tuple[int, Hashable], object] = {}
        self._lock = threading.Lock()

    def stop(self, tail: Sequence[Block], room: int) -> tuple[int, list[Block], bool] | None:
        """(how many history messages the walk removes, the tail as shown, whether anything was
        cut), or None when the walk removes all it can and the prompt still overflows."""
        if not all(b.protected and b.shown for b in tail):
            raise ValueError("a prepared history takes only protected, shown tail blocks")
        shown = [b if b.whole else b.clipped(self.max_message_chars) for b in tail]
        truncated = self.truncated or any(c.text != b.text for c, b in zip(shown, tail))
        limit = room - sum(self.overhead(b) + len(b.text) for b in shown)
        removals = bisect.bisect_left(self._lowest, -limit)
        if removals == len(self._lowest):
            return None
        return removals, shown, truncated or removals > 0

    def items(self, removals: int) -> tuple[Block | Omitted, ...]:
        """The history as shown after `removals` steps of the walk, runs of removed messages
        merged into one marker each; computed once per stopping point."""
        with self._lock:
            found = self._items.get(removals)
        if found is not None:
            return found
        gone = set(self.order[:removals])
        items: list[Block | Omitted] = []
        for index, block in enumerate(self.clipped):
            if block.shown and index not in gone:
                items.append(block)
            elif items and isinstance(items[-1], Omitted):
                items[-1] = Omitted(items[-1].count + 1)
            else:
                items.append(Omitted(1))
        made = tuple(items)
        with self._lock:
            return self._items.setdefault(removals, made)

    def rendered(self, removals: int, key: Hashable, render: Callable[[tuple[Block | Omitted, ...]], V]) -> V:
        """A judge's own rendering of the history at a stopping point, made once and shared by
        the turn's calls (`key` tells judges' renderings apart)."""
        with self._lock:
            found = self._rendered.get((removals, key))
        if found is not None:
            return found  # type: ignore[return-value]
        made = render(self.items(removals))
        with self._lock:
            return self._rendered.setdefault((removals, key), made)  # type: ignore[return-value]


class HistoryMemo:
    """Prepared histories of recent turns, keyed by the identity of their step objects and
    the flags the caller derived from the whole conversation (`shape`)."""

    def __init__(self, max_entries: int = 64) -> None:
        self._lru: Lru[tuple[tuple[object, ...], PreparedHistory]] = Lru(max_entries)

    def get(self, steps: Sequence[object], shape: Hashable, prepare: Callable[[], PreparedHistory]) -> PreparedHistory:
        key = (shape, len(steps), id(steps[0]) if steps else 0, id(steps[-1]) if steps else 0)
        found = self._lru.get(key)
        if found is not None and len(found[0]) == len(steps) and all(map(operator.is_, found[0], steps)):
            return found[1]
        prepared = prepare()
        self._lru.put(key, (tuple(steps), prepared), 1)
        return prepared
