"""Cutting a file into six chunks."""

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkfs import layout


@given(st.integers(1, 1 << 44))
def test_six_contiguous_extents_tile_the_file_at_multiples_of_a_power_of_two(size):
    exts = layout.extents(size)
    u = layout.unit(size)
    assert [e.index for e in exts] == list(range(6))
    assert exts[0].offset == 0
    for a, b in itertools.pairwise(exts):
        assert b.offset == a.end
    assert exts[-1].end == size
    assert u >= layout.MIN_UNIT and u & (u - 1) == 0
    assert 6 * u >= size and (u == layout.MIN_UNIT or 6 * (u // 2) < size)  # the smallest
    for e in exts:
        assert e.offset == min(e.index * u, size) and e.length <= u
    if size > 3 << 20:
        assert all(e.offset % layout.BLOCK_SIZE == 0 for e in exts if e.length)


@given(st.integers(1, 1 << 40), st.integers(1, 1 << 30))
def test_growing_a_file_keeps_the_boundaries_until_a_power_of_two(size, grow):
    before, after = layout.extents(size), layout.extents(size + grow)
    if layout.unit(size) == layout.unit(size + grow):
        # Every full chunk before the append is unchanged by it.
        full = [e for e in before if e.length == layout.unit(size)]
        assert all(after[e.index] == e for e in full)


@pytest.mark.parametrize(
    "size, lengths",
    [
        (1, [1, 0, 0, 0, 0, 0]),
        (4096, [4096, 0, 0, 0, 0, 0]),
        (4097, [4096, 1, 0, 0, 0, 0]),
        (6 * 4096, [4096] * 6),
        (6 * 4096 + 1, [8192, 8192, 8192, 1, 0, 0]),
        (1 << 30, [1 << 28] * 4 + [0, 0]),
    ],
)
def test_small_and_round_sizes(size, lengths):
    assert [e.length for e in layout.extents(size)] == lengths


def test_empty_file_has_no_chunks():
    assert layout.extents(0) == []


def test_negative_size_is_refused():
    with pytest.raises(ValueError):
        layout.extents(-1)


def test_overlapping_skips_empty_and_disjoint_extents():
    exts = layout.extents(6 * 4096 + 1)  # lengths 8192, 8192, 8192, 1, 0, 0
    assert [e.index for e in layout.overlapping(exts, 0, 1)] == [0]
    assert [e.index for e in layout.overlapping(exts, 8000, 16385)] == [0, 1, 2]
    assert [e.index for e in layout.overlapping(exts, 24576, 1 << 20)] == [3]
    assert layout.overlapping(layout.extents(1), 0, 1) == [layout.extents(1)[0]]


@given(
    size=st.integers(0, 3 * layout.BLOCK_SIZE + 5),
    cuts=st.lists(st.integers(0, 3 * layout.BLOCK_SIZE + 5), max_size=8),
)
def test_block_digests_do_not_depend_on_how_the_bytes_arrive(size, cuts):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    hasher = layout.BlockHasher()
    edges = sorted({0, size, *(c for c in cuts if c <= size)})
    for a, b in itertools.pairwise(edges):
        hasher.update(data[a:b])
    expected = [
        hashlib.sha256(data[p : p + layout.BLOCK_SIZE]).digest()
        for p in range(0, size, layout.BLOCK_SIZE)
    ] or [hashlib.sha256(b"").digest()]
    assert hasher.digests() == layout.block_digests(data) == expected
    chunk_id = layout.chunk_id_of(expected)
    assert layout.id_matches(chunk_id, data)
    assert layout.id_matches(hashlib.sha256(data).digest(), data)  # the older form
    assert not layout.id_matches(chunk_id, data + b"x")
