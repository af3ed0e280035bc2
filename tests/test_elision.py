"""The elision walk edited turn to turn (`elision`) against the walk made whole and against
`fit_blocks`, the reference, on arbitrary blocks: any ranks, flags and lengths, any blocks
replaced, any appended."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soda_guard.judges import chunked
from soda_guard.judges.context import Block, Omitted, fit_blocks, widest_marker
from soda_guard.judges.elision import Elision, Pieces, Walk
from soda_guard.judges.incremental import PreparedHistory
from thread_helpers import run_interleaved

PIECES = Pieces(lambda block: f"<{block.role}:{block.text}>", lambda count: f"[{count} gone]", "".join, lambda parts, trailing: "".join(parts))
AFTER = Pieces(
    lambda block: (block.role, block.text),
    lambda count: "",
    lambda pieces: [piece for piece in pieces if piece],
    lambda parts, trailing: ([piece for part in parts for piece in part], trailing),
    lambda block, count: (block.role, f"[{count} gone]" + block.text),
)
"""Pieces that put a run's marker on the next message (Qwen3Guard-Gen's way), a run that ends
the history told apart."""
ITEMS = Pieces(lambda block: block, Omitted, lambda pieces: [piece for piece in pieces if piece != ""], lambda parts, trailing: [piece for part in parts for piece in part])
"""The history's items themselves, blocks and markers, as `fit_blocks` returns them."""
WIDTH = widest_marker(40, 2)


@pytest.fixture(autouse=True, scope="module", params=[0, 2, chunked.SHIFT], ids=lambda shift: f"chunks-of-{1 << shift}")
def chunk_width(request: pytest.FixtureRequest):
    """Blocks and elisions in chunks of one and four too, so that the examples' edits and
    appends cross chunks (the histories here are a few dozen blocks long at most)."""
    default = chunked.SHIFT
    chunked.SHIFT = request.param
    yield
    chunked.SHIFT = default


def _overhead(block: Block) -> int:
    return len(block.role) + 5


_BLOCK = st.builds(
    Block,
    role=st.sampled_from(["USER", "ASSISTANT", "TOOL"]),
    text=st.sampled_from(["", "a", "ok", "x" * 30, "y" * 60, "z" * 200]),
    protected=st.booleans(),
    rank=st.integers(0, 2),
    shown=st.booleans(),
)


def _start(blocks: list[Block]) -> int:
    gaps = sum(1 for index, block in enumerate(blocks) if not block.shown and (index == 0 or blocks[index - 1].shown))
    return sum(_overhead(block) + len(block.text) for block in blocks if block.shown) + gaps * WIDTH


def _marker_on_next(items: list) -> tuple[list[tuple[str, str]], int]:
    messages, waiting = [], 0
    for item in items:
        if isinstance(item, Block):
            messages.append((item.role, (f"[{waiting} gone]" if waiting else "") + item.text))
            waiting = 0
        else:
            waiting = item.count
    return messages, waiting


def _shown(elision: Elision) -> tuple[object, ...]:
    """What an elision says: the ends of a run are read at its ends alone."""
    gone, ends, pieces = (list(itertools.chain.from_iterable(chunks)) for chunks in (elision.gone, elision.ends, elision.pieces))
    assert len(gone) == len(ends) == len(pieces) == elision.size
    assert all(len(chunk) == 1 << elision.shift for chunk in elision.pieces[:-1])
    bounds = {index: ends[index] for index, left in enumerate(gone) if left and (index == 0 or not gone[index - 1] or index + 1 == len(gone) or not gone[index + 1])}
    return elision.cut, gone, pieces, bounds, elision.rendering()


def _plain(walk: Walk) -> list[tuple[int, list[int], list[int], list[int], list[int]]]:
    return [(rank, part.indexes[: part.count], part.drops[: part.count], part.sums[: part.count + 1], part.peaks[: part.count + 1]) for rank, part in walk.ranks]


@settings(max_examples=400, deadline=None)
@given(before=st.lists(_BLOCK, max_size=30), data=st.data())
def test_a_continued_walk_is_the_walk_made_whole(before: list[Block], data: st.DataObject) -> None:
    """Replace any blocks (shown as before) and append any: the walk edited from the earlier
    one equals the walk made from the whole list, and the entries it says keep their places
    do. The earlier walk reads as it did (a continued rank may share its lists), and so does
    the first continuation after another is grown from the same walk (two turns from one)."""

    def grown() -> tuple[list[Block], set[int]]:
        changed = data.draw(st.sets(st.integers(0, len(before) - 1), max_size=4)) if before and data.draw(st.booleans()) else set()
        after = list(before)
        for index in changed:
            after[index] = data.draw(_BLOCK.map(lambda block, shown=before[index].shown: Block(block.role, block.text, block.protected, block.rank, shown=shown)))
        return after + data.draw(st.lists(_BLOCK, max_size=6)), changed

    earlier = Walk.made(before, _start(before), WIDTH, _overhead)
    was = _plain(earlier)
    after, changed = grown()
    continued, kept = earlier.continued(before, after, changed, _start(after), _overhead)
    assert _plain(continued) == _plain(Walk.made(after, _start(after), WIDTH, _overhead))
    assert continued.start == _start(after)
    now = {rank: part.indexes[: part.count] for rank, part in continued.ranks}
    for rank, part in earlier.ranks:
        assert now.get(rank, [])[: kept[rank]] == part.indexes[: kept[rank]]
    assert _plain(earlier) == was
    other, changed = grown()
    forked, _ = earlier.continued(before, other, changed, _start(other), _overhead)
    assert _plain(forked) == _plain(Walk.made(other, _start(other), WIDTH, _overhead))
    assert _plain(continued) == _plain(Walk.made(after, _start(after), WIDTH, _overhead))
    assert _plain(earlier) == was


@pytest.mark.parametrize("pieces", [PIECES, AFTER], ids=["marker-in-place", "marker-on-next"])
@settings(max_examples=300, deadline=None)
@given(blocks=st.lists(_BLOCK, max_size=30), data=st.data())
def test_pieces_edited_from_fewer_removals_are_the_pieces_made_whole(pieces: Pieces, blocks: list[Block], data: st.DataObject) -> None:
    """After more removals, and with blocks appended where the walk's first removals stay
    the same: the pieces edited from an earlier state are those made from the whole list."""
    walk = Walk.made(blocks, _start(blocks), WIDTH, _overhead)
    total = sum(part.count for _, part in walk.ranks)
    fewer = data.draw(st.integers(0, total))
    more = data.draw(st.integers(fewer, total))
    made = Elision.made(blocks, walk, more, pieces)
    first = Elision.made(blocks, walk, fewer, pieces)
    was = _shown(first)
    assert _shown(first.following(blocks, walk, walk.cut(more))) == _shown(made)
    assert _shown(first) == was  # a later state shares the chunks it does not edit, edits none
    appended = data.draw(st.lists(_BLOCK.map(lambda block: Block(block.role, block.text, block.protected, block.rank)), max_size=4))
    grown = [*blocks, *appended]
    later, kept = walk.continued(blocks, grown, (), _start(grown), _overhead)
    earlier = Elision.made(blocks, walk, fewer, pieces)
    most = data.draw(st.integers(0, sum(part.count for _, part in later.ranks)))
    if earlier.precedes(kept) and earlier.precedes(later.cut(most)):  # what `PreparedHistory` checks
        was = _shown(earlier)
        assert _shown(earlier.following(grown, later, later.cut(most))) == _shown(Elision.made(grown, later, most, pieces))
        assert _shown(earlier) == was


@settings(max_examples=400, deadline=None)
@given(blocks=st.lists(_BLOCK, min_size=1, max_size=30), room=st.integers(0, 1500), data=st.data())
def test_a_prepared_history_extended_turn_by_turn_fits_as_the_reference(blocks: list[Block], room: int, data: st.DataObject) -> None:
    """A prepared history extended turn by turn (blocks appended, earlier ones replaced, as an
    action that is no longer the action) reads as `fit_blocks` on the whole list (its items
    and its joined pieces, either way of placing a marker), at any budget and at one next to a
    length the walk reaches (where a removal that costs more than it saves may be passed over)."""
    tail = [Block("ASSISTANT", "call", protected=True, whole=True)]
    prepared = PreparedHistory(blocks[:1], 2, overhead=_overhead, marker_overhead=2, max_message_chars=50)
    current = blocks[:1]
    for end in range(1, len(blocks) + 1):
        if end > 1:
            changed = {
                index: data.draw(_BLOCK.map(lambda block, shown=current[index].shown: Block(block.role, block.text, block.protected, block.rank, shown=shown)))
                for index in data.draw(st.sets(st.integers(0, len(current) - 1), max_size=2))
            }
            current = [changed.get(index, block) for index, block in enumerate(current)] + blocks[len(current) : end]
            was = (list(prepared.blocks), list(prepared.clipped))
            extended = prepared.extended(changed, blocks[len(prepared.blocks) : end], end + 1)
            assert extended is not None
            assert (list(prepared.blocks), list(prepared.clipped)) == was  # shared, never edited
            prepared = extended
        walk = prepared.walk()
        lengths = [walk.start] + [walk.start - sum(part.sums[part.count] for _, part in walk.ranks[:at]) - sums for at, (_, part) in enumerate(walk.ranks) for sums in part.sums[: part.count + 1]]
        near = data.draw(st.sampled_from(lengths)) + data.draw(st.sampled_from([-1, 0, 1])) - sum(map(_overhead, tail)) - 4
        for limit in (room, near):
            stop = prepared.stop(tail, limit)
            try:
                reference = fit_blocks([*current, *tail], limit, overhead=_overhead, marker_overhead=2, max_message_chars=50)
            except ValueError:
                assert stop is None
                continue
            if stop is None:
                continue  # the kept blocks are clipped to a level: the caller runs `fit_blocks`
            removals, shown, truncated = stop
            assert [*prepared.joined(removals, ITEMS), *shown] == reference.items
            assert truncated == reference.truncated
            history = reference.items[:-1]
            assert prepared.joined(removals, PIECES) == "".join(PIECES.block(item) if isinstance(item, Block) else f"[{item.count} gone]" for item in history)
            assert prepared.joined(removals, AFTER) == _marker_on_next(history)


def test_threads_growing_one_walk_at_once_each_get_their_own() -> None:
    """Turns grown from one walk at once (an evaluation replaying a conversation's prefixes on
    threads): only one may extend a rank's lists in place, the others copy, and every walk,
    the earlier one included, reads as the walk made from its own blocks."""
    import random
    import threading

    rng = random.Random(7)
    before = [Block(rng.choice(["USER", "ASSISTANT", "TOOL"]), "x" * rng.randrange(0, 80), rank=rng.randrange(3)) for _ in range(300)]
    earlier = Walk.made(before, _start(before), WIDTH, _overhead)
    was = _plain(earlier)
    grown = [before + [Block("TOOL", "y" * (10 + 7 * thread + step), rank=(thread + step) % 3) for step in range(1 + thread % 4)] for thread in range(8)]
    results: dict[int, Walk] = {}
    start = threading.Barrier(len(grown))

    def grow(thread: int) -> None:
        start.wait()
        for _ in range(30):
            results[thread] = earlier.continued(before, grown[thread], (), _start(grown[thread]), _overhead)[0]

    run_interleaved([lambda thread=thread: grow(thread) for thread in range(len(grown))], 1e-6)
    for thread, after in enumerate(grown):
        assert _plain(results[thread]) == _plain(Walk.made(after, _start(after), WIDTH, _overhead))
    assert _plain(earlier) == was
