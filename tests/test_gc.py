"""`chunkfs gc` on a real cluster: unreferenced chunks go, referenced ones stay."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

import cluster as cl
from chunkfs.meta import Ino, Meta
from chunkfs.nodeclient import NodeClient
from chunkfs.pg import open_database


def on_disk(cluster: cl.Cluster, chunk_id: str) -> list[str]:
    """Ids of the nodes whose data directory holds the chunk file."""
    return [
        str(n.node_id)
        for n in cluster.nodes
        if (Path(n.data_dir) / "chunks" / chunk_id[:2] / chunk_id).exists()
    ]


def chunk_ids(path: Path) -> set[str]:
    """The file's non-empty chunks (the empty chunk is one object all files share)."""
    chunks = cl.chunkfs_json("info", str(path), "--json")["chunks"]
    return {c["sha256"] for c in chunks if c["length"]}


async def orphan_and_session(dsn: str, orphan: bytes, protected: bytes) -> None:
    """Push two chunks to a node as a crashed writer would; one stays in a live session."""
    async with open_database(dsn) as db:
        meta = Meta(db)
        settings = await meta.registry.settings()
        node = (await meta.registry.nodes())[0]
        await meta.content.begin_upload(Ino(1), [hashlib.sha256(protected).digest()], 3600)
        client = NodeClient(node.base_url, settings.cluster_token)
        try:
            for data in (orphan, protected):
                await client.put(hashlib.sha256(data).digest(), data, len(data))
        finally:
            await client.aclose()


def test_gc_removes_only_unreferenced_chunks(cluster, mounted, mount_factory):
    f = mounted / "versioned"
    f.write_bytes(os.urandom(30_000))
    old = chunk_ids(f)
    content = os.urandom(30_000)
    f.write_bytes(content)
    new = chunk_ids(f)
    assert old.isdisjoint(new)
    orphan, protected = os.urandom(1000), os.urandom(1000)
    trio.run(orphan_and_session, cluster.dsn, orphan, protected)
    orphan_id, protected_id = (hashlib.sha256(x).hexdigest() for x in (orphan, protected))
    assert on_disk(cluster, orphan_id) and on_disk(cluster, protected_id)
    assert all(on_disk(cluster, c) for c in old)

    out = cl.run_chunkfs("gc", cluster.dsn).stdout
    assert "chunks deleted" in out

    assert not any(on_disk(cluster, c) for c in old)
    assert not on_disk(cluster, orphan_id)
    assert on_disk(cluster, protected_id)  # its upload session is still live
    assert all(len(on_disk(cluster, c)) == 2 for c in new)
    assert (mount_factory(cluster.dsn) / "versioned").read_bytes() == content


def test_mkfs_refuses_a_database_whose_tables_clash_and_changes_nothing(empty_dsn):
    cl.run_sql(empty_dsn, "CREATE TABLE inodes (patient text)", "INSERT INTO inodes VALUES ('x')")
    proc = cl.run_chunkfs("mkfs", empty_dsn, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "chunkfs: error: the database already has tables chunkfs would make (inodes) "
        "and is not a chunkfs filesystem: give chunkfs a database of its own"
    ]
    tables = cl.run_sql(
        empty_dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )[0]
    assert tables == [{"table_name": "inodes"}]
    assert cl.run_sql(empty_dsn, "SELECT patient FROM inodes")[0] == [{"patient": "x"}]


def test_mkfs_sets_the_upload_ttl_and_keeps_settings_when_run_again(empty_dsn):
    cl.run_chunkfs("mkfs", empty_dsn, "--replicas", "1", "--upload-ttl", "5")
    out = cl.run_chunkfs("mkfs", empty_dsn, "--upload-ttl", "99").stdout
    assert "settings kept" in out
    row = cl.run_sql(empty_dsn, "SELECT replicas, upload_ttl_s FROM settings")[0][0]
    assert (row["replicas"], row["upload_ttl_s"]) == (1, 5)
    bad = cl.run_chunkfs("mkfs", empty_dsn, "--upload-ttl", "0", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_nodes_give_back_deleted_and_superseded_chunks_without_gc(
    pg_server, mkfs_template, tmp_path, mount_factory
):
    name, dsn = pg_server.new_database(template=mkfs_template)
    c = cl.Cluster(
        tmp_path / "c", nodes=3, dsn=dsn, mkfs=False, node_args=["--reclaim-interval", "0.5"]
    )
    try:
        c.start()
        m = mount_factory(dsn)
        f = m / "rewritten"
        f.write_bytes(os.urandom(30_000))
        superseded = chunk_ids(f)
        f.write_bytes(os.urandom(30_000))
        live = chunk_ids(f)
        g = m / "deleted"
        g.write_bytes(os.urandom(50_000))
        deleted = chunk_ids(g)
        g.unlink()
        cl.wait_until(
            lambda: not any(on_disk(c, x) for x in superseded | deleted), 30, "reclamation"
        )
        assert all(len(on_disk(c, x)) == 2 for x in live)
        assert len(f.read_bytes()) == 30_000
        fsck = cl.run_chunkfs("fsck", dsn, "--verify")
        assert "clean" in fsck.stdout and "NOT" not in fsck.stdout
    finally:
        c.stop()
        pg_server.drop(name)
