"""`Chunked`, the blocks a conversation's turns share, against plain lists: every version reads
as the list it stands for, and making a new one never changes an older one (which a call still
rendering the earlier turn reads)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soda_guard.judges import chunked
from soda_guard.judges.chunked import Chunked


@pytest.fixture(autouse=True, scope="module", params=[0, 1, 2, chunked.SHIFT], ids=lambda shift: f"chunks-of-{1 << shift}")
def chunk_width(request: pytest.FixtureRequest):
    default = chunked.SHIFT
    chunked.SHIFT = request.param
    yield
    chunked.SHIFT = default


def _reads_as(made: Chunked[int], expected: list[int]) -> None:
    assert list(made) == expected and len(made) == len(expected)
    assert [made[index] for index in range(-len(expected), len(expected))] == expected + expected
    for index in (len(expected), -len(expected) - 1):
        with pytest.raises(IndexError):
            made[index]


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.integers(), max_size=40), data=st.data())
def test_versions_read_as_their_lists_and_leave_older_ones_alone(items: list[int], data: st.DataObject) -> None:
    base = Chunked(items)
    _reads_as(base, items)
    start, stop = data.draw(st.integers(-45, 45)), data.draw(st.integers(-45, 45))
    assert base[start:stop] == items[start:stop] and base[start:] == items[start:] and base[::2] == items[::2]
    versions = [(base, items)]
    for _ in range(data.draw(st.integers(1, 4))):
        earlier, expected = versions[data.draw(st.integers(0, len(versions) - 1))]  # any version grows, more than once too
        changes = data.draw(st.dictionaries(st.integers(0, len(expected) - 1), st.integers(), max_size=6)) if expected else {}
        appended = data.draw(st.lists(st.integers(), max_size=10))
        versions.append((earlier.edited(changes, appended), [changes.get(index, item) for index, item in enumerate(expected)] + appended))
    for made, expected in versions:
        _reads_as(made, expected)
