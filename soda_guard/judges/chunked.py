"""Lists that a conversation's turns share: a new turn's version copies what it changes.

A prepared history's blocks and its elisions are lists as long as the conversation, kept
unchanged for any call still rendering the earlier turn (a turn's other calls, an evaluation
replaying a conversation's prefixes at once). Copied whole at every turn, they made the first
call of a turn past the judge's budget linear in the conversation's length: each copy touches
every item's reference count, on the cold cache a turn's first call runs on. Held in chunks of
`1 << SHIFT` items, a version that edits a few items and appends a few copies the directory
of chunks (one entry per chunk) and the chunks it changes, and shares the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar, overload

T = TypeVar("T")

SHIFT = 6
"""Items per chunk, as a power of two: what a version copies is the directory (the list's
length over `1 << SHIFT`) and `1 << SHIFT` items per chunk it changes."""


def chunks(items: Sequence[T]) -> list[list[T]]:
    """`items` in chunks of `1 << SHIFT`."""
    width = 1 << SHIFT
    return [list(items[start : start + width]) for start in range(0, len(items), width)]


def append_to_chunks(chunks: list[list[T]], size: int, added: list[T], shift: int) -> None:
    """Append `added` to the `size` items held in `chunks` of `1 << shift`: the last chunk
    filled, then new ones. `chunks` and its last chunk must be the caller's own copies."""
    start = -size & ((1 << shift) - 1)  # room left in the last chunk
    if start:
        chunks[-1] += added[:start]
    if start < len(added):
        chunks += [added[at : at + (1 << shift)] for at in range(start, len(added), 1 << shift)]


class Chunked(Sequence[T]):
    """A list never edited once made; `edited` makes a new version sharing every chunk it
    does not change."""

    __slots__ = ("chunks", "size", "shift")

    def __init__(self, items: Sequence[T] = ()) -> None:
        self.chunks, self.size, self.shift = chunks(items), len(items), SHIFT

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step != 1:
                return list(self)[index]
            return self._items(start, stop)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.chunks[index >> self.shift][index & ((1 << self.shift) - 1)]

    def __iter__(self) -> Iterator[T]:
        return itertools.chain.from_iterable(self.chunks)

    def tail(self, start: int) -> list[T]:
        """The items from `start` (within the list) on: `self[start:]` without a slice's parsing."""
        return self._items(start, self.size)

    def _items(self, start: int, stop: int) -> list[T]:
        """The items from `start` to `stop` (both within the list), reading only their chunks."""
        if start >= stop:
            return []
        shift, mask = self.shift, (1 << self.shift) - 1
        first, last = start >> shift, (stop - 1) >> shift
        if first == last:
            return self.chunks[first][start & mask : ((stop - 1) & mask) + 1]
        found = self.chunks[first][start & mask :]
        for chunk in self.chunks[first + 1 : last]:
            found += chunk
        found += self.chunks[last][: ((stop - 1) & mask) + 1]
        return found

    def edited(self, changes: Mapping[int, T], appended: Iterable[T] = ()) -> Chunked[T]:
        """This list with the items at `changes`' indexes (each within it) replaced, then `appended`."""
        shift, mask = self.shift, (1 << self.shift) - 1
        chunks, size = self.chunks[:], self.size
        copied: set[int] = set()
        for index, item in changes.items():
            number = index >> shift
            if number not in copied:
                copied.add(number)
                chunks[number] = chunks[number][:]
            chunks[number][index & mask] = item
        added = appended if isinstance(appended, list) else list(appended)
        if added:
            if size & mask and len(chunks) - 1 not in copied:
                chunks[-1] = chunks[-1][:]
            append_to_chunks(chunks, size, added, shift)
        made = object.__new__(Chunked)
        made.chunks, made.size, made.shift = chunks, size + len(added), shift
        return made
