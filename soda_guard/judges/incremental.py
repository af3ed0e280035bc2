"""Rendering that costs what is new, not what has been seen.

An agent's history is judged again at every tool call and once per parallel call of a turn:
rendered from scratch, every call of a 1,000-step conversation re-neutralises and re-fits all of
it. Two caches make a call's cost flat in the conversation's length, with output identical to
the uncached renderer (`fit_blocks`), which stays the reference:

- `BlockMemo`: a message's rendered block (neutralised text, structure parts), found by the
  step object itself while it lives and else by its content, so a message is neutralised once
  in the conversation, whichever turn sees it again, and a turn pays a dictionary lookup for
  each message it has seen before;
- `ShownWhole`: a conversation's latest history while it is shown whole (nothing elided), so
  the next turn that still fits appends its new blocks to that rendering without preparing
  anything (the common case: a conversation within the judge's budget);
- `HistoryMemo`: everything before the message being judged, keyed by the identity of its step
  objects (steps are values: nothing edits one in place), fitted once per turn as a
  `PreparedHistory` that the turn's calls share. `fit_blocks` elides along a fixed order while
  the prompt is too long; with the protected last message outside the history, the walk is the
  same for every call of the turn, so its running totals are computed once (and only when the
  prompt does not fit whole) and each call finds where its own walk stops by bisection. Past
  the budget, the next turn's walk and rendering are the previous turn's with the new messages
  edited in (`elision`).
"""

from __future__ import annotations

import operator
import threading
import weakref
from dataclasses import dataclass, replace
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Generic, Hashable, TypeVar

from soda_guard.judges.chunked import Chunked
from soda_guard.judges.context import Block, any_clipped, clip_block, widest_marker
from soda_guard.judges.elision import Elision, Pieces, Walk
from soda_guard.trajectory import exact_steps, same_start

V = TypeVar("V")
S = TypeVar("S")
P = TypeVar("P")
R = TypeVar("R")


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

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._entries.values()]

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


class _KeyedRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that knows its entry's key: one callback serves the whole memo,
    instead of a closure made per entry."""

    __slots__ = ("key",)


class IdentityMemo(Generic[V]):
    """Values by the identity of the object they were made from, each entry gone with its
    object: a lookup is a dictionary read, and the memo holds no object alive (so it needs no
    bound of its own). Only for objects that nothing edits in place, or with a check of what
    the value was made from (`value` may carry it)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[object], V]] = {}
        entries = self._entries

        def forget(ref: _KeyedRef) -> None:
            if (entry := entries.get(ref.key)) is not None and entry[0] is ref:
                entries.pop(ref.key, None)

        self._forget = forget

    def get(self, obj: object) -> V | None:
        found = self._entries.get(id(obj))
        if found is None or found[0]() is not obj:
            return None
        return found[1]

    def put(self, obj: object, value: V) -> None:
        ref = _KeyedRef(obj, self._forget)
        ref.key = id(obj)
        self._entries[ref.key] = (ref, value)


AT_ONCE_MAX_STEPS = 1024
"""The longest conversation whose render `BlockMemo.all_seen` may call a small job."""


class BlockMemo(Generic[S]):
    """Rendered blocks by step (`IdentityMemo`: steps are values) and else by content key,
    bounded by the characters they hold; and a block's variants with other flags, made once."""

    def __init__(self, key: Callable[[S], Hashable], make: Callable[[S], Block], max_chars: int = 32 << 20) -> None:
        self._key = key
        self._make = make
        self._lru: Lru[Block] = Lru(max_chars)
        self._steps: IdentityMemo[Block] = IdentityMemo()
        self._variants: IdentityMemo[dict[tuple[bool, bool, bool], Block]] = IdentityMemo()

    def get(self, step: S) -> Block:
        found = self._steps.get(step)
        if found is not None:
            return found
        key = self._key(step)
        found = self._lru.get(key)
        if found is None:
            found = self._make(step)
            self._lru.put(key, found, len(found.text) + 64)
        self._steps.put(step, found)
        return found

    def all_seen(self, views: Sequence[Sequence[S]], new_text: Callable[[S, int], int], *, max_steps: int = AT_ONCE_MAX_STEPS, max_new_chars: int = 16384) -> bool:
        """Whether rendering `views` (conversations sharing most of their steps, as a turn's
        parallel calls do) is a small job: each of at most `max_steps`, and every distinct step
        with its block found by identity but for at most `max_new_chars` of new text in all
        (`new_text(step, limit)` measures a step's, stopping past `limit`)."""
        if any(len(steps) > max_steps for steps in views):
            return False
        left = max_new_chars
        checked: set[int] = set()
        for steps in views:
            for step in steps:
                if id(step) in checked:
                    continue
                checked.add(id(step))
                if self._steps.get(step) is None:
                    left -= new_text(step, left)
                    if left < 0:
                        return False
        return True

    def flagged(self, base: Block, *, protected: bool = False, whole: bool = False, shown: bool = True) -> Block:
        """`base` (made with the default flags) with these flags."""
        if not protected and not whole and shown:
            return base
        variants = self._variants.get(base)
        if variants is None:
            variants = {}
            self._variants.put(base, variants)
        flags = (protected, whole, shown)
        found = variants.get(flags)
        if found is None:
            found = variants.setdefault(flags, replace(base, protected=protected, whole=whole, shown=shown))
        return found


@dataclass(frozen=True)
class ShownWhole:
    """A history shown whole, as a judge rendered it, with the figures its fit is checked by.

    `steps` is the history itself (held, so that a later conversation is known to continue it
    by the identity of its first steps); `shape` the flags the caller derived from the whole
    conversation, as `HistoryMemo`'s; `total` the shown blocks' length with their overhead and
    `gaps` the runs of blocks left out (one marker each); `cut` whether a block was clipped;
    `source` the steps the history was read from, where the caller left some out (None: `steps`)."""

    steps: list[object]
    shape: Hashable
    text: str
    total: int
    gaps: int
    cut: bool
    source: list[object] | None = None

    def grown(
        self,
        steps: list[object],
        shape: Hashable,
        blocks: Sequence[Block],
        tail: Sequence[Block],
        room: int,
        count: int,
        *,
        overhead: Callable[[Block], int],
        marker_overhead: int,
        max_message_chars: int,
        append: Callable[[str, Sequence[Block]], str],
    ) -> tuple[ShownWhole, list[Block], bool] | None:
        """This history followed by `blocks` (`steps`, with the same flags on every earlier
        block), still shown whole before `tail`: (that history, the tail as shown, whether
        anything was cut), from the running figures and the new blocks alone; None where the
        prompt would not fit whole in `room` (the walk must elide: `PreparedHistory`), or a
        new block is not shown. The figures are `PreparedHistory`'s, by the same rules."""
        if not all(block.shown for block in blocks):
            return None
        appended = [clip_block(block, max_message_chars) for block in blocks]
        shown, limit = shown_tail(tail, room, overhead, max_message_chars)
        total = self.total + sum(overhead(block) + len(block.text) for block in appended)
        if total + self.gaps * widest_marker(count, marker_overhead) > limit:
            return None
        cut = self.cut or any_clipped(appended, blocks)
        whole = ShownWhole(steps, shape, append(self.text, appended), total, self.gaps, cut)
        return whole, shown, cut or any_clipped(shown, tail)


def shown_tail(
    tail: Sequence[Block], room: int, overhead: Callable[[Block], int], max_message_chars: int
) -> tuple[list[Block], int]:
    """The protected tail as shown, and the room it leaves the history."""
    shown = [block if block.whole else block.clipped(max_message_chars) for block in tail]
    return shown, room - sum(overhead(block) + len(block.text) for block in shown)


class PreparedHistory:
    """The messages before the last one, fitted for every stopping point of the elision walk.

    Built from the history's blocks (flags set as in the full list of `count` blocks) with the
    parameters `fit_blocks` gets. For a tail of protected, shown blocks, the history's items
    after `removals` steps of the walk followed by the tail `stop(tail, room)` returns are
    exactly what `fit_blocks(history + tail, room, ...)` returns; `stop` is None where it cannot
    say (the protected messages alone overflow and must be clipped to a common level: the
    caller runs `fit_blocks` itself). A judge renders those items with `joined`, one piece per
    block, building on the rendering of the history this one extends."""

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
        self.marker_overhead = marker_overhead
        self.max_message_chars = max_message_chars
        self.blocks: Chunked[Block] = Chunked()
        self.clipped: Chunked[Block] = self.blocks
        self._cut = self._total = self._gaps = 0
        self._add({}, {}, blocks)
        self._fresh(count)

    def _add(self, replaced: Mapping[int, Block], clipped: Mapping[int, Block], blocks: Sequence[Block]) -> None:
        """Replace the blocks at `replaced`'s indexes (`clipped`: as clipped) and append
        `blocks`, keeping the running figures: how many were clipped, the shown text's length
        with its overhead, and the runs of blocks left out (each one marker)."""
        removed = self.blocks.size > 0 and not self.blocks.chunks[-1][-1].shown
        appended = [self._clip(block) for block in blocks]
        for block, made in zip(blocks, appended):
            self._cut += made.text != block.text
            if made.shown:
                self._total += self.overhead(made) + len(made.text)
            elif not removed:
                self._gaps += 1
            removed = not made.shown
        self.blocks = self.blocks.edited(replaced, blocks)
        self.clipped = self.clipped.edited(clipped, appended)

    def _fresh(self, count: int) -> None:
        """What is made from the whole history on first need, empty; the marker cost for `count`."""
        self._widest = widest_marker(count, self.marker_overhead)
        self._walk: Walk | None = None
        self._joined: dict[tuple[int, Pieces], tuple[Elision, object]] = {}
        self._inherited: _Inherited | None = None
        self._lock = threading.Lock()

    def _clip(self, block: Block) -> Block:
        return clip_block(block, self.max_message_chars)

    @property
    def truncated(self) -> bool:
        return self._cut > 0

    def shown_whole(self, steps: list[object], shape: Hashable, text: str) -> ShownWhole:
        """This history shown whole (`text`, its rendering with no removals) as `ShownWhole`."""
        return ShownWhole(steps, shape, text, self._total, self._gaps, self.truncated)

    def extended(self, changed: Mapping[int, Block], appended: Sequence[Block], count: int) -> PreparedHistory | None:
        """The prepared history of this one's blocks with those at `changed` indexes replaced
        and `appended` after them (the next turn of the same conversation), in time linear in
        what changed rather than in the history's length; None when a replaced block is shown
        where it was not, or the other way round (the caller prepares it whole)."""
        blocks, clipped = self.blocks, self.clipped
        if any(index >= blocks.size or blocks[index].shown != block.shown for index, block in changed.items()):
            return None
        made = object.__new__(PreparedHistory)
        made.overhead, made.marker_overhead, made.max_message_chars = self.overhead, self.marker_overhead, self.max_message_chars
        made.blocks, made.clipped = blocks, clipped
        made._cut, made._total, made._gaps = self._cut, self._total, self._gaps
        replaced: dict[int, Block] = {}
        replaced_clipped: dict[int, Block] = {}
        for index, block in changed.items():  # shown as before: the runs left out stay as they were
            old, new = clipped[index], self._clip(block)
            replaced[index], replaced_clipped[index] = block, new
            made._cut += (new.text != block.text) - (old.text != blocks[index].text)
            if new.shown:
                made._total += self.overhead(new) + len(new.text) - self.overhead(old) - len(old.text)
        made._add(replaced, replaced_clipped, appended)
        made._fresh(count)
        added_shown = all(block.shown for block in made.clipped.tail(blocks.size))
        with self._lock:
            walk, joined = self._walk, dict(self._joined)
        kept: dict[int, int] = {}
        if walk is not None:  # which blocks the walk takes first does not depend on a marker's cost
            continued, kept = walk.continued(self.clipped, made.clipped, changed, made._start(), self.overhead)
            made._walk = continued if made._widest == self._widest else None
        states = [state for state, _ in joined.values() if state.precedes(kept)]
        if states and added_shown:
            made._inherited = _Inherited(tuple(changed), states)
        return made

    def _start(self) -> int:
        """The prompt's length, tail excluded, with nothing removed."""
        return self._total + self._gaps * self._widest

    def walk(self) -> Walk:
        """The elision walk over this history, made on first need: a prompt that fits whole
        needs none, and a history extended from one that needed it edits that one's."""
        walk = self._walk
        if walk is None:
            walk = Walk.made(list(self.clipped), self._start(), self._widest, self.overhead)
            with self._lock:
                walk = self._walk = self._walk or walk
        return walk

    def stop(self, tail: Sequence[Block], room: int) -> tuple[int, list[Block], bool] | None:
        """(how many history messages the walk removes, the tail as shown, whether anything was
        cut), or None when the walk removes all it can and the prompt still overflows."""
        if not all(b.protected and b.shown for b in tail):
            raise ValueError("a prepared history takes only protected, shown tail blocks")
        shown, limit = shown_tail(tail, room, self.overhead, self.max_message_chars)
        truncated = self.truncated or any_clipped(shown, tail)
        if self._start() <= limit:
            return 0, shown, truncated
        removals = self.walk().first_under(limit)
        if removals is None:
            return None
        return removals, shown, truncated or removals > 0

    def joined(self, removals: int, pieces: Pieces[P, Any, R]) -> R:
        """The history at a stopping point rendered by a judge whose rendering is made of one
        piece per block (`Pieces`), made once and shared by the turn's calls. A history
        extended from an earlier one takes that one's pieces, adds the new blocks' and edits
        those the walk removes since (`Elision`), so a turn costs what it adds and what it
        elides, not the history's length."""
        with self._lock:
            found = self._joined.get((removals, pieces))
        if found is not None:
            return found[1]  # type: ignore[return-value]
        state = self._elision(removals, pieces)
        made = state.rendering()
        with self._lock:
            return self._joined.setdefault((removals, pieces), (state, made))[1]  # type: ignore[return-value]

    def _elision(self, removals: int, pieces: Pieces) -> Elision:
        """The pieces after `removals` steps of the walk, from the nearest earlier state of
        this history or of the one it extends, else made whole."""
        walk = self.walk() if removals else None
        cut = walk.cut(removals) if walk is not None else {}
        with self._lock:
            own = [state for state, _ in self._joined.values() if state.pieces_of is pieces]
            inherited = self._inherited
        earlier = [state for state in own if state.precedes(cut)]
        if earlier:
            return max(earlier, key=_removals).following(self.clipped, walk, cut)
        if inherited is not None:
            states = [state for state in inherited.states if state.pieces_of is pieces and state.precedes(cut)]
            if states:
                return max(states, key=_removals).following(self.clipped, walk, cut, inherited.changed)
        return Elision.made(list(self.clipped), walk, removals, pieces)


_removals = operator.attrgetter("removals")


@dataclass(frozen=True)
class _Inherited:
    """What a history extended from another takes of its renderings past the budget: the
    indexes of the other's blocks replaced, and its states whose removed blocks are the first
    ones of this history's walk too."""

    changed: tuple[int, ...]
    states: list[Elision]


def continues(earlier: list[Any], steps: list[Any]) -> bool:
    """Whether `steps` are `earlier` followed by at least one more step, matched by identity
    (steps that compare equal may still render otherwise: `1 == True`), where `earlier` is a
    judge's record of steps of the step classes exactly (`exact_steps`: checked where a
    record is first made). The new steps are checked to be so too, so that the record the
    judge makes of `steps` is; the earlier ones cost a list comparison (`same_start`)."""
    size = len(earlier)
    return size < len(steps) and exact_steps(steps[size:]) and same_start(earlier, steps)


class HistoryMemo:
    """Prepared histories of recent turns, keyed by the identity of their step objects and
    the flags the caller derived from the whole conversation (`shape`). A history that is a
    recent one with new steps after it (the conversation's next turn) is prepared from that
    one by the caller's `extend`, so a turn costs what it adds."""

    def __init__(self, max_entries: int = 64) -> None:
        self._lru: Lru[tuple[tuple[object, ...], Hashable, PreparedHistory]] = Lru(max_entries)
        self._latest: Lru[Hashable] = Lru(4 * max_entries)
        """The key of the latest history by its last step's id: the next turn's history grows
        from it (the entry itself stays in `_lru` alone, which bounds what is held)."""

    def get(
        self,
        steps: Sequence[object],
        shape: Hashable,
        prepare: Callable[[], PreparedHistory],
        extend: Callable[[PreparedHistory, Hashable], PreparedHistory | None] | None = None,
    ) -> PreparedHistory:
        key = (shape, len(steps), id(steps[0]) if steps else 0, id(steps[-1]) if steps else 0)
        found = self._lru.get(key)
        if found is not None and len(found[0]) == len(steps) and all(map(operator.is_, found[0], steps)):
            return found[2]
        prepared = None
        if extend is not None and steps:
            base = self._prefix_of(steps)
            if base is not None:
                prepared = extend(base[2], base[1])
        if prepared is None:
            prepared = prepare()
        self._lru.put(key, (tuple(steps), shape, prepared), 1)
        if steps:
            self._latest.put(id(steps[-1]), key, 1)
        return prepared

    def _prefix_of(self, steps: Sequence[object]) -> tuple[tuple[object, ...], Hashable, PreparedHistory] | None:
        """The longest recent history whose steps are the first steps of `steps`: the one that
        ended where one of the last few new steps begins (the previous turn's), else found
        among the recent ones (the ends compared first, so only a likely one is compared whole)."""
        for end in range(len(steps) - 2, max(-1, len(steps) - 34), -1):
            key = self._latest.get(id(steps[end]))
            latest = self._lru.get(key) if key is not None else None
            if latest is not None and len(latest[0]) == end + 1 and all(map(operator.is_, latest[0], steps)):
                return latest
        candidates = [
            entry
            for entry in self._lru.values()
            if 0 < len(entry[0]) < len(steps) and entry[0][0] is steps[0] and entry[0][-1] is steps[len(entry[0]) - 1]
        ]
        for entry in sorted(candidates, key=lambda entry: len(entry[0]), reverse=True):
            if all(map(operator.is_, entry[0], steps)):
                return entry
        return None
