"""The filesystem core driven directly, as a front end other than FUSE would:
a real PostgreSQL and six real node processes, no kernel mount.

Each ``FileSystem`` here stands for one mount (its own spools and caches);
two of them on one cluster show what another mount sees.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import cluster as cl
from chunkfs import errors, layout, metrics
from chunkfs.admin import gc
from chunkfs.core import ROOT, Caller, FileSystem, open_filesystem
from chunkfs.core.fs import RENAME_EXCHANGE, RENAME_NOREPLACE
from chunkfs.meta import ROOT_INO, Attrs, Ino
from chunkfs.store import PROBE_INTERVAL_S, SEQUENTIAL_AFTER, ChunkStore

FILE = stat.S_IFREG | 0o644
MiB = 1 << 20
NOBODY = Caller(65534, 65534)


@pytest.fixture
async def pair(cluster: cl.Cluster, tmp_path: Path) -> AsyncIterator[tuple[FileSystem, FileSystem]]:
    """Two ``FileSystem``s on the cluster, each with spools and caches of its
    own as two mounts have (they share one connection pool: one event loop
    bridges to asyncio per trio run).
    """
    for name in ("fs", "other"):
        (tmp_path / name).mkdir()
    async with open_filesystem(cluster.dsn, str(tmp_path / "fs"), node_timeout=5.0) as fs:
        other = FileSystem(fs.meta, fs.files.store, fs.settings, str(tmp_path / "other"))
        try:
            yield fs, other
        finally:
            await other.close()


async def workdir(fs: FileSystem, request: pytest.FixtureRequest) -> Ino:
    """A directory of the test's own (the cluster is shared by the module)."""
    return (await fs.mkdir(ROOT_INO, request.node.name.encode()[:255], 0o755, ROOT)).ino


async def write_file(fs: FileSystem, parent: Ino, name: bytes, data: bytes) -> Attrs:
    """Create ``name``, write ``data`` in 128 KiB pieces, close it."""
    made = await fs.create(parent, name, FILE, os.O_WRONLY, ROOT)
    for pos in range(0, len(data), 128 << 10):
        await fs.write(made.fh, pos, data[pos : pos + (128 << 10)])
    await fs.flush(made.fh)
    await fs.release(made.fh)
    return made.attrs


async def write_at(fs: FileSystem, ino: Ino, offset: int, data: bytes) -> None:
    """Open the file for writing, write ``data`` at ``offset`` (bytes), close it."""
    opened = await fs.open(ino, os.O_WRONLY, ROOT)
    await fs.write(opened.fh, offset, data)
    await fs.release(opened.fh)


async def read_all(fs: FileSystem, ino: Ino) -> bytes:
    opened = await fs.open(ino, os.O_RDONLY, ROOT)
    try:
        return bytes(await fs.read(opened.fh, 0, 1 << 30))
    finally:
        await fs.release(opened.fh)


@asynccontextmanager
async def cold_reader(
    writer: FileSystem, tmp_path: Path, cache_bytes: int = 128 * MiB
) -> AsyncIterator[tuple[FileSystem, ChunkStore]]:
    """Another mount's ``FileSystem`` on ``writer``'s cluster with a store
    of its own (an empty memory cache of ``cache_bytes``), its node list
    fetched; both are closed on the way out.
    """
    store = ChunkStore(
        writer.meta,
        writer.settings.cluster_token,
        writer.settings.replicas,
        cache_bytes=cache_bytes,
    )
    (tmp_path / "reader").mkdir()
    reader = FileSystem(writer.meta, store, writer.settings, str(tmp_path / "reader"))
    try:
        await store.refresh(force=True)
        yield reader, store
    finally:
        await reader.close()
        await store.aclose()


def fetched() -> float:
    """The chunk bytes this process has fetched from nodes so far."""
    got = metrics.REGISTRY.get_sample_value("chunkfs_node_bytes_total", {"direction": "down"})
    return got or 0.0


async def test_a_closed_file_is_six_chunks_on_two_nodes_and_reads_back_elsewhere(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    writer, reader = pair
    d = await workdir(writer, request)
    data = os.urandom(700_001)
    attrs = await write_file(writer, d, b"f", data)
    cmap = await writer.meta.content.chunk_map(attrs.ino)
    assert cmap.size == len(data)
    assert cmap.sha256 == layout.file_digest(len(data), [c.chunk_id for c in cmap.chunks])
    assert [c.index for c in cmap.chunks] == list(range(6))
    assert b"".join(data[c.offset : c.end] for c in cmap.chunks) == data
    for c in cmap.chunks:
        assert c.chunk_id == hashlib.sha256(data[c.offset : c.end]).digest()
        assert len(set(c.nodes)) == 2
    found = await reader.lookup(d, b"f")
    assert (found.ino, found.size) == (attrs.ino, len(data))
    assert await read_all(reader, attrs.ino) == data


async def test_an_open_reader_keeps_its_version_until_it_opens_again(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    writer, reader = pair
    d = await workdir(writer, request)
    old, new = os.urandom(50_000), os.urandom(60_000)
    ino = (await write_file(writer, d, b"f", old)).ino
    held = await reader.open(ino, os.O_RDONLY, ROOT)
    opened = await writer.open(ino, os.O_WRONLY | os.O_TRUNC, ROOT)
    await writer.write(opened.fh, 0, new)
    await writer.release(opened.fh)  # the last close commits
    assert await reader.read(held.fh, 0, 1 << 20) == old  # never a mix of the two
    await reader.release(held.fh)
    assert await read_all(reader, ino) == new  # close-to-open


async def test_two_handles_share_one_spool_and_one_commit(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    ino = (await write_file(fs, d, b"f", b"")).ino
    a = await fs.open(ino, os.O_RDWR, ROOT)
    b = await fs.open(ino, os.O_RDWR, ROOT)
    pieces = {i: bytes([65 + i]) * 4096 for i in range(16)}

    async def put(i: int) -> None:
        await fs.write((a if i % 2 else b).fh, i * 4096, pieces[i])

    async with trio.open_nursery() as nursery:
        for i in pieces:
            nursery.start_soon(put, i)
    expected = b"".join(pieces[i] for i in range(16))
    assert await fs.read(a.fh, 0, 1 << 20) == expected  # unflushed, seen by both
    assert (await fs.getattr(ino)).size == len(expected)
    assert await read_all(other, ino) == b""  # nothing committed yet
    await fs.flush(b.fh)
    assert await read_all(other, ino) == expected
    version = (await fs.getattr(ino)).version
    await fs.flush(a.fh)  # nothing new: no new version
    await fs.release(a.fh)
    await fs.release(b.fh)
    assert (await other.getattr(ino)).version == version


async def test_a_failed_commit_reports_eio_keeps_the_old_version_and_retries(
    cluster: cl.Cluster, pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    old, new = os.urandom(100_000), os.urandom(90_000)
    ino = (await write_file(fs, d, b"f", old)).ino
    opened = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, ROOT)
    await fs.write(opened.fh, 0, new)
    for n in cluster.nodes[1:]:
        n.kill()
    try:
        with pytest.raises(errors.StorageError) as info:
            await fs.flush(opened.fh)
        assert info.value.errno == errno.EIO
    finally:
        for n in cluster.nodes[1:]:
            n.start()
        cluster.wait_nodes_active(timeout=60)
    # The store skips the nodes that did not answer until its health probes
    # (every second, in the background) find them back: give them a turn.
    await trio.sleep(3 * PROBE_INTERVAL_S)
    assert await read_all(other, ino) == old  # (its replicas may have been on the dead nodes)
    await fs.files.store.refresh(force=True)
    await fs.flush(opened.fh)  # the spool was kept: the retry commits it
    await fs.release(opened.fh)
    assert await read_all(other, ino) == new


async def test_a_commit_whose_upload_session_was_lost_pushes_its_chunks_again(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest, monkeypatch
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    data = os.urandom(300_000)
    content = fs.meta.content
    commit_chunks = content.commit_chunks
    reclaimed: list[int] = []

    async def lose_the_first_session(ino: Ino, session_id: int | None, **kw: object) -> Attrs:
        if not reclaimed:
            # What a failover that lost the session's asynchronous commit
            # leaves: no session, and a reclamation pass that takes the
            # chunks it had protected before the file's commit.
            await fs.meta.db.execute(
                "DELETE FROM upload_sessions WHERE session_id = $1", session_id
            )
            reclaimed.append((await gc.collect(fs.meta)).deleted)
        return await commit_chunks(ino, session_id, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(content, "commit_chunks", lose_the_first_session)
    attrs = await write_file(fs, d, b"f", data)
    assert reclaimed[0] >= 2 * 6  # the first upload's replicas were taken
    cmap = await fs.meta.content.chunk_map(attrs.ino)
    for c in cmap.chunks:
        assert len(c.nodes) == 2
        for node_id in c.nodes:  # pushed again: every recorded replica is there
            got = await fs.files.store.client(node_id).get(c.chunk_id)
            assert hashlib.sha256(got).digest() == c.chunk_id
    assert await read_all(other, attrs.ino) == data


async def test_a_sequential_reader_is_read_ahead_into_the_next_chunk_once(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    writer, _ = pair
    d = await workdir(writer, request)
    data = os.urandom(64 * MiB)  # four chunks of 16 MiB, read in windows of 1 MiB
    ino = (await write_file(writer, d, b"f", data)).ino
    # A memory cache smaller than the file: windows read must make room for
    # those read ahead, not the reverse.
    async with cold_reader(writer, tmp_path, cache_bytes=56 * MiB) as (reader, _):

        async def read_through(least_ahead: int) -> float:
            """Read the file from the start up to the window that makes the reader
            sequential, wait for at least ``least_ahead`` bytes fetched, then
            read the rest; the bytes fetched.
            """
            before = fetched()
            opened = await reader.open(ino, os.O_RDONLY, ROOT)
            start = (SEQUENTIAL_AFTER + 1) * MiB
            try:
                pieces = [await reader.read(opened.fh, pos, MiB) for pos in range(0, start, MiB)]
                for _ in range(600):  # 30 s at most: read ahead in the background
                    if fetched() - before >= least_ahead:
                        break
                    await trio.sleep(0.05)
                assert fetched() - before >= least_ahead
                pieces += [
                    await reader.read(opened.fh, pos, MiB) for pos in range(start, 64 * MiB, MiB)
                ]
                assert b"".join(pieces) == data
            finally:
                await reader.release(opened.fh)
            return fetched() - before

        # The rest of the first chunk and all of the second are read ahead.
        assert await read_through(32 * MiB) == 64 * MiB  # no window fetched twice
        # Read again (what was read is not kept in memory): read ahead again.
        assert 48 * MiB <= await read_through(24 * MiB) <= 64 * MiB


async def test_a_random_reader_is_not_read_ahead(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    writer, _ = pair
    d = await workdir(writer, request)
    data = os.urandom(64 * MiB)  # four chunks of 16 MiB
    ino = (await write_file(writer, d, b"f", data)).ino
    async with cold_reader(writer, tmp_path) as (reader, _):
        # Near the last read now and then, never SEQUENTIAL_AFTER times running:
        # 4 KiB from windows 0, 1, 2, 10, 11, 12, 5 ... of each chunk.
        order = [0, 1, 2, 10, 11, 12, 5, 6, 7, 14, 15]
        offsets = [c * 16 * MiB + w * MiB + 4096 * w for c in range(4) for w in order]
        before = fetched()
        opened = await reader.open(ino, os.O_RDONLY, ROOT)
        try:
            for pos in offsets:
                assert await reader.read(opened.fh, pos, 4096) == data[pos : pos + 4096]
        finally:
            await reader.release(opened.fh)
        await trio.sleep(1)  # a read-ahead would have been started by now
        windows = len({pos // MiB for pos in offsets})
        assert fetched() - before == windows * MiB  # each window once, nothing else


async def test_the_small_files_of_a_directory_gone_through_are_fetched_ahead_in_batches(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    writer, _ = pair
    d = await workdir(writer, request)
    contents = [os.urandom(8192 + n) for n in range(12)]
    inos = [(await write_file(writer, d, b"f%d" % n, data)).ino for n, data in enumerate(contents)]
    async with cold_reader(writer, tmp_path) as (reader, store):

        async def held(ino: Ino) -> bool:
            cmap = await writer.meta.content.chunk_map(ino)
            return all(map(store.holds, cmap.chunks))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.scans.run)
            assert len(await reader.readdir(d, 0, 100)) == 12
            assert await read_all(reader, inos[0]) == contents[0]
            await trio.sleep(0.5)
            # One file read says nothing of the next: nothing else is fetched.
            assert [await held(ino) for ino in inos[1:]] == [False] * 11
            assert await read_all(reader, inos[1]) == contents[1]
            for _ in range(300):  # 30 s at most: the batch comes in the background
                if all([await held(ino) for ino in inos[2:]]):
                    break
                await trio.sleep(0.1)
            assert [await held(ino) for ino in inos[2:]] == [True] * 10
            # A file changed after its chunks were fetched ahead reads in its new version.
            contents[5] = os.urandom(9000)
            await write_at(writer, inos[5], 0, contents[5])
            before = fetched()
            for ino, data in zip(inos[2:], contents[2:], strict=True):
                assert await read_all(reader, ino) == data
            assert 0 < fetched() - before <= 2 * len(contents[5])  # file 5's new chunks only
            nursery.cancel_scope.cancel()


async def test_posix_rules_hold_without_a_kernel(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, _ = pair
    d = await workdir(fs, request)
    f = await write_file(fs, d, b"f", b"x")
    with pytest.raises(errors.NameTooLong):
        await fs.create(d, b"n" * 256, FILE, os.O_WRONLY, ROOT)
    with pytest.raises(errors.InvalidArgument):
        await fs.create(d, b"dir", stat.S_IFDIR | 0o755, os.O_WRONLY, ROOT)
    bare = await fs.create(d, b"bare", 0o600, os.O_WRONLY, ROOT)  # no type: a regular file
    await fs.release(bare.fh)
    assert bare.attrs.mode == stat.S_IFREG | 0o600
    # Extended attributes: the kept namespaces only, trusted.* for root only.
    with pytest.raises(errors.NotSupported) as unsupported:
        await fs.setxattr(f.ino, b"system.posix_acl_access", b"")
    assert unsupported.value.errno == errno.EOPNOTSUPP
    with pytest.raises(errors.InvalidArgument):
        await fs.getxattr(f.ino, b"user.")
    await fs.setxattr(f.ino, b"trusted.t", b"1")
    await fs.setxattr(f.ino, b"user.u", b"2")
    assert await fs.listxattr(f.ino, ROOT) == [b"trusted.t", b"user.u"]
    assert await fs.listxattr(f.ino, NOBODY) == [b"user.u"]
    with pytest.raises(errors.NoAttribute):
        await fs.getxattr(f.ino, b"user.none")
    # Rename flags.
    g = await write_file(fs, d, b"g", b"y")
    with pytest.raises(errors.InvalidArgument):
        await fs.rename(d, b"f", d, b"g", 4)  # RENAME_WHITEOUT
    with pytest.raises(errors.Exists):
        await fs.rename(d, b"f", d, b"g", RENAME_NOREPLACE)
    await fs.rename(d, b"f", d, b"g", RENAME_EXCHANGE)
    assert (await fs.lookup(d, b"g")).ino == f.ino and (await fs.lookup(d, b"f")).ino == g.ino
    # What a handle was opened for.
    ro = await fs.open(f.ino, os.O_RDONLY, ROOT)
    wo = await fs.open(f.ino, os.O_WRONLY, ROOT)
    with pytest.raises(errors.BadDescriptor):
        await fs.write(ro.fh, 0, b"z")
    with pytest.raises(errors.BadDescriptor):
        await fs.read(wo.fh, 0, 1)
    await fs.release(ro.fh)
    await fs.release(wo.fh)
    # Times beyond 64-bit nanoseconds are clamped.
    attrs = await fs.setattr(f.ino, mtime_ns=1 << 70, atime_ns=-(1 << 70))
    assert (attrs.mtime_ns, attrs.atime_ns) == ((1 << 63) - 1, -(1 << 63))


async def test_unprivileged_truncate_drops_setuid_and_access_follows_mode_bits(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, _ = pair
    d = await workdir(fs, request)
    f = await write_file(fs, d, b"f", b"data")
    await fs.setattr(f.ino, mode=0o6755, uid=1000, gid=1000)
    owner = Caller(1000, 1000)
    assert await fs.access(f.ino, os.R_OK | os.W_OK | os.X_OK, owner)
    assert await fs.access(f.ino, os.R_OK | os.X_OK, NOBODY)
    assert not await fs.access(f.ino, os.W_OK, NOBODY)
    assert await fs.access(f.ino, os.W_OK, ROOT)
    opened = await fs.open(f.ino, os.O_WRONLY | os.O_TRUNC, owner)
    assert opened.mode_changed
    await fs.release(opened.fh)
    attrs = await fs.getattr(f.ino)
    assert stat.S_IMODE(attrs.mode) == 0o755 and attrs.size == 0


async def test_names_found_absent_are_trusted_until_given_here(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    with pytest.raises(errors.NotFound):
        await fs.lookup(d, b"later")
    await write_file(other, d, b"later", b"1")  # made elsewhere: still trusted absent here
    with pytest.raises(errors.NotFound):
        await fs.lookup(d, b"later")
    with pytest.raises(errors.Exists):  # the database decides an exclusive create
        await fs.create(d, b"later", FILE, os.O_WRONLY | os.O_EXCL, ROOT)
    made = await fs.mkdir(d, b"mine", 0o755, ROOT)
    assert (await fs.lookup(d, b"mine")).ino == made.ino


async def test_a_directory_made_here_holds_only_the_names_given_here_for_a_while(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)  # made by fs: entry_ttl (1 s) from now
    theirs = await write_file(other, d, b"theirs", b"1")
    mine = await write_file(fs, d, b"mine", b"2")
    assert (await fs.lookup(d, b"mine")).ino == mine.ino
    with pytest.raises(errors.NotFound):  # another mount's name, not yet seen here
        await fs.lookup(d, b"theirs")
    with pytest.raises(errors.NameTooLong):
        await fs.lookup(d, b"x" * 256)
    await trio.sleep(1.1)
    assert (await fs.lookup(d, b"theirs")).ino == theirs.ino


async def received_bytes(fs: FileSystem, direction: str = "received") -> float:
    """Body bytes all the cluster's nodes have ``received`` (or ``sent``) so
    far, from their metrics.
    """
    urls = [n.base_url for n in await fs.meta.registry.nodes()]
    return await trio.to_thread.run_sync(
        cl.node_body_bytes, urls, fs.settings.cluster_token, direction
    )


async def test_an_append_sends_only_the_chunks_it_lands_in(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    data = os.urandom(5 * 8192 + 100)  # five full chunks of 8 KiB and a short sixth
    ino = (await write_file(fs, d, b"log", data)).ino
    before = await fs.meta.content.chunk_map(ino)
    sent = await received_bytes(fs)
    opened = await fs.open(ino, os.O_WRONLY | os.O_APPEND, ROOT)
    await fs.write(opened.fh, len(data), b"x" * 100)
    await fs.release(opened.fh)
    after = await fs.meta.content.chunk_map(ino)
    assert [c.chunk_id for c in after.chunks[:5]] == [c.chunk_id for c in before.chunks[:5]]
    assert after.chunks[5].length == 200
    # The new last chunk on R = 2 nodes, in batch framing: nothing else was sent.
    assert await received_bytes(fs) - sent < 2 * (200 + 4096)
    assert await read_all(other, ino) == data + b"x" * 100


async def test_a_write_in_place_fetches_and_sends_only_the_chunk_it_lands_in(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    data = bytearray(os.urandom(6 * MiB))  # six chunks of 1 MiB
    ino = (await write_file(fs, d, b"db", bytes(data))).ino
    before = await fs.meta.content.chunk_map(ino)
    sent, received = await received_bytes(fs, "sent"), await received_bytes(fs)
    # Another front end, with nothing of the file in its spool or caches.
    await write_at(other, ino, 2 * MiB + MiB // 2, b"0123456789")
    data[2 * MiB + MiB // 2 : 2 * MiB + MiB // 2 + 10] = b"0123456789"
    after = await fs.meta.content.chunk_map(ino)
    changed = [i for i in range(6) if after.chunks[i].chunk_id != before.chunks[i].chunk_id]
    assert changed == [2]
    # Chunk 2 was fetched once and sent to R = 2 nodes; the five others stayed put.
    assert await received_bytes(fs, "sent") - sent < 1.1 * MiB
    assert await received_bytes(fs) - received < 2.1 * MiB
    assert after.sha256 == layout.file_digest(len(data), [c.chunk_id for c in after.chunks])
    assert await read_all(fs, ino) == data


async def test_zeros_are_holes_recorded_and_never_uploaded(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    received = await received_bytes(fs)
    made = await fs.create(d, b"sparse", FILE, os.O_RDWR, ROOT)
    await fs.setattr(made.attrs.ino, size=96 * MiB)  # six holes of 16 MiB
    await fs.write(made.fh, 20 * MiB, b"data")  # chunk 1
    await fs.write(made.fh, 40 * MiB, bytes(MiB))  # zeros written into chunk 2
    await fs.release(made.fh)
    cmap = await fs.meta.content.chunk_map(made.attrs.ino)
    assert [c.hole for c in cmap.chunks] == [True, False, True, True, True, True]
    assert all(not c.nodes for c in cmap.chunks if c.hole)
    # Only the block of chunk 1 with data went to the nodes, twice: its
    # other blocks are zeros, which the nodes keep as holes.
    assert await received_bytes(fs) - received < 2 * 1.1 * MiB
    opened = await other.open(made.attrs.ino, os.O_RDONLY, ROOT)
    try:
        assert await other.read(opened.fh, 20 * MiB - 2, 8) == b"\0\0data\0\0"
        assert await other.read(opened.fh, 45 * MiB, 4) == bytes(4)
        assert len(await other.read(opened.fh, 0, 128 * MiB)) == 96 * MiB
    finally:
        await other.release(opened.fh)
    # Writing into a hole makes it a chunk; the others stay holes.
    await write_at(other, made.attrs.ino, 5, b"x")
    cmap = await fs.meta.content.chunk_map(made.attrs.ino)
    assert [c.hole for c in cmap.chunks] == [False, False, True, True, True, True]


async def test_a_small_write_into_a_large_chunk_sends_only_the_block_it_changed(
    pair: tuple[FileSystem, FileSystem], request: pytest.FixtureRequest
) -> None:
    fs, other = pair
    d = await workdir(fs, request)
    # Six chunks of 16 MiB, sixteen blocks each (chunks over 8 MiB are
    # fetched a block at a time, smaller ones whole).
    data = bytearray(os.urandom(96 * MiB))
    ino = (await write_file(fs, d, b"big", bytes(data))).ino
    before = await fs.meta.content.chunk_map(ino)
    sent, received = await received_bytes(fs, "sent"), await received_bytes(fs)
    at = 2 * 16 * MiB + 5 * MiB + 100  # chunk 2, its block 5
    await write_at(other, ino, at, b"0123456789")
    data[at : at + 10] = b"0123456789"
    after = await fs.meta.content.chunk_map(ino)
    assert [i for i in range(6) if after.chunks[i] != before.chunks[i]] == [2]
    # One block fetched (to write into it) and one block sent to each of the
    # R = 2 nodes holding the old chunk 2, which built the new one from it.
    assert await received_bytes(fs, "sent") - sent < 1.1 * MiB
    assert await received_bytes(fs) - received < 2.1 * MiB
    assert set(after.chunks[2].nodes) == set(before.chunks[2].nodes)
    assert after.chunks[2].chunk_id == layout.chunk_id_of(
        layout.block_digests(data[32 * MiB : 48 * MiB])
    )
    assert await read_all(fs, ino) == data
    # A node without the base (its copy lost) gets the whole chunk instead.
    lost = after.chunks[2].nodes[0]
    node = next(n for n in cluster_of(request).nodes if n.node_id == lost)
    (Path(node.data_dir) / "chunks" / after.chunks[2].chunk_id.hex()[:2]).joinpath(
        after.chunks[2].chunk_id.hex()
    ).unlink()
    await write_at(other, ino, at, b"abcdefghij")
    data[at : at + 10] = b"abcdefghij"
    again = await fs.meta.content.chunk_map(ino)
    assert len(set(again.chunks[2].nodes)) == 2
    assert await read_all(other, ino) == data


def cluster_of(request: pytest.FixtureRequest) -> cl.Cluster:
    """The module's cluster (the ``pair`` fixture's)."""
    return request.getfixturevalue("cluster")
