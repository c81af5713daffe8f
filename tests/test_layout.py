"""Cutting a file into six chunks."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkfs import layout


@given(st.integers(1, 1 << 44))
def test_six_contiguous_extents_tile_the_file(size):
    exts = layout.extents(size)
    assert [e.index for e in exts] == list(range(6))
    assert exts[0].offset == 0
    for a, b in itertools.pairwise(exts):
        assert b.offset == a.end
    assert exts[-1].end == size
    assert max(e.length for e in exts) - min(e.length for e in exts) <= 1


@pytest.mark.parametrize(
    "size, lengths",
    [(1, [1, 0, 0, 0, 0, 0]), (5, [1, 1, 1, 1, 1, 0]), (6, [1] * 6), (7, [2, 1, 1, 1, 1, 1])],
)
def test_small_files(size, lengths):
    assert [e.length for e in layout.extents(size)] == lengths


def test_empty_file_has_no_chunks():
    assert layout.extents(0) == []


def test_negative_size_is_refused():
    with pytest.raises(ValueError):
        layout.extents(-1)


def test_overlapping_skips_empty_and_disjoint_extents():
    exts = layout.extents(7)  # lengths 2,1,1,1,1,1
    assert [e.index for e in layout.overlapping(exts, 0, 1)] == [0]
    assert [e.index for e in layout.overlapping(exts, 1, 4)] == [0, 1, 2]
    assert layout.overlapping(layout.extents(1), 0, 1) == [layout.extents(1)[0]]
