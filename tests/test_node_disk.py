"""Tests of chunkfs.node.disk: chunk files on a real directory (tmp_path)."""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from chunkfs import layout
from chunkfs.errors import (
    ChunkfsError,
    ChunkMissing,
    ConfigError,
    DigestMismatch,
    InvalidArgument,
    NodeFull,
)
from chunkfs.node.disk import (
    DIRECT_MIN,
    PIECE_SIZE,
    READ_PIECE_SIZE,
    ChunkDisk,
    DeleteRefused,
    LengthMismatch,
)
from chunkfs.wire import BatchEntry


def cid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await trio.lowlevel.checkpoint()


async def put(disk: ChunkDisk, data: bytes, chunk_id: str | None = None) -> bool:
    return await disk.put(chunk_id or cid(data), pieces(data), len(data))


async def read(disk: ChunkDisk, chunk_id: str) -> bytes:
    """A whole chunk, read as the node's GET reads it."""
    f = await disk.open_chunk(chunk_id)
    try:
        return await f.read(0, f.size)
    finally:
        f.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def chunk_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "chunks").glob("*/*"))


async def test_open_creates_private_layout_and_node_id(tmp_path: Path) -> None:
    root = tmp_path / "data"
    disk = await ChunkDisk.open(root)
    assert mode(root) == 0o700
    assert mode(root / "chunks") == 0o700 and mode(root / "tmp") == 0o700
    assert len(list((root / "chunks").iterdir())) == 256
    assert len(disk.node_id) == 16 and int(disk.node_id, 16) >= 0
    assert disk.node_id == disk.node_id.lower()
    assert (root / "node_id").read_text().strip() == disk.node_id


async def test_reopen_keeps_node_id_and_counts_chunks(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    blobs = [os.urandom(n) for n in (0, 1, 1000, 70000)]
    for b in blobs:
        await put(disk, b)
    disk.close()
    again = await ChunkDisk.open(tmp_path)
    assert again.node_id == disk.node_id
    assert again.chunk_count == 4
    assert again.used_bytes == sum(len(b) for b in blobs)


async def test_corrupt_node_id_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("not-an-id\n")
    with pytest.raises(ChunkfsError, match="node id"):
        await ChunkDisk.open(tmp_path)


async def test_open_empties_tmp(tmp_path: Path) -> None:
    (await ChunkDisk.open(tmp_path)).close()
    leftover = tmp_path / "tmp" / ("ab" * 32 + ".deadbeef")
    leftover.write_bytes(b"half an upload")
    await ChunkDisk.open(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_directory_in_use_is_refused_and_its_uploads_kept(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    leftover = tmp_path / "tmp" / ("ab" * 32 + ".deadbeef")
    leftover.write_bytes(b"an upload in flight")
    with pytest.raises(ChunkfsError, match="in use by another node process"):
        await ChunkDisk.open(tmp_path)
    assert leftover.exists()  # the live node's upload was not touched
    disk.close()
    again = await ChunkDisk.open(tmp_path)
    assert again.node_id == disk.node_id
    again.close()


async def test_a_directory_belongs_to_the_first_cluster_that_claims_it(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    await disk.claim("a" * 32)
    await disk.claim("a" * 32)  # the same cluster, again: fine
    with pytest.raises(ConfigError, match=r"belongs to cluster a{32}, not to"):
        await disk.claim("b" * 32)
    assert (tmp_path / "cluster_id").read_text().strip() == "a" * 32
    disk.close()


async def test_put_creates_0600_file_in_fanout_dir(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = os.urandom(5000)
    assert await put(disk, data) is True
    path = tmp_path / "chunks" / cid(data)[:2] / cid(data)
    assert path.read_bytes() == data
    assert mode(path) == 0o600
    assert (disk.chunk_count, disk.used_bytes) == (1, 5000)
    assert list((tmp_path / "tmp").iterdir()) == []


# Below DIRECT_MIN the file is written buffered; from it on with O_DIRECT,
# through an aligned buffer, with and without an unaligned tail.
@pytest.mark.parametrize("size", [3 * PIECE_SIZE + 12345, DIRECT_MIN, DIRECT_MIN + 12345])
async def test_put_streams_large_body_in_pieces(tmp_path: Path, size: int) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = os.urandom(size)
    assert await disk.put(cid(data), pieces(data, 7777), len(data)) is True
    assert await read(disk, cid(data)) == data


def hash_list_id(data: bytes) -> str:
    return layout.chunk_id_of(layout.block_digests(data)).hex()


@pytest.mark.parametrize("size", [3 * PIECE_SIZE + 12345, DIRECT_MIN + 12345])
async def test_a_large_chunk_is_named_by_its_block_digests_or_as_before(
    tmp_path: Path, size: int
) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = os.urandom(size)
    assert hash_list_id(data) != cid(data)  # the two forms differ past one block
    assert await disk.put(hash_list_id(data), pieces(data, 7777), len(data)) is True
    assert await read(disk, hash_list_id(data)) == data
    # Chunks committed before hash lists keep their ids: those are accepted too.
    assert await disk.put(cid(data), pieces(data, 7777), len(data)) is True
    # Again, now as existing chunks (checked without being stored).
    assert await disk.put(hash_list_id(data), pieces(data), len(data)) is False
    assert await disk.put(cid(data), pieces(data), len(data)) is False
    # Neither form of another content's id is.
    other = os.urandom(size)
    for wrong in (hash_list_id(other), cid(other)):
        with pytest.raises(DigestMismatch):
            await disk.put(wrong, pieces(data), len(data))
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_put_existing_keeps_file_and_moves_mtime(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"same bytes"
    await put(disk, data)
    path = disk.path(cid(data))
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    inode = path.stat().st_ino
    assert await put(disk, data) is False
    st = path.stat()
    assert st.st_ino == inode  # not rewritten
    assert st.st_mtime_ns > old + 3000 * 10**9
    assert (disk.chunk_count, disk.used_bytes) == (1, len(data))


async def test_put_existing_still_checks_digest(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"original"
    await put(disk, data)
    with pytest.raises(DigestMismatch):
        await disk.put(cid(data), pieces(b"imposter"), 8)
    assert await read(disk, cid(data)) == data


async def test_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    with pytest.raises(DigestMismatch):
        await disk.put(cid(b"expected"), pieces(b"something else"), 14)
    assert chunk_files(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert (disk.chunk_count, disk.used_bytes) == (0, 0)


@pytest.mark.parametrize(
    "data, declared",
    [
        (b"ten bytes!", 3),
        (b"ten bytes!", 20),
        (bytes(DIRECT_MIN), DIRECT_MIN + 1),
    ],
)
async def test_length_mismatch_stores_nothing(tmp_path: Path, data: bytes, declared: int) -> None:
    disk = await ChunkDisk.open(tmp_path)
    with pytest.raises(LengthMismatch) as info:
        await disk.put(cid(data), pieces(data, 65536), declared)
    assert info.value.expected == declared
    assert chunk_files(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert disk.chunk_count == 0


@pytest.mark.parametrize("bad", ["../../node_id", "AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, ""])
async def test_malformed_ids_are_refused(tmp_path: Path, bad: str) -> None:
    disk = await ChunkDisk.open(tmp_path)
    with pytest.raises(InvalidArgument):
        await disk.put(bad, pieces(b"x"), 1)
    with pytest.raises(InvalidArgument):
        await disk.open_chunk(bad)
    with pytest.raises(InvalidArgument):
        await disk.delete(bad)


async def test_read_ranges(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = os.urandom(2 * READ_PIECE_SIZE + 99)
    await put(disk, data)
    c = cid(data)
    f = await disk.open_chunk(c)
    assert f.size == len(data)
    assert await f.read(10, 20) == data[10:20]
    assert await f.read(len(data) - 5, len(data) + 5) == data[-5:]  # fewer past the end
    got = [piece async for piece in f.iter_range(7, len(data) - 7)]
    assert len(got) == 3 and all(len(p) <= READ_PIECE_SIZE for p in got)
    assert b"".join(got) == data[7:-7]
    assert await disk.size(c) == len(data)


async def test_read_missing_chunk(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    with pytest.raises(ChunkMissing):
        await disk.open_chunk("00" * 32)
    assert await disk.size("00" * 32) is None


async def test_open_chunk_survives_delete(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"read me while gc runs"
    await put(disk, data)
    f = await disk.open_chunk(cid(data))
    await disk.delete(cid(data))
    assert await f.read(0, f.size) == data
    f.close()


async def test_delete_updates_counts_and_missing_raises(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"doomed"
    await put(disk, data)
    await disk.delete(cid(data))
    assert chunk_files(tmp_path) == []
    assert (disk.chunk_count, disk.used_bytes) == (0, 0)
    with pytest.raises(ChunkMissing):
        await disk.delete(cid(data))


async def test_delete_before_ns_guard(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"guarded"
    await put(disk, data)
    written = disk.path(cid(data)).stat().st_mtime_ns
    with pytest.raises(DeleteRefused):
        await disk.delete(cid(data), before_ns=written)  # not strictly older
    assert await disk.size(cid(data)) == len(data)
    await disk.delete(cid(data), before_ns=written + 1)
    assert await disk.size(cid(data)) is None


async def test_reuse_after_gc_decision_refuses_delete(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = b"old but wanted again"
    await put(disk, data)
    old = time.time_ns() - 10**9
    os.utime(disk.path(cid(data)), ns=(old, old))
    decided = time.time_ns()  # gc decides the chunk is garbage...
    assert await put(disk, data) is False  # ...then a writer re-uses it
    with pytest.raises(DeleteRefused):
        await disk.delete(cid(data), before_ns=decided)
    assert await read(disk, cid(data)) == data


async def test_list_ids_sorted_and_paged(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    ids = []
    for i in range(25):
        data = f"chunk {i}".encode()
        await put(disk, data)
        ids.append(cid(data))
    ids.sort()
    assert await disk.list_ids() == ids
    pages, after = [], None
    while True:
        page = await disk.list_ids(after, limit=7)
        pages.append(page)
        if len(page) < 7:
            break
        after = page[-1]
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert functools.reduce(operator.iadd, pages, []) == ids
    assert await disk.list_ids(ids[-1]) == []


async def test_capacity_cap_refuses_put(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path, capacity_bytes=100)
    await put(disk, os.urandom(60))
    with pytest.raises(NodeFull):
        await put(disk, os.urandom(60))
    assert disk.chunk_count == 1
    assert list((tmp_path / "tmp").iterdir()) == []
    stats = await disk.stats()
    assert (stats.capacity_bytes, stats.used_bytes, stats.free_bytes, stats.chunk_count) == (
        100,
        60,
        40,
        1,
    )


async def test_concurrent_puts_of_one_chunk_count_once(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    data = os.urandom(200_000)
    results: list[bool] = []

    async def one() -> None:
        results.append(await put(disk, data))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert sorted(results) == [False] * 4 + [True]
    assert (disk.chunk_count, disk.used_bytes) == (1, len(data))
    assert chunk_files(tmp_path) == [cid(data)]


async def test_put_many_stores_all_and_reports_created(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    await put(disk, b"b")
    entries = [BatchEntry(cid(x), x) for x in (b"a", b"b", b"c", b"a")]
    assert await disk.put_many(entries) == [True, False, True, False]
    assert chunk_files(tmp_path) == sorted({cid(b"a"), cid(b"b"), cid(b"c")})
    assert (disk.chunk_count, disk.used_bytes) == (3, 3)
    for path in (tmp_path / "chunks").glob("*/*"):
        assert mode(path) == 0o600


async def test_put_many_with_one_bad_digest_stores_none(tmp_path: Path) -> None:
    disk = await ChunkDisk.open(tmp_path)
    entries = [
        BatchEntry(cid(b"good"), b"good"),
        BatchEntry(cid(b"bad"), b"BAD"),
        BatchEntry(cid(b"fine"), b"fine"),
    ]
    with pytest.raises(DigestMismatch):
        await disk.put_many(entries)
    assert chunk_files(tmp_path) == []
    assert disk.chunk_count == 0


async def test_a_chunk_that_no_longer_matches_its_id_is_quarantined_when_read_whole(
    tmp_path: Path,
) -> None:
    disk = await ChunkDisk.open(tmp_path)
    good, bad = b"good chunk", b"chunk whose file will rot"
    await put(disk, good)
    await put(disk, bad)
    disk.path(cid(bad)).write_bytes(b"chunk whose file will r0t")  # bit rot on disk
    assert await disk.read_many([cid(good), cid(bad)], 1 << 20) == [good, None]
    assert chunk_files(tmp_path) == [cid(good)]
    assert (tmp_path / "quarantine" / cid(bad)).exists()
    assert (disk.chunk_count, disk.used_bytes) == (1, len(good))
    assert await disk.list_ids() == [cid(good)]
    with pytest.raises(ChunkMissing):
        await disk.open_chunk(cid(bad))
