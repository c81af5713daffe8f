"""The spool's digests: what the commit names chunks and versions by."""

from __future__ import annotations

import hashlib
import os

import pytest

from chunkfs import layout
from chunkfs.core.spool import Spool, extent_digests, sha256_of


@pytest.mark.parametrize("size", [1, 5, 6 * layout.BLOCK_SIZE + 7, 13 * layout.BLOCK_SIZE - 3])
async def test_spool_digests_name_each_chunk_its_blocks_and_the_whole(tmp_path, size):
    content = os.urandom(size)
    spool = Spool(str(tmp_path))
    try:
        spool.pwrite(0, content)
        exts = layout.extents(size)
        ids, blocks, whole = await spool.digests(exts)
    finally:
        spool.close()
    assert whole == hashlib.sha256(content).digest()
    for ext, chunk_id, block_digests in zip(exts, ids, blocks, strict=True):
        chunk = content[ext.offset : ext.end]
        assert chunk_id == hashlib.sha256(chunk).digest()
        expected = [
            hashlib.sha256(chunk[p : p + layout.BLOCK_SIZE]).digest()
            for p in range(0, len(chunk), layout.BLOCK_SIZE)
        ]
        assert block_digests == (b"".join(expected) if len(expected) > 1 else None)


def test_short_reads_count_as_zeros():
    # A spool extended by truncate reads short past what was written.
    data = b"abc"

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    exts = layout.extents(12)
    ids, _ = extent_digests(read, exts)
    padded = data.ljust(12, b"\0")
    assert ids == [hashlib.sha256(padded[e.offset : e.end]).digest() for e in exts]
    assert sha256_of(read, 12) == hashlib.sha256(padded).digest()
