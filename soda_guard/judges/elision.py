"""`fit_blocks`'s elision walk, kept so that a conversation's next turn edits it.

`fit_blocks` removes unprotected, shown messages lowest rank first, oldest first within a rank,
until the prompt fits, and shows each run of left-out messages as one marker. Removing message
`i` takes its text and overhead off the prompt, adds a marker unless a neighbour is already left
out, and merges two markers into one when both are; whether a neighbour is gone before `i`
depends only on the two messages (their ranks and places, or the neighbour's not being shown
at all), never on how far the walk has gone. So what each removal takes off (its `drop`) is
fixed by the message and its neighbours, the prompt after k removals is the whole one less the
first k drops, and the walk is one list per rank, oldest first. A conversation's next turn
appends its messages to the end of their ranks' lists and changes the drops of their
neighbours alone: its walk is the previous turn's with a few entries edited, and so are the
pieces of its rendering (`Elision`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from soda_guard.judges.context import Block

P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class Pieces(Generic[P, R]):
    """A judge's rendering of a history as one piece per block: `block` a shown block's,
    `omitted` a run of `count` omitted messages' (at the run's first block; "" where the marker
    goes elsewhere), `after` a shown block's right after such a run (where the judge puts the
    marker on the next message; by default its `block` piece), and `join` the rendering from
    the pieces, "" left out of the count, and the length of a run that ends the history (0
    where none). Compared by identity: one per judge kind."""

    block: Callable[[Block], P]
    omitted: Callable[[int], P | str]
    join: Callable[[list[P | str], int], R]
    after: Callable[[Block, int], P] | None = None

    def following(self, block: Block, count: int) -> P:
        """A shown block's piece after a run of `count` omitted messages (0: none)."""
        return self.after(block, count) if count and self.after is not None else self.block(block)


def _walked(block: Block) -> bool:
    return block.shown and not block.protected


@dataclass(frozen=True)
class _Rank:
    """One rank's part of the walk: its blocks' indexes, oldest first, what removing each
    takes off the prompt, the running sums of those drops (`sums[t]`: the first t) and their
    running maxima. Never edited once made: an edit copies the lists."""

    indexes: list[int]
    drops: list[int]
    sums: list[int]
    peaks: list[int]

    @classmethod
    def of(cls, indexes: list[int], drops: list[int], kept: int = 0, earlier: _Rank | None = None) -> _Rank:
        """The rank with these entries, of which the first `kept` are `earlier`'s."""
        if earlier is None or kept == 0:
            sums = list(itertools.accumulate(drops, initial=0))
            return cls(indexes, drops, sums, list(itertools.accumulate(sums, max)))
        sums = earlier.sums[: kept + 1]
        sums += itertools.islice(itertools.accumulate(drops[kept:], initial=sums[kept]), 1, None)
        peaks = earlier.peaks[: kept + 1]
        peaks += itertools.islice(itertools.accumulate(sums[kept + 1 :], max, initial=peaks[kept]), 1, None)
        return cls(indexes, drops, sums, peaks)


@dataclass(frozen=True)
class Walk:
    """The walk over a history: its ranks in removal order, the prompt's length (tail
    excluded) with nothing removed, and what one marker costs."""

    ranks: tuple[tuple[int, _Rank], ...]
    start: int
    width: int

    @classmethod
    def made(cls, blocks: Sequence[Block], start: int, width: int, overhead: Callable[[Block], int]) -> Walk:
        """Made from the whole history: when it first overflows, or a marker's cost changed."""
        drop = _Drops(blocks, width, overhead)
        parts: dict[int, tuple[list[int], list[int]]] = {}
        for index, block in enumerate(blocks):
            if _walked(block):
                indexes, drops = parts.setdefault(block.rank, ([], []))
                indexes.append(index)
                drops.append(drop(index))
        return cls(tuple((rank, _Rank.of(*parts[rank])) for rank in sorted(parts)), start, width)

    def first_under(self, limit: int) -> int | None:
        """The fewest removals that bring the prompt within `limit` (0: it fits whole); None
        when even the whole walk does not."""
        target = self.start - limit
        if target <= 0:
            return 0
        offset = before = 0
        for _, rank in self.ranks:
            if offset + rank.peaks[-1] >= target:
                return before + bisect.bisect_left(rank.peaks, target - offset)
            offset += rank.sums[-1]
            before += len(rank.indexes)
        return None

    def cut(self, removals: int) -> dict[int, int]:
        """How many of each rank's blocks the first `removals` steps remove (ranks untouched left out)."""
        cut = {}
        for rank, part in self.ranks:
            if removals <= 0:
                break
            cut[rank] = min(removals, len(part.indexes))
            removals -= cut[rank]
        return cut

    def removed(self, removals: int) -> list[int]:
        """The indexes of the blocks the first `removals` steps remove."""
        cut = self.cut(removals)
        return [index for rank, part in self.ranks for index in part.indexes[: cut.get(rank, 0)]]

    def continued(self, before: Sequence[Block], after: Sequence[Block], changed: Collection[int], start: int, overhead: Callable[[Block], int]) -> tuple[Walk, dict[int, int]]:
        """This walk (of `before`) for `after`: `before` with the blocks at `changed`
        replaced and more blocks appended, its prompt `start` long with nothing removed, a
        marker costing the same. Only the changed and added blocks and their neighbours are
        looked at. Also, for each rank, how many of its first entries keep their places."""
        size, count = len(before), len(after)
        touched = {near for index in changed for near in (index - 1, index, index + 1)}
        touched.update(range(size - 1, count))
        drop = _Drops(after, self.width, overhead)
        parts = {rank: (part.indexes, part.drops) for rank, part in self.ranks}
        kept = {rank: len(part.indexes) for rank, part in self.ranks}
        edited: dict[int, int] = {}
        copied: set[int] = set()

        def lists(rank: int) -> tuple[list[int], list[int]]:
            if rank not in copied:
                copied.add(rank)
                indexes, drops = parts.get(rank, ([], []))
                parts[rank] = (indexes[:], drops[:])
                kept.setdefault(rank, 0)
            return parts[rank]

        for index in sorted(near for near in touched if 0 <= near < count):
            old, new = before[index] if index < size else None, after[index]
            if old is not None and _walked(old):
                indexes, drops = lists(old.rank)
                place = bisect.bisect_left(indexes, index)
                edited[old.rank] = min(edited.get(old.rank, place), place)
                if _walked(new) and new.rank == old.rank:
                    drops[place] = drop(index)
                    continue
                del indexes[place], drops[place]
                kept[old.rank] = min(kept[old.rank], place)
            if _walked(new):
                indexes, drops = lists(new.rank)
                place = bisect.bisect_left(indexes, index)
                indexes.insert(place, index)
                drops.insert(place, drop(index))
                edited[new.rank] = min(edited.get(new.rank, place), place)
                kept[new.rank] = min(kept[new.rank], place)
        earlier = dict(self.ranks)
        ranks = tuple(
            (rank, _Rank.of(*parts[rank], edited[rank], earlier.get(rank)) if rank in edited else earlier[rank])
            for rank in sorted(parts)
            if parts[rank][0]
        )
        return Walk(ranks, start, self.width), kept


class _Drops:
    """What removing a block takes off the prompt: its text and overhead, less a marker's cost
    when neither neighbour is gone before it, plus one when both are (their markers merge)."""

    def __init__(self, blocks: Sequence[Block], width: int, overhead: Callable[[Block], int]) -> None:
        self.blocks, self.width, self.overhead = blocks, width, overhead

    def _gone_before(self, near: int, block: Block, index: int) -> bool:
        if not 0 <= near < len(self.blocks):
            return False
        other = self.blocks[near]
        return not other.shown or (not other.protected and (other.rank, near) < (block.rank, index))

    def __call__(self, index: int) -> int:
        block = self.blocks[index]
        markers = 1 - self._gone_before(index - 1, block, index) - self._gone_before(index + 1, block, index)
        return self.overhead(block) + len(block.text) - markers * self.width


@dataclass(frozen=True)
class Elision:
    """A history's rendering as pieces after some removals (`cut`: how many of each rank's
    blocks): `gone` whether each block is left out; `ends`, for each run of left-out blocks,
    its other end at either end, so a removal that joins runs finds and rewrites the run's
    marker (carried by its first block, or by the block after it) without walking the run;
    `pieces` each block's piece ("" inside a run). Never edited once made: a later stop copies
    the lists."""

    cut: dict[int, int]
    pieces_of: Pieces
    gone: list[bool]
    ends: list[int]
    pieces: list[object]

    @classmethod
    def made(cls, blocks: Sequence[Block], walk: Walk | None, removals: int, pieces: Pieces) -> Elision:
        """Made whole; `walk` only where `removals` is not 0."""
        gone = [not block.shown for block in blocks]
        for index in walk.removed(removals) if walk is not None else ():
            gone[index] = True
        ends = list(range(len(blocks)))
        texts: list[object] = [""] * len(blocks)
        start = run = 0
        for index, block in enumerate(blocks):
            if not gone[index]:
                texts[index] = pieces.following(block, run)
                run = 0
                continue
            if index == 0 or not gone[index - 1]:
                start = index
            if index + 1 == len(blocks) or not gone[index + 1]:
                ends[start], ends[index] = index, start
                run = index - start + 1
                texts[start] = pieces.omitted(run)
        return cls(walk.cut(removals) if walk is not None else {}, pieces, gone, ends, texts)

    @property
    def removals(self) -> int:
        return sum(self.cut.values())

    def precedes(self, cut: dict[int, int]) -> bool:
        """Whether these removals are a part of `cut`'s (of a walk whose first entries are
        this one's)."""
        return all(count <= cut.get(rank, 0) for rank, count in self.cut.items())

    def rendering(self) -> object:
        """The judge's rendering (`Pieces.join`), told the length of a run that ends the history."""
        gone = self.gone
        return self.pieces_of.join(self.pieces, len(gone) - self.ends[-1] if gone and gone[-1] else 0)

    def following(self, blocks: Sequence[Block], walk: Walk | None, removals: int, changed: Collection[int] = ()) -> Elision:
        """These pieces after `removals` steps of `walk` (None where that is 0), this being
        after a part of them, for `blocks`: this history's blocks, those at `changed` replaced
        (shown as before) and any more appended, all shown."""
        cut = walk.cut(removals) if walk is not None else {}
        size = len(self.gone)
        if cut == self.cut and size == len(blocks) and not changed:
            return self
        gone, ends, texts, pieces = self.gone[:], self.ends[:], self.pieces[:], self.pieces_of

        def run_before(index: int) -> int:
            return index - ends[index - 1] if index > 0 and gone[index - 1] else 0

        for index in changed:
            if not gone[index]:
                texts[index] = pieces.following(blocks[index], run_before(index))
        if len(blocks) > size:
            texts.append(pieces.following(blocks[size], run_before(size)))
            texts += map(pieces.block, blocks[size + 1 :])
            gone += [False] * (len(blocks) - size)
            ends += range(size, len(blocks))
        if walk is None:
            return Elision(cut, pieces, gone, ends, texts)
        omitted, after = pieces.omitted, pieces.after
        last = len(gone) - 1
        for rank, part in walk.ranks:
            for index in part.indexes[self.cut.get(rank, 0) : cut.get(rank, 0)]:
                gone[index] = True
                start = ends[index - 1] if index > 0 and gone[index - 1] else index
                end = ends[index + 1] if index < last and gone[index + 1] else index
                ends[start], ends[end] = end, start
                texts[index] = ""
                if end > index:
                    texts[index + 1] = ""
                texts[start] = omitted(end - start + 1)
                if after is not None and end < last:
                    texts[end + 1] = after(blocks[end + 1], end - start + 1)
        return Elision(cut, pieces, gone, ends, texts)
