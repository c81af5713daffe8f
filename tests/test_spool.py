"""The spool's digests: what the commit names chunks by, holes included."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkfs import layout
from chunkfs.core.spool import Spool, extent_digests


@pytest.mark.parametrize("size", [1, 5, 6 * layout.BLOCK_SIZE + 7, 13 * layout.BLOCK_SIZE - 3])
async def test_spool_digests_name_each_chunk_and_its_blocks(tmp_path, size):
    # No zero bytes: a chunk of zeros is a hole, named by HOLE rather than its digest.
    content = os.urandom(size).replace(b"\0", b"\1")
    spool = Spool(str(tmp_path))
    try:
        spool.pwrite(0, content)
        exts = layout.extents(size)
        ids, blocks = await spool.digests(exts)
    finally:
        spool.close()
    for ext, chunk_id, block_digests in zip(exts, ids, blocks, strict=True):
        chunk = content[ext.offset : ext.end]
        expected = [
            hashlib.sha256(chunk[p : p + layout.BLOCK_SIZE]).digest()
            for p in range(0, len(chunk), layout.BLOCK_SIZE)
        ] or [hashlib.sha256(b"").digest()]
        if len(expected) == 1:  # one block or less: the SHA-256 of its bytes
            assert chunk_id == hashlib.sha256(chunk).digest() and block_digests is None
        else:  # more: the SHA-256 of its block digests, which are kept
            assert chunk_id == hashlib.sha256(b"".join(expected)).digest()
            assert block_digests == b"".join(expected)
        assert layout.id_matches(chunk_id, chunk)


async def test_extents_of_zeros_are_holes_whether_written_or_never_written(tmp_path):
    size = 6 * 4 * layout.BLOCK_SIZE  # six chunks of 4 MiB
    spool = Spool(str(tmp_path))
    try:
        spool.truncate(size)  # chunks 0, 3 and 5 stay holes in the spool file
        spool.pwrite(4 * layout.BLOCK_SIZE + 5, b"x")  # chunk 1: one byte of data
        spool.pwrite(8 * layout.BLOCK_SIZE, bytes(4 * layout.BLOCK_SIZE))  # chunk 2: zeros
        spool.pwrite(17 * layout.BLOCK_SIZE - 1, b"y")  # chunk 4: its last byte
        assert not spool.has_data(0, 4 * layout.BLOCK_SIZE)
        assert spool.has_data(4 * layout.BLOCK_SIZE, 4 * layout.BLOCK_SIZE)
        ids, blocks = await spool.digests(layout.extents(size))
    finally:
        spool.close()
    holes = [i for i, chunk_id in enumerate(ids) if chunk_id == layout.HOLE]
    assert holes == [0, 2, 3, 5]
    assert all(blocks[i] is None for i in holes)
    one = bytearray(4 * layout.BLOCK_SIZE)
    one[5] = ord("x")
    assert ids[1] == layout.chunk_id_of(layout.block_digests(one))
    assert blocks[1] is not None and len(blocks[1]) == 4 * layout.DIGEST_SIZE


def test_short_reads_count_as_zeros():
    # A spool extended by truncate reads short past what was written.
    data = b"abc"

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    exts = layout.extents(12)
    ids, _ = extent_digests(read, exts)
    padded = data.ljust(12, b"\0")
    assert ids == [hashlib.sha256(padded[e.offset : e.end]).digest() for e in exts]


def test_the_file_digest_is_a_hash_list_of_size_and_chunk_ids():
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    assert layout.file_digest(2, [a, b]) == hashlib.sha256((2).to_bytes(8, "big") + a + b).digest()
    assert layout.file_digest(2, [a, b]) != layout.file_digest(2, [b, a])
    assert layout.file_digest(2, [a]) != layout.file_digest(3, [a])


def test_hole_blocks_are_found_without_reading(tmp_path):
    block = layout.BLOCK_SIZE
    spool = Spool(str(tmp_path))
    try:
        spool.truncate(10 * block + 7)
        spool.pwrite(3 * block + 5, b"x")
        spool.pwrite(7 * block, os.urandom(block + 1))  # blocks 7 and 8
        found = spool.hole_blocks(0, 10 * block + 7)
        # Only the blocks of data are left out; the short last block counts.
        assert found == [n * block for n in (0, 1, 2, 4, 5, 6, 9, 10)]
        assert spool.hole_blocks(4 * block, 6 * block) == [4 * block, 5 * block]
    finally:
        spool.close()


_KiB = 1 << 10
_op = st.tuples(
    st.sampled_from(["write", "truncate"]),
    st.integers(0, 600 * _KiB),
    st.integers(0, 200 * _KiB),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_op, max_size=12))
def test_a_spool_in_memory_holds_what_a_spool_file_holds(tmp_path_factory, ops):
    # The same writes and truncates, some crossing the memory bound, on a
    # spool that starts in memory and on a spool file: the same bytes, the
    # same digests, and no disk used while the content stays in memory.
    where = str(tmp_path_factory.mktemp("spools"))
    bound = 256 * _KiB
    memory, disk = Spool(where, memory_max=bound), Spool(where)
    size, moved = 0, False  # moved: the content grew past the bound once
    try:
        for kind, offset, length in ops:
            if kind == "write":
                data = os.urandom(length)
                memory.pwrite(offset, data)
                disk.pwrite(offset, data)
                size = max(size, offset + length) if length else size
                moved = moved or (length > 0 and offset + length > bound)
            else:
                memory.truncate(offset)
                disk.truncate(offset)
                size = offset
                moved = moved or offset > bound
            assert memory.pread(0, size + 1) == disk.pread(0, size + 1)
            if not moved:
                assert memory.disk_bytes() == 0
        exts = layout.extents(size)
        assert trio.run(memory.digests, exts) == trio.run(disk.digests, exts)
    finally:
        memory.close()
        disk.close()
