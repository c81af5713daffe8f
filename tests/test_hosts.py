"""chunkfs across simulated hosts (network namespaces, ``hosts.py``):
PostgreSQL on one host, two TLS nodes on each of three hosts that listen on
every interface and advertise their URL, mounts on two more. Replicas land
in distinct zones; links are cut and restored while the mounts read and
write; a host that lost its disk is repaired.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

import cluster as cl
from chunkfs.errors import StorageError
from chunkfs.nodeclient import NodeClient
from hosts import Host, Network, make_certificates

MiB = 1 << 20
NODE_TIMEOUT_S = 5
PG_TIMEOUT_S = 4
# Bounds of what must not hang (seconds): a read or write while a host is
# cut off costs at most a connect timeout and the node timeout.
CUT_BOUND_S = 4 * NODE_TIMEOUT_S


def write_tree(root: Path, count: int, tag: str) -> dict[Path, bytes]:
    """``count`` files under ``root`` (sizes from empty to 3 MiB), synced."""
    files = {}
    for i in range(count):
        size = (0, 1, 4096, 70_000, 3 * MiB + 17)[i % 5]
        path = root / f"d{i % 4}" / f"{tag}{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        files[path] = data
    return files


def read_all(files: dict[Path, bytes], mount: Path, written: Path) -> float:
    """Read every file through ``mount`` and compare; the seconds it took."""
    start = time.monotonic()
    for path, data in files.items():
        assert (mount / path.relative_to(written)).read_bytes() == data, path
    return time.monotonic() - start


def replicas_by_zone(dsn: str, where: Host) -> list[dict[str, int]]:
    """Per chunk object: its replica count and the zones they span."""
    return cl.call_in_netns(
        where.netns,
        lambda: cl.run_sql(
            dsn,
            "SELECT count(*) AS replicas, count(DISTINCT n.zone) AS zones "
            "FROM chunk_replicas r JOIN storage_nodes n USING (node_id) GROUP BY r.chunk_id",
        )[0],
    )


def test_a_cluster_across_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fuse_ready: None
) -> None:
    with Network() as net, contextlib.ExitStack() as stack:
        db = net.add("db")
        node_hosts = [net.add(f"n{i}") for i in (1, 2, 3)]
        m1, m2 = net.add("m1"), net.add("m2")
        certs = make_certificates(tmp_path, {h.name: h.address for h in node_hosts})
        pg = cl.Postgres(fast=True, host=db.address, netns=db.netns, clients=net.subnet)
        stack.callback(pg.stop)
        pg.start()
        dsn = cl.call_in_netns(m1.netns, lambda: pg.create_database("fs"))
        assert cl.run_chunkfs("mkfs", dsn, netns=m1.netns, check=False).returncode == 0

        # Every node listens on all interfaces, on the same port as its peers
        # on other hosts, and advertises the URL the others reach it at.
        proc = cl.run_chunkfs(
            "node", "--dsn", dsn, "--data-dir", str(tmp_path / "x"), "--listen", "0.0.0.0:7000",
            netns=node_hosts[0].netns, check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "--advertise" in proc.stderr.strip().splitlines()[-1]
        nodes: dict[str, list[cl.NodeProcess]] = {}
        for h in node_hosts:
            cert, key = certs.certs[h.name]
            for port in (7000, 7001):
                node = cl.NodeProcess(
                    dsn,
                    tmp_path / f"{h.name}-{port}",
                    port,
                    listen_host="0.0.0.0",
                    advertise=f"https://{h.address}:{port}",
                    netns=h.netns,
                    ca_file=str(certs.ca),
                    extra_args=["--zone", h.name, "--tls-cert", str(cert), "--tls-key", str(key)],
                )
                stack.callback(node.stop)
                nodes.setdefault(h.name, []).append(node.start())
        status = cl.run_chunkfs("status", dsn, "--json", netns=m1.netns, check=False)
        assert status.returncode == 0, status.stderr
        registered = {(n["url"], n["zone"]) for n in json.loads(status.stdout)["nodes"]}
        assert registered == {(n.url, h) for h, ns in nodes.items() for n in ns}

        # TLS: plain HTTP gets no answer, and a certificate nobody vouched for is refused.
        n1 = node_hosts[0]
        plain = f"http://{n1.address}:7000/v1/health"
        with pytest.raises((OSError, urllib.error.URLError, http.client.HTTPException)):
            cl.call_in_netns(m1.netns, lambda: urllib.request.urlopen(plain, timeout=5).read())

        async def health_without_the_ca() -> None:
            async with NodeClient(nodes["n1"][0].url, "0" * 64) as client:
                await client.health()

        monkeypatch.delenv("CHUNKFS_NODE_CA", raising=False)
        with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
            cl.call_in_netns(m1.netns, lambda: trio.run(health_without_the_ca))
        monkeypatch.setenv("CHUNKFS_NODE_CA", str(certs.ca))  # for the tools

        options = [
            f"node_ca={certs.ca}",
            f"node_timeout={NODE_TIMEOUT_S}",
            f"pg_timeout={PG_TIMEOUT_S}",
        ]
        mounts = {}
        for h in (m1, m2):
            mount = cl.Mount(
                dsn, tmp_path / f"mnt-{h.name}", options, cache_dir=tmp_path / f"cache-{h.name}",
                netns=h.netns,
            )  # fmt: skip
            stack.callback(mount.unmount)
            mounts[h.name] = mount.mount()
        a, b = mounts["m1"].path, mounts["m2"].path

        files = write_tree(a / "tree", 30, "f")
        spread = replicas_by_zone(dsn, m1)
        assert spread and all(r == {"replicas": 2, "zones": 2} for r in spread), spread
        took = read_all(files, b / "tree", a / "tree")
        print(f"cold read of {len(files)} files through the other host's mount: {took:.2f} s")
        unread = write_tree(a / "unread", 10, "u")

        # Host n1 cut off: the other mount reads files it never read from the
        # other zones, and new files commit there, within the bounds.
        net.cut(n1)
        start = time.monotonic()
        read_all(unread, b / "unread", a / "unread")
        more = write_tree(a / "during", 10, "g")
        cut_took = time.monotonic() - start
        print(f"reads and 10 writes with host n1 cut off: {cut_took:.2f} s")
        assert cut_took < CUT_BOUND_S + 10 * 2  # one timeout, not one per request
        for path, data in more.items():
            assert (b / path.relative_to(a)).read_bytes() == data
        assert all(r["zones"] == 2 for r in replicas_by_zone(dsn, m1))
        # Its disk is lost meanwhile: node n1:7000 comes back empty.
        lost = nodes["n1"][0]
        lost.stop()
        shutil.rmtree(lost.data_dir / "chunks")
        net.restore(n1)
        lost.start()
        cl.wait_until(
            lambda: all(n["status"] == "active" for n in status_nodes(m1, dsn)), 30, "nodes active"
        )
        fsck = cl.run_chunkfs("fsck", dsn, netns=m1.netns, check=False)
        assert fsck.returncode == 1 and "missing" in fsck.stdout, fsck.stdout
        repair = cl.run_chunkfs("repair", dsn, netns=m1.netns, check=False)
        assert repair.returncode == 0, repair.stdout + repair.stderr
        fsck = cl.run_chunkfs("fsck", "--verify", dsn, netns=m1.netns, check=False)
        assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout
        assert all(r == {"replicas": 2, "zones": 2} for r in replicas_by_zone(dsn, m1))

        # Two of the three node hosts cut off: a file with a copy on the
        # third reads; one without fails with EIO, after a timeout per node
        # at most (4 nodes), then at once while its holders stay suspect.
        two = {f"t{i}": os.urandom(70_000) for i in range(24)}
        for name, data in two.items():
            (a / name).write_bytes(data)
        net.cut(node_hosts[0])
        net.cut(node_hosts[1])
        reads = []
        for name, data in two.items():
            start = time.monotonic()
            try:
                assert (b / name).read_bytes() == data
                reads.append((0, time.monotonic() - start))
            except OSError as exc:
                reads.append((exc.errno or 0, time.monotonic() - start))
        net.restore(node_hosts[0])
        net.restore(node_hosts[1])
        print(f"reads with two of three node hosts cut off (errno, s): {reads}")
        failed = [s for code, s in reads if code]
        assert failed and {code for code, _ in reads} == {0, errno.EIO}, reads
        assert sum(s > 2 for _, s in reads) <= 4, reads  # one timeout per node
        assert all(s < 2 * NODE_TIMEOUT_S for _, s in reads), reads
        cl.wait_until(
            lambda: all(read_ok(b / name, data) for name, data in two.items()), 30, "reads back"
        )

        # Mount m1 cut off from PostgreSQL: EIO after pg_timeout, then back
        # without a remount.
        net.block(m1, db)
        start = time.monotonic()
        with pytest.raises(OSError) as raised:
            (a / "not-there").stat()
        assert raised.value.errno == errno.EIO
        print(f"a lookup with PostgreSQL cut off failed after {time.monotonic() - start:.1f} s")
        net.unblock(m1, db)
        cl.wait_until(lambda: stat_errno(a / "not-there") == errno.ENOENT, 30, "PostgreSQL back")

        # Two mounts on different hosts race to create one name exclusively.
        outcomes: list[int] = []

        def create(root: Path) -> None:
            try:
                fd = os.open(root / "race", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                outcomes.append(exc.errno or 0)
            else:
                os.close(fd)
                outcomes.append(0)

        threads = [threading.Thread(target=create, args=(root,)) for root in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == [0, errno.EEXIST], outcomes

        # Each mount renames a file of its own over one name, and both close
        # one shared file with their own bytes: one of each wins, whole.
        versions = {root: os.urandom(300_000) for root in (a, b)}
        for root, data in versions.items():
            (root / f"mine-{root.name}").write_bytes(data)
        (a / "shared").write_bytes(b"")
        time.sleep(1.5)  # past entry_timeout: b sees the new names

        def race(root: Path) -> None:
            os.rename(root / f"mine-{root.name}", root / "target")
            with open(root / "shared", "r+b") as f:
                f.write(versions[root])

        threads = [threading.Thread(target=race, args=(root,)) for root in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(1.5)  # past attr_timeout: each mount sees the other's last commit
        for root in (a, b):
            assert (root / "target").read_bytes() in versions.values()
            assert (root / "shared").read_bytes() in versions.values()
            assert not any(name.startswith("mine-") for name in os.listdir(root))
        assert (a / "target").read_bytes() == (b / "target").read_bytes()
        assert (a / "shared").read_bytes() == (b / "shared").read_bytes()

        # A file one mount has open and reads while the other unlinks it:
        # the reader gets its bytes or an error, never other bytes.
        data = os.urandom(2 * MiB)
        (a / "doomed").write_bytes(data)
        time.sleep(1.5)
        with open(b / "doomed", "rb") as reader:
            head = reader.read(4096)
            os.unlink(a / "doomed")
            try:
                rest = reader.read()
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.ESTALE, errno.ENOENT), exc
            else:
                assert head + rest == data
        assert not (a / "doomed").exists()

        assert cl.run_chunkfs("gc", dsn, netns=m1.netns, check=False).returncode == 0
        for mount in mounts.values():
            assert mount.unexpected_errors() == []


def status_nodes(host: Host, dsn: str) -> list[dict[str, object]]:
    proc = cl.run_chunkfs("status", dsn, "--json", netns=host.netns, check=False)
    return list(json.loads(proc.stdout)["nodes"]) if proc.returncode == 0 else []


def read_ok(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def stat_errno(path: Path) -> int:
    try:
        path.stat()
    except OSError as exc:
        return exc.errno or 0
    return 0
