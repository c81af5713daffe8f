"""The throwaway-cluster helpers: each starts what it says and leaves nothing behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import cluster as cl


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((cl.HOST, port)) == 0


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if cl._pid_alive(p)]


# ------------------------------------------------------------- Postgres


def test_postgres_starts_restarts_and_stops_without_a_trace() -> None:
    pg = cl.Postgres(fast=True).start()
    try:
        data_dir, port = pg.dir, pg.port
        assert data_dir is not None and port is not None
        dsn = pg.create_database("lifecycle")
        cl.run_sql(dsn, "CREATE TABLE t (x int)", "INSERT INTO t VALUES (42)")
        assert cl.run_sql(dsn, "SHOW fsync")[0] == [{"fsync": "off"}]
        pid = pg._postmaster_pid()
        pg.restart()
        assert pg._postmaster_pid() != pid
        assert cl.run_sql(dsn, "SELECT x FROM t")[0] == [{"x": 42}]
        pid = pg._postmaster_pid()
        assert pid is not None
    finally:
        pg.stop()
    assert not data_dir.exists()
    assert not cl._pid_alive(pid)
    assert not _port_open(port)
    pg.stop()  # a second stop is a no-op


def test_postgres_listens_on_loopback_only() -> None:
    with cl.Postgres(fast=True) as pg:
        rows = cl.run_sql(pg.dsn, "SHOW listen_addresses")[0]
        assert rows == [{"listen_addresses": "127.0.0.1"}]


def test_missing_server_binaries_give_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cl, "_has_server_binaries", lambda bindir: False)
    with pytest.raises(cl.ClusterError) as info:
        cl.find_pg_bindir()
    assert "\n" not in str(info.value)
    assert "postgresql" in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:p@h:5/postgres", "postgresql://u:p@h:5/other"),
        ("postgresql://u@h:5/postgres?sslmode=disable", "postgresql://u@h:5/other?sslmode=disable"),
        ("host=h port=5 dbname=postgres user=u", "host=h port=5 dbname=other user=u"),
        ("host=h port=5", "host=h port=5 dbname=other"),
    ],
)
def test_database_dsn(dsn: str, expected: str) -> None:
    assert cl.database_dsn(dsn, "other") == expected


def test_database_names_must_be_identifiers() -> None:
    with pytest.raises(ValueError):
        cl.create_database("postgresql://u@127.0.0.1:1/postgres", 'x"; DROP DATABASE postgres; --')


# --------------------------------------------------------------- nodes


def test_node_restart_keeps_its_id_port_and_data_dir(node_factory) -> None:
    node = node_factory()
    node_id, port = node.node_id, node.port
    assert node_id and node.health()["node_id"] == node_id

    assert node.stop() == 0  # SIGTERM is a clean stop
    assert not node.running and not _port_open(port)

    node.start()
    assert (node.node_id, node.port) == (node_id, port)

    node.kill()
    assert node.returncode == -9
    node.start()
    assert node.node_id == node_id


def test_node_that_cannot_start_is_reported_and_not_left_running(tmp_path: Path) -> None:
    dead_dsn = f"postgresql://postgres@{cl.HOST}:{cl.free_ports(1)[0]}/nothing"
    node = cl.NodeProcess(dead_dsn, tmp_path / "node", ready_timeout=15)
    with pytest.raises(cl.ClusterError, match="port"):
        node.start()
    assert not node.running


# -------------------------------------------------------------- cluster


def test_cluster_stops_everything_it_started(tmp_path: Path, fuse_ready: None) -> None:
    with cl.Cluster(tmp_path / "c", nodes=2, fast=True) as c:
        assert c.postgres is not None
        pg_dir = c.postgres.dir
        assert len({n.node_id for n in c.nodes}) == 2
        m = c.mount(tmp_path / "mnt")
        (m / "f").write_bytes(b"abc")
        assert (m / "f").read_bytes() == b"abc"
        pids = [n.pid for n in c.nodes if n.pid is not None] + m._pids
        assert m._pids, "the mount daemon was not found"
        assert len(pids) == len(c.nodes) + len(m._pids), "a node had no pid"
    assert not _alive(pids)
    assert not m.mounted
    assert pg_dir is not None and not pg_dir.exists()


def test_cluster_start_failure_cleans_up(tmp_path: Path) -> None:
    c = cl.Cluster(tmp_path / "c", nodes=1, fast=True, node_capacity=-1)
    with pytest.raises(cl.ClusterError):
        c.start()  # the node refuses a negative capacity
    assert c.postgres is not None and c.postgres.dir is None
    assert not any(n.running for n in c.nodes)


def test_mount_on_a_non_empty_dir_fails_clearly(
    cluster: cl.Cluster, tmp_path: Path, fuse_ready: None
) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "x").write_text("x")
    m = cl.Mount(cluster.dsn, tmp_path / "mnt", log_path=tmp_path / "mnt.log")
    with pytest.raises(cl.ClusterError, match="not empty"):
        m.mount()
    assert not m.mounted


def test_unexpected_errors_are_the_records_logged_with_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    m = cl.Mount("postgresql://u@h/db", tmp_path / "mnt", [f"ro,log={log}"])
    assert m.log_path == log and m.options == (f"ro,log={log}",)  # the option is kept
    log.write_text(
        "chunkfs: mount output before the daemon logs\n"
        "2024-05-01 10:00:00,001 INFO chunkfs.fuse.mount: mounted\n"
        "2024-05-01 10:00:00,002 ERROR chunkfs.vfs: inode 5: unflushed data kept\n"
    )
    start = m.log_offset()
    assert m.unexpected_errors() == []
    record = (
        "2024-05-01 10:00:01,003 ERROR chunkfs.fuse.operations: unexpected error in read\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in read\n'
        "KeyError: 7"
    )
    with log.open("a") as f:
        f.write(record + "\n2024-05-01 10:00:02,004 INFO chunkfs.fuse.mount: unmounted\n")
    assert m.unexpected_errors() == [record]
    assert m.unexpected_errors(since=start) == [record]
    assert m.unexpected_errors(since=m.log_offset()) == []


def test_fixtures_give_six_nodes_and_two_mounts_that_agree(
    cluster: cl.Cluster,
    mounted: cl.Mount,
    mount_factory,
) -> None:
    nodes = cluster.status()["nodes"]
    assert len([n for n in nodes if n["status"] == "active"]) == 6
    d = mounted / "fixtures"
    d.mkdir()
    (d / "f").write_bytes(os.urandom(1000))
    second = mount_factory(cluster.dsn)
    assert (second / "fixtures" / "f").read_bytes() == (d / "f").read_bytes()
    assert cl.is_mounted(second) and cl.is_mounted(mounted)
