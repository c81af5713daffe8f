"""The metadata engine against a real PostgreSQL (one fresh database per test)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat

import pytest
import trio

import cluster as cl
from chunkfs import errors, layout
from chunkfs.meta import ROOT_INO, SCHEMA_VERSION, Attrs, ChunkRef, Meta, Renamed, now_ns
from chunkfs.meta.maintenance import SESSION_GRACE_S
from chunkfs.meta.namespace import INODE_BLOCK
from chunkfs.pg import open_database

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
async def meta(pg_dsn):
    async with open_database(pg_dsn) as db:
        yield Meta(db)


async def count(meta: Meta, table: str) -> int:
    return await meta.db.fetchval(f"SELECT count(*) FROM {table}")


async def test_creating_a_name_that_exists_is_eexist(meta):
    await meta.namespace.create(ROOT_INO, b"a", FILE, 0, 0)
    with pytest.raises(errors.Exists) as info:
        await meta.namespace.create(ROOT_INO, b"a", DIR, 0, 0)
    assert info.value.errno == errno.EEXIST
    assert await count(meta, "inodes") == 2  # root and the first "a" only


async def test_missing_inode_or_name_is_enoent(meta):
    with pytest.raises(errors.NotFound) as info:
        await meta.namespace.lookup(ROOT_INO, b"nope")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(errors.NotFound):
        await meta.namespace.getattr(999_999)
    with pytest.raises(errors.NotFound):
        await meta.namespace.unlink(ROOT_INO, b"nope")


async def test_a_failed_transaction_leaves_nothing_behind(meta):
    f = await meta.namespace.create(ROOT_INO, b"file", FILE, 0, 0)
    before = await count(meta, "inodes")
    # The parent is not a directory: the insert of the inode must roll back.
    with pytest.raises(errors.NotADirectory):
        await meta.namespace.create(f.ino, b"child", FILE, 0, 0)
    assert await count(meta, "inodes") == before

    async def body(conn):
        await conn.execute("INSERT INTO xattrs (ino, name, value) VALUES (1, 'user.x', 'v')")
        raise errors.InvalidArgument("abort")

    with pytest.raises(errors.InvalidArgument):
        await meta.db.transaction(body)
    assert await count(meta, "xattrs") == 0


async def test_names_over_255_bytes_are_enametoolong(meta):
    await meta.namespace.create(ROOT_INO, b"n" * 255, FILE, 0, 0)
    with pytest.raises(errors.NameTooLong) as info:
        await meta.namespace.create(ROOT_INO, b"n" * 256, FILE, 0, 0)
    assert info.value.errno == errno.ENAMETOOLONG


async def test_any_byte_but_nul_and_slash_is_a_name(meta):
    name = bytes(b for b in range(1, 256) if b != 0x2F)
    a = await meta.namespace.create(ROOT_INO, name, FILE, 0, 0)
    assert (await meta.namespace.lookup(ROOT_INO, name)).ino == a.ino


async def test_ten_concurrent_creates_in_one_directory_all_land(meta):
    d = await meta.namespace.create(ROOT_INO, b"d", DIR, 0, 0)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(meta.namespace.create, d.ino, f"f{i}".encode(), FILE, 0, 0)
    names = sorted(e.name for e in await meta.namespace.readdir(d.ino, 0, 100))
    assert names == sorted(f"f{i}".encode() for i in range(10))
    assert (await meta.namespace.getattr(d.ino)).nlink == 2


async def test_racing_unlinks_and_a_rename_of_one_name_take_effect_once(meta):
    d = await meta.namespace.create(ROOT_INO, b"race", DIR, 0, 0)
    files = {
        f"f{i}".encode(): await meta.namespace.create(d.ino, f"f{i}".encode(), FILE, 0, 0)
        for i in range(20)
    }
    won: dict[bytes, list[str]] = {name: [] for name in files}

    async def attempt(op: str, name: bytes) -> None:
        try:
            if op == "unlink":
                await meta.namespace.unlink(d.ino, name)
            else:
                await meta.namespace.rename(d.ino, name, d.ino, name + b".moved")
            won[name].append(op)
        except errors.NotFound:
            pass

    async with trio.open_nursery() as nursery:
        for name in files:
            for op in ("unlink", "rename", "unlink"):
                nursery.start_soon(attempt, op, name)
    for name, f in files.items():
        assert len(won[name]) == 1, (name, won[name])
        nlink = (await meta.namespace.getattr(f.ino)).nlink
        if won[name] == ["unlink"]:
            assert nlink == 0
            with pytest.raises(errors.NotFound):
                await meta.namespace.lookup(d.ino, name + b".moved")
        else:
            assert (
                nlink == 1 and (await meta.namespace.lookup(d.ino, name + b".moved")).ino == f.ino
            )
    assert (await meta.namespace.getattr(d.ino)).nlink == 2


async def test_directory_link_counts(meta):
    d = await meta.namespace.create(ROOT_INO, b"d", DIR, 0, 0)
    await meta.namespace.create(d.ino, b"sub", DIR, 0, 0)
    assert (await meta.namespace.getattr(d.ino)).nlink == 3
    assert (await meta.namespace.getattr(ROOT_INO)).nlink == 3
    with pytest.raises(errors.NotEmpty):
        await meta.namespace.unlink(ROOT_INO, b"d", is_dir=True)
    with pytest.raises(errors.IsADirectory):
        await meta.namespace.unlink(ROOT_INO, b"d")
    await meta.namespace.unlink(d.ino, b"sub", is_dir=True)
    assert (await meta.namespace.getattr(d.ino)).nlink == 2


async def test_hard_links_count_and_purge_waits_for_the_last_name(meta):
    f = await meta.namespace.create(ROOT_INO, b"a", FILE, 0, 0)
    assert (await meta.namespace.link(f.ino, ROOT_INO, b"b")).nlink == 2
    assert (await meta.namespace.unlink(ROOT_INO, b"a")).nlink == 1
    assert await meta.namespace.purge([f.ino]) == 0
    assert (await meta.namespace.unlink(ROOT_INO, b"b")).nlink == 0
    assert await meta.namespace.purge([f.ino]) == 1
    with pytest.raises(errors.NotFound):
        await meta.namespace.getattr(f.ino)


async def test_more_than_link_max_hard_links_is_emlink(meta):
    from chunkfs.meta import LINK_MAX

    f = await meta.namespace.create(ROOT_INO, b"f", FILE, 0, 0)
    # Reaching the limit one link at a time would take minutes: start near it.
    await meta.db.execute("UPDATE inodes SET nlink = $2 WHERE ino = $1", f.ino, LINK_MAX - 1)
    assert (await meta.namespace.link(f.ino, ROOT_INO, b"last")).nlink == LINK_MAX
    with pytest.raises(errors.TooManyLinks) as info:
        await meta.namespace.link(f.ino, ROOT_INO, b"one-too-many")
    assert info.value.errno == errno.EMLINK
    with pytest.raises(errors.NotFound):
        await meta.namespace.lookup(ROOT_INO, b"one-too-many")


async def test_rename_cases(meta):
    a = await meta.namespace.create(ROOT_INO, b"a", FILE, 0, 0)
    b = await meta.namespace.create(ROOT_INO, b"b", FILE, 0, 0)
    d = await meta.namespace.create(ROOT_INO, b"d", DIR, 0, 0)
    sub = await meta.namespace.create(d.ino, b"sub", DIR, 0, 0)
    with pytest.raises(errors.Exists):
        await meta.namespace.rename(ROOT_INO, b"a", ROOT_INO, b"b", noreplace=True)
    with pytest.raises(errors.InvalidArgument):
        await meta.namespace.rename(ROOT_INO, b"d", sub.ino, b"x")
    with pytest.raises(errors.IsADirectory):
        await meta.namespace.rename(ROOT_INO, b"a", ROOT_INO, b"d")
    with pytest.raises(errors.NotADirectory):
        await meta.namespace.rename(ROOT_INO, b"d", ROOT_INO, b"a")
    await meta.namespace.rename(ROOT_INO, b"a", ROOT_INO, b"b", exchange=True)
    assert (await meta.namespace.lookup(ROOT_INO, b"a")).ino == b.ino
    assert (await meta.namespace.lookup(ROOT_INO, b"b")).ino == a.ino
    done = await meta.namespace.rename(ROOT_INO, b"a", ROOT_INO, b"b")
    assert done.moved == b.ino
    assert done.replaced is not None and done.replaced.ino == a.ino and done.replaced.nlink == 0
    assert (await meta.namespace.lookup(ROOT_INO, b"b")).ino == b.ino
    with pytest.raises(errors.NotFound):
        await meta.namespace.lookup(ROOT_INO, b"a")
    await meta.namespace.rename(d.ino, b"sub", ROOT_INO, b"sub2")
    assert (await meta.namespace.getattr(d.ino)).nlink == 2
    assert (await meta.namespace.getattr(ROOT_INO)).nlink == 4  # ".", "..", d and sub2


async def test_rename_of_a_file_moves_times_and_links_as_a_local_filesystem(meta):
    d1 = await meta.namespace.create(ROOT_INO, b"d1", DIR, 0, 0)
    d2 = await meta.namespace.create(ROOT_INO, b"d2", DIR, 0, 0)
    f = await meta.namespace.create(d1.ino, b"f", FILE, 0, 0)
    g = await meta.namespace.create(d2.ino, b"g", FILE, 0, 0)
    await meta.namespace.link(g.ino, d2.ino, b"g2")
    g = await meta.namespace.getattr(g.ino)
    t0 = now_ns()
    # Over a name whose inode keeps another link: nothing to purge.
    done = await meta.namespace.rename(d1.ino, b"f", d2.ino, b"g", now=t0)
    assert done.moved == f.ino and done.replaced is not None
    assert (done.replaced.ino, done.replaced.nlink) == (g.ino, 1)
    assert (await meta.namespace.lookup(d2.ino, b"g")).ino == f.ino
    assert (await meta.namespace.getattr(g.ino)).nlink == 1
    with pytest.raises(errors.NotFound):
        await meta.namespace.lookup(d1.ino, b"f")
    moved = await meta.namespace.getattr(f.ino)
    assert moved.ctime_ns == t0 and moved.mtime_ns == f.mtime_ns
    for parent in (d1, d2):
        after = await meta.namespace.getattr(parent.ino)
        assert after.mtime_ns == t0 and after.ctime_ns == t0
    # Onto another name of the same inode: rename(2) does nothing.
    await meta.namespace.link(f.ino, d2.ino, b"f2")
    assert await meta.namespace.rename(d2.ino, b"g", d2.ino, b"f2") == Renamed(None, None)
    assert (await meta.namespace.lookup(d2.ino, b"g")).ino == f.ino
    assert (await meta.namespace.getattr(f.ino)).nlink == 2
    with pytest.raises(errors.NotFound):
        await meta.namespace.rename(d1.ino, b"missing", d2.ino, b"x")
    names = [e.name for e in await meta.namespace.readdir(d2.ino, 0, 10)]
    assert sorted(names) == [b"f2", b"g", b"g2"]


async def test_readdir_cookies_neither_skip_nor_repeat_while_names_change(meta):
    d = await meta.namespace.create(ROOT_INO, b"d", DIR, 0, 0)
    for i in range(20):
        await meta.namespace.create(d.ino, f"f{i:02}".encode(), FILE, 0, 0)
    seen, after = [], 0
    unseen = [f"f{i:02}".encode() for i in range(20)]
    for page_no in range(100):  # bounded: each page adds one name
        page = await meta.namespace.readdir(d.ino, after, 3)
        if not page:
            break
        seen += [e.name for e in page]
        after = page[-1].cookie
        unseen = [n for n in unseen if n not in seen]
        # Names come and go between pages: one new, one not yet listed removed.
        await meta.namespace.create(d.ino, f"new{page_no}".encode(), FILE, 0, 0)
        if unseen:
            await meta.namespace.unlink(d.ino, unseen.pop())
    assert len(seen) == len(set(seen))
    originals = [n for n in seen if n.startswith(b"f")]
    assert originals == sorted(originals)


async def test_chunk_map_commit_and_version(meta):
    settings = await meta.registry.settings()
    f = await meta.namespace.create(ROOT_INO, b"f", FILE, 0, 0)
    await register(meta, "00000000000000aa")
    data = [b"ab", b"c", b"d", b"e", b"f", b"g"]
    ids = [hashlib.sha256(x).digest() for x in data]
    sid = await meta.content.begin_upload(f.ino, ids, settings.upload_ttl_s)
    attrs = await meta.content.commit_chunks(
        f.ino,
        sid,
        size=7,
        sha256=hashlib.sha256(b"".join(data)).digest(),
        chunks=[
            ChunkRef(i, sum(map(len, data[:i])), len(x), ids[i], ()) for i, x in enumerate(data)
        ],
        placed={c: ["00000000000000aa"] for c in ids},
        mtime_ns=123,
        max_file_size=settings.max_file_size,
    )
    assert (attrs.size, attrs.version, attrs.mtime_ns) == (7, 1, 123)
    cmap = await meta.content.chunk_map(f.ino)
    assert [c.chunk_id for c in cmap.chunks] == ids
    assert all(c.nodes == ("00000000000000aa",) for c in cmap.chunks)
    with pytest.raises(errors.FileTooLarge):
        await meta.content.commit_chunks(
            f.ino, None, size=10, sha256=b"", chunks=[], placed={}, mtime_ns=1, max_file_size=9
        )
    assert (await meta.namespace.getattr(f.ino)).version == 1


async def register(meta: Meta, node_id: str, *, capacity: int = 1, zone: str = "z") -> None:
    """Register a node that is never contacted, at a URL of its own (from its id)."""
    await meta.registry.register_node(
        node_id,
        f"http://127.0.0.1:{int(node_id, 16) % 60000 + 1}",
        zone=zone,
        capacity_bytes=capacity,
        used_bytes=0,
        free_bytes=capacity,
        chunk_count=0,
    )


async def committed_file(
    meta: Meta, name: bytes, data: list[bytes], holders: list[list[str]]
) -> Attrs:
    """A file ``name`` in the root whose chunks are the one-byte pieces
    ``data``, the i-th recorded on the nodes ``holders[i]`` (registered here).
    """
    settings = await meta.registry.settings()
    for node_id in sorted({n for nodes in holders for n in nodes}):
        await register(meta, node_id)
    f = await meta.namespace.create(ROOT_INO, name, FILE, 0, 0)
    ids = [hashlib.sha256(x).digest() for x in data]
    sid = await meta.content.begin_upload(f.ino, ids, settings.upload_ttl_s)
    await meta.content.commit_chunks(
        f.ino,
        sid,
        size=len(data),
        sha256=hashlib.sha256(b"".join(data)).digest(),
        chunks=[ChunkRef(i, i, 1, c, ()) for i, c in enumerate(ids)],
        placed=dict(zip(ids, holders, strict=True)),
        mtime_ns=1,
        max_file_size=settings.max_file_size,
    )
    return f


async def test_begin_commit_reuses_only_chunks_a_committed_file_holds_on_enough_nodes(meta):
    data = [b"1", b"2", b"3", b"4", b"5", b"6"]
    ids = [hashlib.sha256(x).digest() for x in data]
    both = ["00000000000000b1", "00000000000000b2"]
    f = await committed_file(meta, b"held", data, [both] * 5 + [["00000000000000b1"]])
    g = await meta.namespace.create(ROOT_INO, b"copy", FILE, 0, 0)
    other = hashlib.sha256(b"other").digest()
    session = await meta.content.begin_commit(g.ino, [*ids, other], 3600, 2)
    assert set(session.reusable) == set(ids[:5])  # the sixth has one holder, "other" none
    assert session.reusable[ids[0]] == ("00000000000000b1", "00000000000000b2")
    protected = await meta.db.fetch(
        "SELECT chunk_id FROM upload_session_chunks WHERE session_id = $1", session.session_id
    )
    assert {bytes(r["chunk_id"]) for r in protected} == set(ids) | {other}
    # Once no committed file uses them, nothing is reusable.
    await meta.namespace.unlink(ROOT_INO, b"held")
    assert await meta.namespace.purge([f.ino]) == 1
    assert (await meta.content.begin_commit(g.ino, ids, 3600, 2)).reusable == {}


async def test_nodes_register_with_150_vnodes_and_stale_heartbeats_are_not_live(meta):
    for node_id in ("00000000000000a1", "00000000000000a2"):
        await register(meta, node_id, capacity=10)
    assert (
        await meta.db.fetchval(
            "SELECT count(*) FROM hash_ring_vnodes WHERE node_id = '00000000000000a1'"
        )
        == 150
    )
    await meta.db.execute(
        "UPDATE storage_nodes SET last_heartbeat = now() - interval '1 minute' "
        "WHERE node_id = '00000000000000a2'"
    )
    live = {n.node_id: n.live for n in await meta.registry.nodes()}
    assert live == {"00000000000000a1": True, "00000000000000a2": False}
    before = await meta.db.fetchval(
        "SELECT last_heartbeat FROM storage_nodes WHERE node_id = '00000000000000a2'"
    )
    await meta.registry.heartbeat(
        "00000000000000a2", capacity_bytes=10, used_bytes=1, free_bytes=9, chunk_count=1
    )
    after = await meta.db.fetchval(
        "SELECT last_heartbeat FROM storage_nodes WHERE node_id = '00000000000000a2'"
    )
    assert after > before
    assert all(n.live for n in await meta.registry.nodes())


async def test_heartbeats_nobody_could_send_do_not_make_nodes_stale(meta):
    a, b, c = "00000000000000a1", "00000000000000a2", "00000000000000a3"
    for node_id in (a, b, c):
        await register(meta, node_id, capacity=10)
    # Node c died a minute ago; 40 s ago PostgreSQL went away (a failover)
    # and nobody could send a heartbeat until now.
    await meta.db.execute(
        "UPDATE storage_nodes SET last_heartbeat = now() - CASE node_id "
        "WHEN $1 THEN interval '41 seconds' WHEN $2 THEN interval '40 seconds' "
        "ELSE interval '60 seconds' END",
        a,
        b,
    )
    # Nobody had a heartbeat for 40 s: ages stopped growing 5 s after the last.
    ages = {n.node_id: n.heartbeat_age_s for n in await meta.registry.nodes()}
    assert 5.9 < ages[a] < 6.1 and 4.9 < ages[b] < 5.1 and 24.9 < ages[c] < 25.1
    assert [n.live for n in await meta.registry.nodes()] == [True, True, False]
    # The first heartbeat after the gap records it: a and b were live when
    # PostgreSQL went away and stay live; c had been stale long before.
    await meta.registry.heartbeat(a, capacity_bytes=10, used_bytes=1, free_bytes=9, chunk_count=1)
    ages = {n.node_id: n.heartbeat_age_s for n in await meta.registry.nodes()}
    live = {n.node_id: n.live for n in await meta.registry.nodes()}
    assert live == {a: True, b: True, c: False}
    assert ages[a] < 1 and 0 <= ages[b] < 2 and 19 < ages[c] < 22
    # A later heartbeat within the grace records no new gap.
    await meta.registry.heartbeat(b, capacity_bytes=10, used_bytes=1, free_bytes=9, chunk_count=1)
    assert {n.node_id: n.live for n in await meta.registry.nodes()} == live
    assert await meta.db.fetchval("SELECT quiet_until < now() FROM settings")


async def test_expired_upload_sessions_are_removed_and_release_their_chunks(meta):
    f = await meta.namespace.create(ROOT_INO, b"f", FILE, 0, 0)
    held, expired = hashlib.sha256(b"held").digest(), hashlib.sha256(b"gone").digest()
    graced = hashlib.sha256(b"graced").digest()
    await meta.content.begin_upload(f.ino, [held], 3600)
    for chunk_id, ago_s in ((expired, SESSION_GRACE_S + 1), (graced, SESSION_GRACE_S - 60)):
        await meta.content.begin_upload(f.ino, [chunk_id], 1)
        await meta.db.execute(
            "UPDATE upload_sessions SET expires_at = now() - make_interval(secs => $2) "
            "WHERE session_id IN (SELECT session_id FROM upload_session_chunks "
            "WHERE chunk_id = $1)",
            chunk_id,
            float(ago_s),
        )
    # Expired within the grace: still protected (a commit may be under way).
    unneeded = await meta.maintenance.take_unneeded("00000000000000aa", [held, expired, graced])
    assert unneeded == {expired}
    assert await meta.maintenance.expire_sessions() == 1
    assert await count(meta, "upload_sessions") == 2


async def test_a_commit_needs_a_live_session_of_its_file_naming_every_chunk(meta):
    settings = await meta.registry.settings()
    await register(meta, "00000000000000aa")
    f = await meta.namespace.create(ROOT_INO, b"f", FILE, 0, 0)
    g = await meta.namespace.create(ROOT_INO, b"g", FILE, 0, 0)
    data = [b"1", b"2", b"3", b"4", b"5", b"6"]
    ids = [hashlib.sha256(x).digest() for x in data]

    async def commit(session_id: int) -> Attrs:
        return await meta.content.commit_chunks(
            f.ino,
            session_id,
            size=6,
            sha256=hashlib.sha256(b"".join(data)).digest(),
            chunks=[ChunkRef(i, i, 1, c, ()) for i, c in enumerate(ids)],
            placed={c: ["00000000000000aa"] for c in ids},
            mtime_ns=1,
            max_file_size=settings.max_file_size,
        )

    expired = await meta.content.begin_upload(f.ino, ids, 3600)
    await meta.db.execute(
        "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE session_id = $1",
        expired,
    )
    failed = await meta.content.begin_upload(f.ino, ids, 3600)
    await meta.content.fail_upload(failed)
    partial = await meta.content.begin_upload(f.ino, ids[:5], 3600)
    of_another_file = await meta.content.begin_upload(g.ino, ids, 3600)
    lost = await meta.content.begin_upload(f.ino, ids, 3600)
    await meta.db.execute("DELETE FROM upload_sessions WHERE session_id = $1", lost)
    for session_id in (expired, failed, partial, of_another_file, lost):
        with pytest.raises(errors.UploadLost):
            await commit(session_id)
    assert (await meta.namespace.getattr(f.ino)).version == 0  # nothing changed
    assert (await meta.content.chunk_map(f.ino)).chunks == ()
    assert await count(meta, "chunk_replicas") == 0
    live = await meta.content.begin_upload(f.ino, ids, 3600)
    assert (await commit(live)).version == 1
    with pytest.raises(errors.UploadLost):  # a session completes once
        await commit(live)
    again = await meta.content.begin_upload(f.ino, ids, 3600)
    await meta.namespace.unlink(ROOT_INO, b"f")
    await meta.db.execute("DELETE FROM inodes WHERE ino = $1", f.ino)
    with pytest.raises(errors.NotFound):
        await commit(again)


async def test_unneeded_chunks_lose_their_records_on_that_node_when_found(meta):
    data = [b"u1", b"u2", b"u3", b"u4", b"u5", b"u6"]
    ids = [hashlib.sha256(x).digest() for x in data]
    a, b = "00000000000000c1", "00000000000000c2"
    f = await committed_file(meta, b"gone", data, [[a, b]] * 6)
    assert await meta.maintenance.take_unneeded(a, ids) == set()  # in use
    await meta.db.execute("DELETE FROM chunks WHERE ino = $1", f.ino)  # superseded
    assert await meta.maintenance.take_unneeded(a, ids) == set(ids)
    held = await meta.db.fetch(
        "SELECT DISTINCT node_id FROM chunk_replicas WHERE chunk_id = ANY($1::bytea[])", ids
    )
    assert [r["node_id"] for r in held] == [b]


async def test_an_older_schema_is_refused_until_mkfs_upgrades_it(pg_dsn):
    async with open_database(pg_dsn) as db:
        meta = Meta(db)
        a = await meta.namespace.create(ROOT_INO, b"a", FILE, 0, 0)
        # A filesystem made before rename_file, holes and zones existed (schema version 1).
        await db.execute("DROP FUNCTION rename_file")
        await db.execute("ALTER TABLE chunks ALTER COLUMN chunk_id SET NOT NULL")
        await db.execute("ALTER TABLE settings DROP COLUMN cluster_id")
        await db.execute("ALTER TABLE storage_nodes DROP COLUMN zone")
        await db.execute("DROP FUNCTION heartbeat_age")
        await db.execute("DROP TABLE sync_marks")
        await db.execute("DROP TABLE commit_marks")
        await db.execute("ALTER TABLE settings DROP COLUMN quiet_since, DROP COLUMN quiet_until")
        await db.execute("ALTER SEQUENCE inode_seq INCREMENT BY 1")
        await db.execute("UPDATE schema_version SET version = 1")
        with pytest.raises(errors.ConfigError, match="run `chunkfs mkfs`"):
            await meta.registry.settings()
        await trio.to_thread.run_sync(cl.run_chunkfs, "mkfs", pg_dsn)
        settings = await meta.registry.settings()
        assert settings.replicas == 2  # kept
        assert re.fullmatch("[0-9a-f]{32}", settings.cluster_id)  # made by the upgrade
        assert await db.fetchval("SELECT version FROM schema_version") == SCHEMA_VERSION == 8
        nullable = await db.fetchval(
            "SELECT is_nullable FROM information_schema.columns "
            "WHERE table_name = 'chunks' AND column_name = 'chunk_id'"
        )
        assert nullable == "YES"  # holes can be recorded
        step = "SELECT increment_by FROM pg_sequences WHERE sequencename = 'inode_seq'"
        assert await db.fetchval(step) == INODE_BLOCK  # inode numbers in blocks
        renamed = await meta.namespace.rename(ROOT_INO, b"a", ROOT_INO, b"b")
        assert renamed == Renamed(a.ino, None)
        assert (await meta.namespace.lookup(ROOT_INO, b"b")).ino == a.ino
        assert await meta.registry.nodes() == []  # heartbeat ages: made by the upgrade


async def test_fsck_accepts_both_layouts_and_flags_any_other_tiling(meta):
    settings = await meta.registry.settings()

    async def commit(name: bytes, size: int, lengths: list[int]) -> int:
        f = await meta.namespace.create(ROOT_INO, name, FILE, 0, 0)
        data = os.urandom(size)
        chunks, offset = [], 0
        for i, n in enumerate(lengths):
            piece = data[offset : offset + n]
            chunks.append(ChunkRef(i, offset, n, hashlib.sha256(piece).digest(), ()))
            offset += n
        await meta.content.commit_chunks(
            f.ino,
            None,
            size=size,
            sha256=hashlib.sha256(data).digest(),
            chunks=chunks,
            placed={},
            mtime_ns=1,
            max_file_size=settings.max_file_size,
        )
        return f.ino

    sizes = [1, 4097, 6 * 4096 + 1, 100_000]
    for size in sizes:  # this version's layout, and the near-equal sixths of older ones
        await commit(b"new%d" % size, size, [e.length for e in layout.extents(size)])
        q, r = divmod(size, 6)
        await commit(b"old%d" % size, size, [q + (i < r) for i in range(6)])
    bad = await commit(b"bad", 100_000, [50_000, 50_000, 0, 0, 0, 0])
    problems = [p for p in await meta.maintenance.inode_problems() if "tile" in p.what]
    assert [p.ino for p in problems] == [bad], problems


async def test_begin_commit_does_not_reuse_a_chunk_whose_last_user_goes_meanwhile(meta, pg_dsn):
    """The reuse check locks a committed row that uses the chunk: a
    transaction deleting that row makes it wait, and once the deletion has
    committed the chunk is no longer reusable (it is uploaded again).
    """
    import asyncpg
    import trio_asyncio

    f = await committed_file(meta, b"going", [b"x"], [["00000000000000c1", "00000000000000c2"]])
    chunk = hashlib.sha256(b"x").digest()
    g = await meta.namespace.create(ROOT_INO, b"coming", FILE, 0, 0)
    conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(pg_dsn)
    try:
        await trio_asyncio.aio_as_trio(conn.execute)("BEGIN")
        await trio_asyncio.aio_as_trio(conn.execute)("DELETE FROM chunks WHERE ino = $1", f.ino)
        found = []

        async def begin() -> None:
            found.append(await meta.content.begin_commit(g.ino, [chunk], 3600, 2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(begin)
            await trio.sleep(0.5)
            assert not found  # waits for the deleting transaction
            await trio_asyncio.aio_as_trio(conn.execute)("COMMIT")
        assert found[0].reusable == {}
    finally:
        await trio_asyncio.aio_as_trio(conn.close)()
