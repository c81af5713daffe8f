"""Faults on a real cluster: dead, hung and full nodes, flipped bytes on disk,
a mount or a node killed mid-upload, PostgreSQL restarted under a mount; and
the operator tools (fsck, repair, rebalance, node drain / remove). Every test
ends with a clean ``chunkfs fsck``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cluster as cl
from chunkfs.meta.maintenance import SESSION_GRACE_S

MiB = 1 << 20
NODE_TIMEOUT = "node_timeout=3"
LIVE_TIMEOUT = 40.0  # seconds for a killed node to be seen as down (heartbeat age 15 s)


# ---------------------------------------------------------------- helpers


def chunkfs(*args: str) -> subprocess.CompletedProcess[str]:
    return cl.run_chunkfs(*args, check=False, timeout=600)


def fsck(cluster: cl.Cluster, *flags: str) -> subprocess.CompletedProcess[str]:
    return chunkfs("fsck", cluster.dsn, "--limit", "100000", *flags)


def assert_clean(cluster: cl.Cluster) -> None:
    proc = fsck(cluster, "--verify")
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr


def chunks_of(path: Path) -> list[dict]:
    return cl.chunkfs_json("info", str(path), "--json")["chunks"]


def holders(cluster: cl.Cluster, paths: list[Path]) -> list[list[str]]:
    """The recorded holders of every non-empty chunk of ``paths`` (one query)."""
    inos = ",".join(str(p.stat().st_ino) for p in paths)
    rows = cl.run_sql(
        cluster.dsn,
        f"""
        SELECT array_agg(r.node_id ORDER BY r.node_id) AS nodes FROM chunks c
        JOIN chunk_replicas r ON r.chunk_id = c.chunk_id
        WHERE c.ino IN ({inos}) AND c.length > 0 GROUP BY c.ino, c.chunk_index""",
    )[0]
    return [list(r["nodes"]) for r in rows]


def chunk_file(cluster: cl.Cluster, node_id: str, chunk_id: str) -> Path:
    return Path(cluster.node(node_id).data_dir) / "chunks" / chunk_id[:2] / chunk_id


def files_on_disk(cluster: cl.Cluster) -> dict[str, set[str]]:
    """Chunk ids each node's data directory holds."""
    out = {}
    for n in cluster.nodes:
        assert n.node_id is not None
        root = Path(n.data_dir) / "chunks"
        out[n.node_id] = {p.name for p in root.glob("*/*")} if root.exists() else set()
    return out


def flip(path: Path) -> None:
    """Flip one bit in the middle of a chunk file (its mode keeps it 0600)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def write_tree(root: Path, big: int = 54 * MiB) -> dict[Path, bytes]:
    """A file whose chunks are over 8 MiB (read in verified windows) and small files."""
    files = {root / "big": os.urandom(big)}
    for i in range(12):
        files[root / f"small{i}"] = os.urandom(1000 + 997 * i)
    root.mkdir(parents=True, exist_ok=True)
    for p, data in files.items():
        p.write_bytes(data)
    return files


def read_back(files: dict[Path, bytes], mount: cl.Mount, old_root: Path) -> None:
    for p, data in files.items():
        got = (mount / p.relative_to(old_root.parent)).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), p


def wait_down(cluster: cl.Cluster, node_id: str) -> None:
    def down() -> bool:
        return any(
            n["id"] == node_id and n["status"] != "active" for n in cluster.status()["nodes"]
        )

    cl.wait_until(down, LIVE_TIMEOUT, f"node {node_id} to be seen as down", 0.5)


def restart(cluster: cl.Cluster, node: cl.NodeProcess) -> None:
    node.start()
    cluster.wait_nodes_active()


@pytest.fixture
def fresh(cluster, mount_factory):
    """A new mount of the cluster (an empty chunk cache), with a short node timeout."""
    return lambda: mount_factory(cluster.dsn, [NODE_TIMEOUT])


@pytest.fixture(autouse=True)
def every_node_back(cluster):
    """Whatever a test did to the nodes, they all run again afterwards."""
    yield
    for n in cluster.nodes:
        if n.running:
            os.kill(n.pid, signal.SIGCONT)
        else:
            n.start()
    cluster.wait_nodes_active(timeout=60)


# ------------------------------------------------------------------ tests


def test_a_dead_node_is_skipped_and_repair_restores_every_replica(cluster, mounted, fresh):
    files = write_tree(mounted / "dead")
    victim = cluster.node(chunks_of(mounted / "dead" / "big")[0]["nodes"][0])
    victim.kill()
    read_back(files, fresh(), mounted / "dead")  # before the cluster even noticed
    wait_down(cluster, victim.node_id)
    read_back(files, fresh(), mounted / "dead")
    proc = fsck(cluster)
    assert proc.returncode == 1 and "under-replicated" in proc.stdout, proc.stdout
    assert f"node {victim.node_id} is down" in proc.stdout
    proc = chunkfs("repair", cluster.dsn)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fsck(cluster).returncode == 0  # clean, with the node still down
    for c in chunks_of(mounted / "dead" / "big"):
        live = [n for n in c["nodes"] if n != victim.node_id]
        assert len(live) >= 2
    restart(cluster, victim)
    assert chunkfs("rebalance", cluster.dsn).returncode == 0  # back to exactly R each
    assert chunkfs("gc", cluster.dsn).returncode == 0
    assert all(len(c["nodes"]) == 2 for c in chunks_of(mounted / "dead" / "big"))
    read_back(files, fresh(), mounted / "dead")
    assert_clean(cluster)


def test_flipped_bytes_are_never_returned_and_repair_heals_them(cluster, mounted, fresh):
    files = write_tree(mounted / "flip")
    for holder in (0, 1):  # each replica in turn is the bad one, whichever is read first
        for p in files:
            for c in chunks_of(p):
                if c["length"]:
                    flip(chunk_file(cluster, c["nodes"][holder], c["sha256"]))
        read_back(files, fresh(), mounted / "flip")
        # Plain fsck does not hash; it sees a replica that its node
        # quarantined (a node checks what it serves whole) as missing.
        assert "is corrupt" not in fsck(cluster).stdout
        proc = fsck(cluster, "--verify")
        assert proc.returncode == 1 and "is corrupt" in proc.stdout, proc.stdout
        proc = chunkfs("repair", cluster.dsn)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_clean(cluster)
    # Both replicas of one chunk bad: the read fails with EIO, never wrong bytes.
    victim = mounted / "flip" / "small3"
    c = next(c for c in chunks_of(victim) if c["length"])  # (the empty chunk is shared)
    for node_id in c["nodes"]:
        flip(chunk_file(cluster, node_id, c["sha256"]))
    with pytest.raises(OSError) as info:
        (fresh() / "flip" / "small3").read_bytes()
    assert info.value.errno == errno.EIO
    proc = fsck(cluster, "--verify")
    assert proc.returncode == 1 and "no good replica" in proc.stdout
    assert chunkfs("repair", cluster.dsn).returncode == 1  # nothing to copy from
    victim.unlink()
    # The inode goes once the kernel forgets it (at once, as nothing holds it open).
    cl.wait_until(lambda: fsck(cluster).returncode == 0, 30, "fsck to pass after the unlink", 0.5)
    assert chunkfs("gc", cluster.dsn).returncode == 0
    assert_clean(cluster)


def test_a_hung_node_does_not_hang_reads_or_writes(cluster, mounted, fresh):
    files = write_tree(mounted / "hung", big=12 * MiB)
    victim = cluster.node(chunks_of(mounted / "hung" / "big")[0]["nodes"][0])
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        m = fresh()
        start = time.monotonic()
        read_back(files, m, mounted / "hung")
        (m / "hung" / "new").write_bytes(b"written while a node hangs" * 1000)
        assert time.monotonic() - start < 120
        assert (fresh() / "hung" / "new").read_bytes() == b"written while a node hangs" * 1000
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    cluster.wait_nodes_active(timeout=60)
    assert chunkfs("repair", cluster.dsn).returncode == 0
    assert_clean(cluster)


def test_fewer_than_r_reachable_nodes_fail_close_with_eio_and_keep_the_old_version(
    cluster, mounted, fresh
):
    f = mounted / "keep"
    old = os.urandom(300_000)
    f.write_bytes(old)
    keep = cluster.nodes[0]
    for n in cluster.nodes[1:]:
        n.kill()
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, os.urandom(200_000))
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.EIO
    assert keep.running
    for n in cluster.nodes[1:]:
        n.start()
    cluster.wait_nodes_active(timeout=60)
    assert (fresh() / "keep").read_bytes() == old
    assert chunkfs("gc", cluster.dsn).returncode == 0
    assert_clean(cluster)


def _wait_for_upload(cluster: cl.Cluster, ino: int, timeout: float = 120.0) -> None:
    def uploading() -> bool:
        rows = cl.run_sql(
            cluster.dsn,
            f"SELECT count(*) AS n FROM upload_sessions WHERE ino = {ino} AND status = 'uploading'",
        )[0]
        return rows[0]["n"] > 0

    cl.wait_until(uploading, timeout, "an upload session", 0.05)


def _writer(path: Path, size: int) -> subprocess.Popen[bytes]:
    """A process that overwrites ``path`` with ``size`` random bytes and closes it."""
    code = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "for _ in range(int(sys.argv[2]) // (1 << 20)):\n"
        "    os.write(fd, os.urandom(1 << 20))\n"
        "os.close(fd)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(size)], stderr=subprocess.DEVNULL
    )


def _expire_sessions_and_gc(cluster: cl.Cluster) -> None:
    # As if the session TTL and gc's grace after it had passed.
    cl.run_sql(
        cluster.dsn,
        "UPDATE upload_sessions SET expires_at = now() - "
        f"make_interval(secs => {SESSION_GRACE_S + 1})",
    )
    assert chunkfs("gc", cluster.dsn).returncode == 0


def _assert_no_orphans(cluster: cl.Cluster) -> None:
    """Every chunk file on every node is a recorded replica of a chunk a file uses."""
    rows = cl.run_sql(
        cluster.dsn,
        "SELECT encode(r.chunk_id, 'hex') AS c, r.node_id AS n "
        "FROM chunk_replicas r WHERE EXISTS "
        "(SELECT 1 FROM chunks k WHERE k.chunk_id = r.chunk_id)",
    )[0]
    recorded: dict[str, set[str]] = {}
    for r in rows:
        recorded.setdefault(r["n"], set()).add(r["c"])
    for node_id, ids in files_on_disk(cluster).items():
        assert ids <= recorded.get(node_id, set()), f"orphan chunk files on node {node_id}"
        assert not list((Path(cluster.node(node_id).data_dir) / "tmp").iterdir())


def test_a_mount_killed_mid_upload_leaves_the_old_version_and_gc_leaves_no_orphan(
    cluster, mount_factory
):
    m = mount_factory(cluster.dsn)
    f = m / "crash"
    old = os.urandom(8 * MiB)
    f.write_bytes(old)
    ino = f.stat().st_ino
    writer = _writer(f, 256 * MiB)
    try:
        _wait_for_upload(cluster, ino)
        time.sleep(0.3)  # some chunks are on their way
        for pid in m.pids:
            os.kill(pid, signal.SIGKILL)
        writer.wait(60)
    finally:
        writer.kill()
    assert writer.returncode != 0
    m.unmount()
    m.mount()
    assert (m / "crash").read_bytes() == old
    _expire_sessions_and_gc(cluster)
    _assert_no_orphans(cluster)
    assert_clean(cluster)


def test_a_node_killed_mid_upload_fails_over_or_fails_cleanly(cluster, mounted, fresh):
    f = mounted / "nodecrash"
    f.write_bytes(b"old")
    writer = _writer(f, 192 * MiB)
    try:
        _wait_for_upload(cluster, f.stat().st_ino)

        def receiving() -> list[cl.NodeProcess]:
            return [n for n in cluster.nodes if any((Path(n.data_dir) / "tmp").iterdir())]

        cl.wait_until(lambda: bool(receiving()), 60, "a node receiving a chunk", 0.01)
        victim = receiving()[0]
        victim.kill()
        writer.wait(300)
    finally:
        writer.kill()
    got = (fresh() / "nodecrash").read_bytes()
    if writer.returncode == 0:
        assert len(got) == 192 * MiB
    else:
        assert got == b"old"
    restart(cluster, victim)
    assert not list((Path(victim.data_dir) / "tmp").iterdir())  # emptied at start
    assert chunkfs("repair", cluster.dsn).returncode == 0
    _expire_sessions_and_gc(cluster)
    _assert_no_orphans(cluster)
    assert_clean(cluster)


def test_a_node_with_no_room_is_skipped_and_no_room_anywhere_is_enospc(
    pg_server, mkfs_template, tmp_path, mount_factory
):
    name, dsn = pg_server.new_database(template=mkfs_template)
    c = cl.Cluster(tmp_path / "small", nodes=3, replicas=2, dsn=dsn, mkfs=False)
    try:
        c.start()
        full = cl.NodeProcess(dsn, tmp_path / "small" / "full", capacity=1).start()
        c.nodes.append(full)
        c.wait_nodes_active()
        m = mount_factory(dsn)
        data = [os.urandom(5000 + i) for i in range(20)]
        for i, d in enumerate(data):
            (m / f"f{i}").write_bytes(d)
        assert not files_on_disk(c)[full.node_id]  # it refused (507) and others took the chunks
        assert [(m / f"f{i}").read_bytes() for i in range(20)] == data
        for n in c.nodes[:3]:
            n.stop()
        c.nodes[:3] = [cl.NodeProcess(dsn, n.data_dir, n.port, capacity=1) for n in c.nodes[:3]]
        for n in c.nodes[:3]:
            n.start()
        c.wait_nodes_active()
        with pytest.raises(OSError) as info:
            (m / "nospace").write_bytes(os.urandom(10_000))
        assert info.value.errno == errno.ENOSPC
        assert [(m / f"f{i}").read_bytes() for i in range(20)] == data
        m.unmount()
        assert chunkfs("gc", dsn).returncode == 0
        proc = chunkfs("fsck", dsn, "--verify")
        assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout
    finally:
        try:
            c.stop()
        finally:
            pg_server.drop(name)


def test_postgresql_restarted_under_a_mount(tmp_path, fuse_ready):
    with cl.Cluster(tmp_path / "pg", nodes=2, replicas=2, fast=True) as c:
        m = c.mount(tmp_path / "pg-mnt", ["pg_timeout=3"])
        (m / "before").write_bytes(b"x" * 1000)
        c.postgres.pause()
        try:
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                os.stat(m / "new-name")
            assert info.value.errno == errno.EIO
            assert time.monotonic() - start < 30
        finally:
            c.postgres.resume()
        cl.wait_until(lambda: _works(m), 60, "the mount to work again", 0.5)
        assert (m / "before").read_bytes() == b"x" * 1000
        (m / "after").write_bytes(b"y" * 1000)
        assert (m / "after").read_bytes() == b"y" * 1000
        # Metadata commits asynchronously, but what close() and fsync (of a
        # file or of a directory) returned for survives a crash of PostgreSQL.
        os.mkdir(m / "made")
        os.mknod(m / "made" / "fifo", 0o600 | stat.S_IFIFO)
        dfd = os.open(m / "made", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        c.postgres.pause(crash=True)
        c.postgres.resume()
        cl.wait_until(lambda: _works(m), 60, "the mount to work again", 0.5)
        assert stat.S_ISFIFO(os.lstat(m / "made" / "fifo").st_mode)
        assert (m / "after").read_bytes() == b"y" * 1000
        proc = chunkfs("fsck", c.dsn, "--verify")
        assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout


def test_a_postgresql_that_stops_answering_gives_eio_after_pg_timeout(tmp_path, fuse_ready):
    with cl.Cluster(tmp_path / "pg", nodes=2, replicas=2, fast=True) as c:
        m = c.mount(tmp_path / "pg-mnt", ["pg_timeout=2"])
        (m / "before").write_bytes(b"x" * 1000)
        seen: list[tuple[int | None, float]] = []

        def probe() -> None:
            # The second lookup needs a new connection: its login must not
            # wait longer than pg_timeout either.
            for name in ("new-name", "other-name"):
                start, code = time.monotonic(), None
                try:
                    os.stat(m / name)
                except OSError as exc:
                    code = exc.errno
                seen.append((code, time.monotonic() - start))

        c.postgres.freeze()  # connections stay open, nothing answers
        try:
            # In a thread: without a deadline the stat would wait for the thaw.
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            prober.join(20)
        finally:
            c.postgres.thaw()
        prober.join(60)
        assert [code for code, _ in seen] == [errno.EIO, errno.EIO], seen
        assert all(2 <= seconds < 6 for _, seconds in seen), seen
        cl.wait_until(lambda: _works(m), 60, "the mount to work again", 0.5)
        (m / "after").write_bytes(b"y" * 1000)
        assert (m / "after").read_bytes() == b"y" * 1000
        assert (m / "before").read_bytes() == b"x" * 1000


def _works(m: cl.Mount) -> bool:
    try:
        os.listdir(m)
        return True
    except OSError:
        return False


def test_rebalance_after_a_seventh_node_then_drain_and_remove(cluster, mounted, fresh):
    files = {mounted / "rb" / f"f{i}": os.urandom(2000 + i) for i in range(100)}
    (mounted / "rb").mkdir()
    for p, d in files.items():
        p.write_bytes(d)
    assert chunkfs("rebalance", cluster.dsn).returncode == 0  # start from ring placement
    total = sum(map(len, holders(cluster, list(files))))
    seventh = cl.NodeProcess(cluster.dsn, Path(cluster.workdir) / "node-seventh").start()
    cluster.nodes.append(seventh)
    try:
        cluster.wait_nodes_active()
        proc = chunkfs("rebalance", cluster.dsn)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        copied = int(proc.stdout.split(" replicas copied")[0].rsplit(" ", 1)[1])
        moved = sum(seventh.node_id in h for h in holders(cluster, list(files)))
        assert copied >= moved > 0
        assert 0.05 < moved / total < 0.3, (moved, total)  # about 1/7
        assert all(len(h) == 2 for h in holders(cluster, list(files)))
        read_back(files, fresh(), mounted / "rb")
        assert_clean(cluster)
        proc = chunkfs("node", "drain", cluster.dsn, seventh.node_id)
        assert proc.returncode == 0 and f"drained {seventh.node_id}:" in proc.stdout, (
            proc.stdout + proc.stderr
        )
        assert not any(seventh.node_id in h for h in holders(cluster, list(files)))
        assert chunkfs("node", "remove", cluster.dsn, seventh.node_id).returncode == 0
    finally:
        cluster.nodes.remove(seventh)
        seventh.stop()
    read_back(files, fresh(), mounted / "rb")
    # A node that holds the only copy of a chunk is not removed.
    c = chunks_of(mounted / "rb" / "f0")[0]
    keep, other = c["nodes"]
    cl.run_sql(
        cluster.dsn,
        f"DELETE FROM chunk_replicas WHERE node_id = '{other}' AND chunk_id = '\\x{c['sha256']}'",
    )
    proc = chunkfs("node", "remove", cluster.dsn, keep)
    assert proc.returncode == 1 and "is live and not drained" in proc.stderr
    proc = chunkfs("node", "remove", "--force", cluster.dsn, keep)
    assert proc.returncode == 1 and "only copy" in proc.stderr
    assert chunkfs("repair", cluster.dsn).returncode == 0
    assert chunkfs("gc", cluster.dsn).returncode == 0
    assert_clean(cluster)
