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
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from soda_guard.judges import chunked
from soda_guard.judges.chunked import Chunked, append_to_chunks
from soda_guard.judges.context import Block

P = TypeVar("P")
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class Pieces(Generic[P, Q, R]):
    """A judge's rendering of a history as one piece per block: `block` a shown block's,
    `omitted` a run of `count` omitted messages' (at the run's first block; "" where the marker
    goes elsewhere), `after` a shown block's right after such a run (where the judge puts the
    marker on the next message; by default its `block` piece). `part` joins a chunk of
    consecutive pieces, "" left out of the count, and `join` the chunks' parts into the
    rendering, told the length of a run that ends the history (0 where none): a turn joins
    again only the chunks it changed. Compared by identity: one per judge kind."""

    block: Callable[[Block], P]
    omitted: Callable[[int], P | str]
    part: Callable[[list[P | str]], Q]
    join: Callable[[list[Q], int], R]
    after: Callable[[Block, int], P] | None = None

    def following(self, block: Block, count: int) -> P:
        """A shown block's piece after a run of `count` omitted messages (0: none)."""
        return self.after(block, count) if count and self.after is not None else self.block(block)


def _walked(block: Block) -> bool:
    return block.shown and not block.protected


_EXTENDING = threading.Lock()


def _extended(items: list[int], size: int, more: list[int]) -> list[int]:
    """`items[:size] + more`, as a list of which the caller reads only that much: `items`
    itself, extended in place, where no other version has extended it past `size` (each
    version reads only its own length, so appending leaves the others as they were); else a
    copy (two turns grown from one: the second copies)."""
    with _EXTENDING:
        if len(items) == size:
            items += more
            return items
    return [*items[:size], *more]


@dataclass(frozen=True)
class _Rank:
    """One rank's part of the walk: its `count` blocks' indexes, oldest first, what removing
    each takes off the prompt, the running sums of those drops (`sums[t]`: the first t) and
    their running maxima. The lists may run past this version's entries (a later turn's,
    appended in place): read only `indexes[:count]` and `sums[:count + 1]`. Never edited
    below that: an edit copies the lists."""

    indexes: list[int]
    drops: list[int]
    sums: list[int]
    peaks: list[int]
    count: int

    @classmethod
    def of(cls, indexes: list[int], drops: list[int], kept: int = 0, earlier: _Rank | None = None) -> _Rank:
        """The rank with these entries, of which the first `kept` are `earlier`'s."""
        if earlier is None or kept == 0:
            sums = list(itertools.accumulate(drops, initial=0))
            return cls(indexes, drops, sums, list(itertools.accumulate(sums, max)), len(indexes))
        sums, peaks = earlier._running(kept, drops[kept:])
        return cls(indexes, drops, earlier.sums[: kept + 1] + sums, earlier.peaks[: kept + 1] + peaks, len(indexes))

    def _running(self, kept: int, drops: list[int]) -> tuple[list[int], list[int]]:
        """The running sums and maxima of these drops after this rank's first `kept` entries."""
        sums = list(itertools.islice(itertools.accumulate(drops, initial=self.sums[kept]), 1, None))
        return sums, list(itertools.islice(itertools.accumulate(sums, max, initial=self.peaks[kept]), 1, None))

    def appended(self, indexes: list[int], drops: list[int]) -> _Rank:
        """This rank with entries after its last: its lists shared where they can be
        (`_extended`), so a turn that only appends costs what it appends."""
        count = self.count
        sums, peaks = self._running(count, drops)
        return _Rank(
            _extended(self.indexes, count, indexes),
            _extended(self.drops, count, drops),
            _extended(self.sums, count + 1, sums),
            _extended(self.peaks, count + 1, peaks),
            count + len(indexes),
        )


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
            count = rank.count
            if offset + rank.peaks[count] >= target:
                return before + bisect.bisect_left(rank.peaks, target - offset, 0, count + 1)
            offset += rank.sums[count]
            before += count
        return None

    def cut(self, removals: int) -> dict[int, int]:
        """How many of each rank's blocks the first `removals` steps remove (ranks untouched left out)."""
        cut = {}
        for rank, part in self.ranks:
            if removals <= 0:
                break
            cut[rank] = min(removals, part.count)
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
        looked at; a rank whose entries are only appended to (a conversation's next turn, where
        no old block's drop changes) shares its lists with this walk's. Also, for each rank, how
        many of its first entries keep their places."""
        size, count = len(before), len(after)
        touched = {near for index in changed for near in (index - 1, index, index + 1)}
        touched.update(range(size - 1, count))
        drop = _Drops(after, self.width, overhead)
        earlier = dict(self.ranks)
        kept = {rank: part.count for rank, part in self.ranks}
        appends: dict[int, tuple[list[int], list[int]]] = {}
        parts: dict[int, tuple[list[int], list[int]]] = {}
        edited: dict[int, int] = {}

        def lists(rank: int) -> tuple[list[int], list[int]]:
            """The rank's entries, copied to be edited (with any appended so far)."""
            if rank not in parts:
                part = earlier.get(rank)
                indexes, drops = (part.indexes[: part.count], part.drops[: part.count]) if part is not None else ([], [])
                more = appends.pop(rank, ([], []))
                parts[rank] = (indexes + more[0], drops + more[1])
                kept.setdefault(rank, 0)
                if more[0]:
                    edited[rank] = min(edited.get(rank, len(indexes)), len(indexes))
            return parts[rank]

        for index in sorted(near for near in touched if 0 <= near < count):
            old, new = before[index] if index < size else None, after[index]
            if old is not None and _walked(old):
                if _walked(new) and new.rank == old.rank and old.rank not in parts:
                    part = earlier[old.rank]
                    place = bisect.bisect_left(part.indexes, index, 0, part.count)
                    value = drop(index)
                    if part.drops[place] == value:
                        continue  # the same drop: nothing to edit
                    indexes, drops = lists(old.rank)
                    drops[place] = value
                    edited[old.rank] = min(edited.get(old.rank, place), place)
                    continue
                indexes, drops = lists(old.rank)
                place = bisect.bisect_left(indexes, index)
                edited[old.rank] = min(edited.get(old.rank, place), place)
                if _walked(new) and new.rank == old.rank:
                    drops[place] = drop(index)
                    continue
                del indexes[place], drops[place]
                kept[old.rank] = min(kept[old.rank], place)
            if _walked(new):
                rank, part = new.rank, earlier.get(new.rank)
                if rank not in parts and (part is None or not part.count or part.indexes[part.count - 1] < index):
                    more = appends.setdefault(rank, ([], []))
                    more[0].append(index)
                    more[1].append(drop(index))
                    kept.setdefault(rank, 0)
                    continue
                indexes, drops = lists(rank)
                place = bisect.bisect_left(indexes, index)
                indexes.insert(place, index)
                drops.insert(place, drop(index))
                edited[rank] = min(edited.get(rank, place), place)
                kept[rank] = min(kept[rank], place)
        ranks = []
        for rank in sorted(set(earlier) | set(parts) | set(appends)):
            part = earlier.get(rank)
            if rank in parts:
                if parts[rank][0]:
                    ranks.append((rank, _Rank.of(*parts[rank], edited.get(rank, 0), part)))
            elif rank in appends:
                ranks.append((rank, _Rank.of(*appends[rank]) if part is None else part.appended(*appends[rank])))
            else:
                ranks.append((rank, part))
        return Walk(tuple(ranks), start, self.width), kept


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
    blocks), for its `size` blocks: `gone` whether each block is left out; `ends`, for each run
    of left-out blocks, its other end at either end, so a removal that joins runs finds and
    rewrites the run's marker (carried by its first block, or by the block after it) without
    walking the run; `pieces` each block's piece ("" inside a run); each in chunks of
    `1 << shift` blocks, with `parts` each chunk's pieces joined. Never edited once made: a
    later stop copies the chunks it edits and shares the others."""

    cut: dict[int, int]
    pieces_of: Pieces
    size: int
    shift: int
    gone: list[list[bool]]
    ends: list[list[int]]
    pieces: list[list[object]]
    parts: list[object]

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
        pieces_chunks = chunked.chunks(texts)
        cut = walk.cut(removals) if walk is not None else {}
        return cls(cut, pieces, len(blocks), chunked.SHIFT, chunked.chunks(gone), chunked.chunks(ends), pieces_chunks, [pieces.part(chunk) for chunk in pieces_chunks])

    @property
    def removals(self) -> int:
        return sum(self.cut.values())

    def precedes(self, cut: dict[int, int]) -> bool:
        """Whether these removals are a part of `cut`'s (of a walk whose first entries are
        this one's)."""
        return all(count <= cut.get(rank, 0) for rank, count in self.cut.items())

    def rendering(self) -> object:
        """The judge's rendering (`Pieces.join`), told the length of a run that ends the history."""
        last, shift = self.size - 1, self.shift
        mask = (1 << shift) - 1
        ends_run = last >= 0 and self.gone[last >> shift][last & mask]
        return self.pieces_of.join(self.parts, self.size - self.ends[last >> shift][last & mask] if ends_run else 0)

    def following(self, blocks: Sequence[Block], walk: Walk | None, cut: dict[int, int], changed: Collection[int] = ()) -> Elision:
        """These pieces after the steps of `walk` that remove `cut` (`Walk.cut`; `walk` None
        and `cut` empty where nothing is removed), this being after a part of them, for
        `blocks`: this history's blocks, those at `changed` replaced (shown as before) and any
        more appended, all shown."""
        size, count = self.size, len(blocks)
        if cut == self.cut and size == count and not changed:
            return self
        shift, pieces = self.shift, self.pieces_of
        mask = (1 << shift) - 1
        gone, ends, texts = self.gone[:], self.ends[:], self.pieces[:]
        mine: set[int] = set()

        def own(index: int) -> int:
            """The number of the chunk holding `index`, copied for this version on its first edit."""
            number = index >> shift
            if number not in mine:
                mine.add(number)
                gone[number], ends[number], texts[number] = gone[number][:], ends[number][:], texts[number][:]
            return number

        def run_before(index: int) -> int:
            near = index - 1
            return index - ends[near >> shift][near & mask] if index > 0 and gone[near >> shift][near & mask] else 0

        for index in changed:
            if not gone[index >> shift][index & mask]:
                texts[own(index)][index & mask] = pieces.following(blocks[index], run_before(index))
        if count > size:
            new = blocks.tail(size) if isinstance(blocks, Chunked) else list(blocks[size:])
            added: list[object] = [pieces.following(new[0], run_before(size)), *map(pieces.block, new[1:])]
            if size & mask:
                own(size - 1)
            chunks_before = len(texts)
            append_to_chunks(gone, size, [False] * len(new), shift)
            append_to_chunks(ends, size, list(range(size, count)), shift)
            append_to_chunks(texts, size, added, shift)
            mine.update(range(chunks_before, len(texts)))
        if walk is not None:
            omitted, after = pieces.omitted, pieces.after
            last = count - 1
            for rank, part in walk.ranks:
                for index in part.indexes[self.cut.get(rank, 0) : cut.get(rank, 0)]:
                    number = own(index)
                    gone[number][index & mask] = True
                    near = index - 1
                    start = ends[near >> shift][near & mask] if index > 0 and gone[near >> shift][near & mask] else index
                    near = index + 1
                    end = ends[near >> shift][near & mask] if index < last and gone[near >> shift][near & mask] else index
                    ends[own(start)][start & mask] = end
                    ends[own(end)][end & mask] = start
                    texts[number][index & mask] = ""
                    if end > index:
                        texts[own(index + 1)][(index + 1) & mask] = ""
                    texts[own(start)][start & mask] = omitted(end - start + 1)
                    if after is not None and end < last:
                        texts[own(end + 1)][(end + 1) & mask] = after(blocks[end + 1], end - start + 1)
        parts = self.parts[:]
        parts += [None] * (len(texts) - len(parts))
        for number in mine:
            parts[number] = pieces.part(texts[number])
        return Elision(cut, pieces, count, shift, gone, ends, texts, parts)
