"""Tests of the storage node's HTTP API and of NodeClient, against real node
processes (``chunkfs node``) registered in a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import cluster as cl
from chunkfs import layout, wire
from chunkfs.errors import ChunkMissing, DigestMismatch, NodeFull, StorageError
from chunkfs.nodeclient import NodeClient


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sql(dsn: str, statement: str) -> list[dict[str, Any]]:
    return cl.run_sql(dsn, statement)[0]


def batch_body(blobs: list[bytes], ids: list[str] | None = None) -> bytes:
    ids = ids or [sha(b) for b in blobs]
    return b"".join(
        i.encode() + len(b).to_bytes(8, "big") + b for i, b in zip(ids, blobs, strict=False)
    )


def chunk_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "chunks").glob("*/*"))


@pytest.fixture
def token(pg_dsn: str) -> str:
    return sql(pg_dsn, "SELECT cluster_token FROM settings")[0]["cluster_token"]


@pytest.fixture
def node(node_factory: Any, pg_dsn: str) -> cl.NodeProcess:
    return node_factory(pg_dsn)


@pytest.fixture
async def http(node: cl.NodeProcess, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def client(node: cl.NodeProcess, token: str) -> AsyncIterator[NodeClient]:
    async with NodeClient(node.url, token) as c:
        yield c


# ------------------------------------------------------------- chunk I/O


async def test_put_then_get_whole_chunk(http: httpx.AsyncClient) -> None:
    data = os.urandom(3 << 20)  # several pieces: streamed both ways
    r = await http.put(f"/v1/chunks/{sha(data)}", content=data)
    assert r.status_code == 201
    r = await http.put(f"/v1/chunks/{sha(data)}", content=data)
    assert r.status_code == 200  # already present
    r = await http.get(f"/v1/chunks/{sha(data)}")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(data))
    assert r.content == data


async def test_range_reads(http: httpx.AsyncClient) -> None:
    data = bytes(range(256)) * 40
    url = f"/v1/chunks/{sha(data)}"
    assert (await http.put(url, content=data)).status_code == 201

    r = await http.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert r.content == data[10:20]

    r = await http.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10000-{len(data) - 1}/{len(data)}"
    assert r.content == data[10000:]

    r = await http.get(url, headers={"Range": "bytes=10230-99999"})  # end clipped
    assert (r.status_code, r.content) == (206, data[10230:])

    r = await http.get(url, headers={"Range": "bytes=-5"})
    assert (r.status_code, r.content) == (206, data[-5:])


async def test_range_beyond_end_is_416(http: httpx.AsyncClient) -> None:
    data = b"0123456789"
    url = f"/v1/chunks/{sha(data)}"
    await http.put(url, content=data)
    for rng in ("bytes=10-", "bytes=10-20", "bytes=500-600"):
        r = await http.get(url, headers={"Range": rng})
        assert r.status_code == 416, rng
        assert r.headers["content-range"] == "bytes */10"


async def test_malformed_range_is_400(http: httpx.AsyncClient) -> None:
    data = b"0123456789"
    url = f"/v1/chunks/{sha(data)}"
    await http.put(url, content=data)
    for rng in ("bytes=5-2", "bytes=x-", "items=0-1", "bytes=0-1,3-4", "bytes=-"):
        r = await http.get(url, headers={"Range": rng})
        assert r.status_code == 400, rng


async def test_digest_mismatch_is_422_and_nothing_stored(
    http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    claimed = sha(b"what the id says")
    r = await http.put(f"/v1/chunks/{claimed}", content=b"something else entirely")
    assert r.status_code == 422
    assert (await http.head(f"/v1/chunks/{claimed}")).status_code == 404
    assert chunk_files(node.data_dir) == []
    assert list((node.data_dir / "tmp").iterdir()) == []
    assert (await http.get("/v1/health")).json()["chunk_count"] == 0


async def test_malformed_id_is_400(http: httpx.AsyncClient, node: cl.NodeProcess) -> None:
    good = sha(b"x")
    bad_ids = [good.upper(), good[:-1], good + "0", "g" * 64, "..%2F..%2Fnode_id", "..%2Fchunks"]
    for bad in bad_ids:
        for method in ("GET", "HEAD", "DELETE"):
            r = await http.request(method, f"/v1/chunks/{bad}")
            assert r.status_code == 400, (method, bad)
        r = await http.put(f"/v1/chunks/{bad}", content=b"x")
        assert r.status_code == 400, bad
    r = await http.get("/v1/chunks", params={"after": "nope"})
    assert r.status_code == 400
    assert chunk_files(node.data_dir) == []


async def test_missing_or_wrong_token_is_401(node: cl.NodeProcess, token: str) -> None:
    data = b"secret"
    url = f"{node.url}/v1/chunks/{sha(data)}"
    async with httpx.AsyncClient(timeout=30) as anon:
        wrong = {"Authorization": "Bearer " + "0" * 64}
        for headers in ({}, wrong, {"Authorization": token}):  # last: no "Bearer"
            assert (await anon.put(url, content=data, headers=headers)).status_code == 401
            assert (await anon.get(url, headers=headers)).status_code == 401
            assert (await anon.get(f"{node.url}/v1/chunks", headers=headers)).status_code == 401
            assert (await anon.get(f"{node.url}/metrics", headers=headers)).status_code == 401
        r = await anon.get(f"{node.url}/v1/health")
        assert r.status_code == 200
        assert r.json()["chunk_count"] == 0  # nothing was stored without the token


async def test_health_reports_space_and_clock(
    http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    await http.put(f"/v1/chunks/{sha(b'abc')}", content=b"abc")
    h = (await http.get("/v1/health")).json()
    assert h["status"] == "ok"
    assert h["node_id"] == node.node_id
    assert h["used_bytes"] == 3 and h["chunk_count"] == 1
    assert h["capacity_bytes"] > 0 and 0 <= h["free_bytes"] <= h["capacity_bytes"]
    assert isinstance(h["now_ns"], int) and h["now_ns"] > 1_600_000_000 * 10**9


async def test_head(http: httpx.AsyncClient) -> None:
    data = b"h" * 1234
    url = f"/v1/chunks/{sha(data)}"
    assert (await http.head(url)).status_code == 404
    await http.put(url, content=data)
    r = await http.head(url)
    assert r.status_code == 200
    assert r.headers["content-length"] == "1234"
    assert r.content == b""


async def test_delete_without_guard(http: httpx.AsyncClient) -> None:
    data = b"to delete"
    url = f"/v1/chunks/{sha(data)}"
    await http.put(url, content=data)
    assert (await http.delete(url)).status_code == 204
    assert (await http.head(url)).status_code == 404
    assert (await http.delete(url)).status_code == 404


async def test_delete_with_before_ns_guard(http: httpx.AsyncClient) -> None:
    data = b"gc candidate"
    url = f"/v1/chunks/{sha(data)}"
    decided = (await http.get("/v1/health")).json()["now_ns"]  # gc decides here ...
    await http.put(url, content=data)  # ... and a writer uses the chunk after that
    r = await http.delete(url, params={"before_ns": decided})
    assert r.status_code == 409
    assert (await http.head(url)).status_code == 200  # kept
    later = (await http.get("/v1/health")).json()["now_ns"]
    assert (await http.delete(url, params={"before_ns": later})).status_code == 204
    assert (await http.head(url)).status_code == 404
    assert (await http.delete(url, params={"before_ns": "soon"})).status_code == 400


async def test_listing_pages(http: httpx.AsyncClient) -> None:
    blobs = [f"listed {i}".encode() for i in range(25)]
    assert (await http.post("/v1/chunks:batch", content=batch_body(blobs))).status_code == 200
    expected = sorted(sha(b) for b in blobs)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params = {"limit": 10} | ({"after": after} if after else {})
        r = await http.get("/v1/chunks", params=params)
        assert r.status_code == 200
        page = r.json()
        seen += page["chunks"]
        pages += 1
        after = page["next"]
        if after is None:
            break
        assert after == page["chunks"][-1]
    assert seen == expected
    assert pages == 3
    r = await http.get("/v1/chunks")
    assert r.json() == {"chunks": expected, "next": None}
    assert (await http.get("/v1/chunks", params={"limit": 0})).status_code == 400


async def test_batch_put(http: httpx.AsyncClient, node: cl.NodeProcess) -> None:
    blobs = [os.urandom(n) for n in (0, 1, 4096, 70_000, 5, 5)]
    blobs[5] = blobs[4]  # the same chunk twice
    await http.put(f"/v1/chunks/{sha(blobs[3])}", content=blobs[3])
    r = await http.post("/v1/chunks:batch", content=batch_body(blobs))
    assert r.status_code == 200
    assert r.json() == {"created": [True, True, True, False, True, False]}
    for b in blobs:
        got = await http.get(f"/v1/chunks/{sha(b)}")
        assert (got.status_code, got.content) == (200, b)
    assert len(chunk_files(node.data_dir)) == 5


async def test_batch_with_bad_chunk_is_422_and_stores_none(
    http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    blobs = [b"one", b"two", b"three"]
    ids = [sha(b) for b in blobs]
    ids[1] = sha(b"not two")
    r = await http.post("/v1/chunks:batch", content=batch_body(blobs, ids))
    assert r.status_code == 422
    assert chunk_files(node.data_dir) == []
    r = await http.post("/v1/chunks:batch", content=batch_body(blobs)[:-2])  # truncated
    assert r.status_code == 400
    assert chunk_files(node.data_dir) == []


async def test_batch_get(http: httpx.AsyncClient, client: NodeClient) -> None:
    blobs = [os.urandom(n) for n in (1, 700, 70_000)]
    await http.post("/v1/chunks:batch", content=batch_body(blobs))
    ids = [bytes.fromhex(sha(b)) for b in blobs]
    assert await client.get_batch(ids) == dict(zip(ids, blobs, strict=False))
    with pytest.raises(ChunkMissing):
        await client.get_batch([*ids, bytes.fromhex(sha(b"absent"))])
    r = await http.get("/v1/chunks:batch", params={"ids": "../etc"})
    assert r.status_code == 400
    r = await http.get("/v1/chunks:batch", params={"ids": ",".join([sha(b"x")] * 65)})
    assert r.status_code == 400


async def test_put_length_errors(http: httpx.AsyncClient, node: cl.NodeProcess, token: str) -> None:
    data = b"0123456789"
    url = f"/v1/chunks/{sha(data)}"

    async def chunked() -> AsyncIterator[bytes]:
        yield data

    r = await http.put(url, content=chunked())  # Transfer-Encoding: chunked
    assert r.status_code == 411
    # Declared larger than the 2 GiB limit: refused before any byte is read.
    reply = await raw_request(
        node,
        f"PUT {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {3 << 30}\r\n\r\n".encode(),
    )
    assert reply.startswith(b"HTTP/1.1 413")
    # Shorter than declared: the client gives up half way.
    reply = await raw_request(
        node,
        f"PUT {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: 10\r\n\r\n01234".encode(),
        half_close=True,
    )
    assert reply.startswith(b"HTTP/1.1 400")
    # The answer can go out while the upload's task still removes its temp file.
    with trio.fail_after(5):
        while list((node.data_dir / "tmp").iterdir()):  # noqa: ASYNC110 - nothing to wait on
            await trio.sleep(0.05)
    assert chunk_files(node.data_dir) == []


async def raw_request(node: cl.NodeProcess, request: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes to the node and return what it answers (until it closes or pauses)."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", node.port))
        await sock.send(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in reply:
                data = await sock.recv(65536)
                if not data:
                    break
                reply += data
        return reply


async def test_full_node_is_507(node_factory: Any, pg_dsn: str, token: str) -> None:
    small = node_factory(pg_dsn, capacity=1000)
    async with NodeClient(small.url, token) as c:
        data = os.urandom(2000)
        async with httpx.AsyncClient(timeout=30) as h:
            r = await h.put(
                f"{small.url}/v1/chunks/{sha(data)}",
                content=data,
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 507
        with pytest.raises(NodeFull):
            await c.put(bytes.fromhex(sha(data)), data, len(data))
        assert await c.put(hashlib.sha256(b"fits").digest(), b"fits", 4) is True
        assert (await c.health())["free_bytes"] == 996


async def test_metrics(http: httpx.AsyncClient) -> None:
    data = b"counted"
    await http.put(f"/v1/chunks/{sha(data)}", content=data)
    await http.get(f"/v1/chunks/{sha(data)}")
    await http.get(f"/v1/chunks/{sha(b'absent')}")
    r = await http.get("/metrics")
    assert r.status_code == 200
    text = r.text
    assert 'chunkfs_node_requests_total{method="PUT",status="201"} 1.0' in text
    assert 'chunkfs_node_requests_total{method="GET",status="404"} 1.0' in text
    assert "chunkfs_node_chunks 1.0" in text
    assert "chunkfs_node_received_bytes_total 7.0" in text
    sent = [line for line in text.splitlines() if line.startswith("chunkfs_node_sent_bytes_total")]
    assert sent and float(sent[0].split()[1]) >= 7


# ------------------------------------------------------- process lifecycle


async def test_restart_keeps_node_id_and_chunks(
    http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    data = os.urandom(10_000)
    await http.put(f"/v1/chunks/{sha(data)}", content=data)
    first_id = node.node_id
    node.stop()
    node.start()
    assert node.node_id == first_id
    assert (node.data_dir / "node_id").read_text().strip() == first_id
    async with httpx.AsyncClient(base_url=node.url, headers=http.headers, timeout=30) as again:
        r = await again.get(f"/v1/chunks/{sha(data)}")
        assert (r.status_code, r.content) == (200, data)
        h = (await again.get("/v1/health")).json()
        assert (h["chunk_count"], h["used_bytes"]) == (1, 10_000)


async def test_node_registered_with_150_vnodes(node: cl.NodeProcess, pg_dsn: str) -> None:
    rows = sql(pg_dsn, "SELECT node_id, base_url, status FROM storage_nodes")
    assert rows == [{"node_id": node.node_id, "base_url": node.url, "status": "active"}]
    vnodes = sql(
        pg_dsn, f"SELECT count(*) AS n FROM hash_ring_vnodes WHERE node_id = '{node.node_id}'"
    )
    assert vnodes[0]["n"] == 150


async def test_heartbeat_moves_last_heartbeat(node: cl.NodeProcess, pg_dsn: str) -> None:
    query = f"SELECT last_heartbeat FROM storage_nodes WHERE node_id = '{node.node_id}'"
    first = sql(pg_dsn, query)[0]["last_heartbeat"]
    with trio.fail_after(15):  # heartbeats come every 3 s
        while sql(pg_dsn, query)[0]["last_heartbeat"] == first:  # noqa: ASYNC110 - polls the database
            await trio.sleep(0.25)
    assert sql(pg_dsn, query)[0]["last_heartbeat"] > first


async def test_sigterm_marks_node_stopped(node: cl.NodeProcess, pg_dsn: str) -> None:
    assert node.stop() == 0  # clean exit
    rows = sql(pg_dsn, f"SELECT status FROM storage_nodes WHERE node_id = '{node.node_id}'")
    assert rows == [{"status": "stopped"}]
    node.start()
    rows = sql(pg_dsn, f"SELECT status FROM storage_nodes WHERE node_id = '{node.node_id}'")
    assert rows == [{"status": "active"}]


async def test_temp_files_cleaned_at_start(node: cl.NodeProcess) -> None:
    node.stop()
    leftovers = [node.data_dir / "tmp" / f"{sha(b'x')}.{i}" for i in range(3)]
    for p in leftovers:
        p.write_bytes(b"an upload cut short")
    node.start()
    assert list((node.data_dir / "tmp").iterdir()) == []


async def test_chunk_files_are_0600(http: httpx.AsyncClient, node: cl.NodeProcess) -> None:
    await http.put(f"/v1/chunks/{sha(b'one')}", content=b"one")
    await http.post("/v1/chunks:batch", content=batch_body([b"two", b"three"]))
    files = chunk_files(node.data_dir)
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.parent.name == f.name[:2]
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700


async def test_a_rotten_chunk_is_never_served_whole(
    http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    data = b"will rot on disk"
    await http.put(f"/v1/chunks/{sha(data)}", content=data)
    path = next(f for f in chunk_files(node.data_dir) if f.name == sha(data))
    path.write_bytes(b"will r0t on disk")
    r = await http.get(f"/v1/chunks/{sha(data)}")
    assert r.status_code == 404 and "quarantined" in r.text
    assert (await http.get(f"/v1/chunks/{sha(data)}")).status_code == 404
    assert sha(data) not in (await http.get("/v1/chunks")).json()["chunks"]


def run_node_command(dsn: str, data_dir: Path, port: int) -> tuple[int, list[str]]:
    """Run ``chunkfs node`` to its exit; return its exit code and its stderr
    lines that are not log records (those start with a date)."""
    proc = cl.run_chunkfs(
        "node",
        "--dsn",
        dsn,
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{port}",
        timeout=60,
        check=False,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if not line[:4].isdigit()]
    return proc.returncode, lines


async def test_busy_port_is_a_one_line_error(
    node: cl.NodeProcess, pg_dsn: str, tmp_path: Path
) -> None:
    code, lines = run_node_command(pg_dsn, tmp_path / "other", node.port)
    assert code != 0
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{node.port}" in lines[0]
    rows = sql(pg_dsn, "SELECT node_id FROM storage_nodes")
    assert rows == [{"node_id": node.node_id}]  # the failed one never registered


async def test_dead_dsn_is_a_one_line_error(tmp_path: Path) -> None:
    dead_port, port = cl.free_ports(2)
    dead = f"postgresql://postgres@127.0.0.1:{dead_port}/nothing"
    code, lines = run_node_command(dead, tmp_path / "n", port)
    assert code != 0
    assert len(lines) == 1 and "cannot connect to PostgreSQL" in lines[0]


async def test_serve_node_in_process_on_port_0(pg_dsn: str, token: str, tmp_path: Path) -> None:
    from chunkfs.node.server import NodeOptions, serve_node

    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_node(
                pg_dsn, str(tmp_path / "n"), NodeOptions(zone="rack1"), task_status=task_status
            )
        )
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with NodeClient(url, token) as c:
            node_id = (await c.health())["node_id"]
            assert await c.put(hashlib.sha256(b"in").digest(), b"in", 2) is True
        rows = sql(pg_dsn, "SELECT base_url, zone, status FROM storage_nodes")
        assert rows == [{"base_url": url, "zone": "rack1", "status": "active"}]
        nursery.cancel_scope.cancel()
    rows = sql(pg_dsn, f"SELECT status FROM storage_nodes WHERE node_id = '{node_id}'")
    assert rows == [{"status": "stopped"}]


# ------------------------------------------------------------ NodeClient


async def test_client_round_trip(client: NodeClient) -> None:
    data = os.urandom(300_000)
    cid = hashlib.sha256(data).digest()
    assert await client.put(cid, data, len(data)) is True
    assert await client.put(cid, data, len(data)) is False
    assert await client.get(cid) == data
    assert await client.get(cid, 1000, 2000) == data[1000:2000]
    assert await client.get(cid, 299_990) == data[299_990:]
    assert await client.get(cid, 5, 5) == b""
    async with client.stream(cid, 100, 200_100) as pieces:
        assert b"".join([p async for p in pieces]) == data[100:200_100]


async def test_client_streams_a_put(client: NodeClient) -> None:
    data = os.urandom(2_500_000)
    cid = hashlib.sha256(data).digest()

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    assert await client.put(cid, body(), len(data)) is True
    assert await client.get(cid) == data


async def test_client_batch_list_delete(client: NodeClient) -> None:
    blobs = [f"small {i}".encode() for i in range(12)]
    items = {hashlib.sha256(b).digest(): b for b in blobs}
    assert await client.put_batch(items) == dict.fromkeys(items, True)
    first_two = dict(list(items.items())[:2])
    assert await client.put_batch(first_two) == dict.fromkeys(first_two, False)
    page = await client.list(limit=5)
    everything = list(page.ids)
    while page.after is not None:
        page = await client.list(after=page.after, limit=5)
        everything += page.ids
    assert everything == sorted(items)
    victim = next(iter(items))
    health = await client.health()
    assert health["chunk_count"] == 12
    assert await client.delete(victim, before_ns=health["now_ns"] - 10**12) is False  # refused
    assert await client.get(victim) == blobs[0]  # kept
    assert await client.delete(victim) is True
    assert await client.delete(victim) is True  # already gone
    with pytest.raises(ChunkMissing):
        await client.get(victim)


async def test_client_maps_errors(client: NodeClient, node: cl.NodeProcess) -> None:
    absent = hashlib.sha256(b"absent").digest()
    with pytest.raises(ChunkMissing, match=node.url):
        await client.get(absent)
    with pytest.raises(DigestMismatch, match="422"):
        await client.put(absent, b"not absent", 10)
    with pytest.raises(DigestMismatch):
        await client.put_batch({absent: b"nope"})
    present = b"0123456789"
    await client.put(hashlib.sha256(present).digest(), present, 10)
    with pytest.raises(StorageError, match="416"):
        await client.get(hashlib.sha256(present).digest(), 50, 60)


async def test_client_wrong_token_and_dead_node(node: cl.NodeProcess) -> None:
    async with NodeClient(node.url, "f" * 64) as bad:
        with pytest.raises(StorageError, match="401"):
            await bad.get(hashlib.sha256(b"x").digest())
    port = cl.free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    async with NodeClient(url, "f" * 64, timeout=2) as dead:
        with pytest.raises(StorageError, match=url):
            await dead.health()


async def test_client_reads_through_a_node_restart_and_names_a_dead_node(
    client: NodeClient, node: cl.NodeProcess
) -> None:
    data = os.urandom(3 * layout.BLOCK_SIZE)
    cid = layout.chunk_id_of(layout.block_digests(data))
    await client.put(cid, data, len(data))
    assert await client.get(cid, 0, layout.BLOCK_SIZE) == data[: layout.BLOCK_SIZE]
    node.stop()
    node.start()  # the connection the client kept is closed now: it takes a new one
    assert await client.get(cid, layout.BLOCK_SIZE) == data[layout.BLOCK_SIZE :]
    node.stop()
    with pytest.raises(StorageError, match=node.url):
        await client.get(cid, 0, 10)


async def test_derive_builds_a_chunk_from_a_base_and_the_changed_blocks(
    client: NodeClient, http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    block = layout.BLOCK_SIZE
    base = os.urandom(4 * block)
    base_id = layout.chunk_id_of(layout.block_digests(base))
    assert await client.put(base_id, base, len(base)) is True
    # Block 2 rewritten and the chunk grown by half a block.
    new_block, tail = os.urandom(block), os.urandom(block // 2)
    new = base[: 2 * block] + new_block + base[3 * block :] + tail
    new_id = layout.chunk_id_of(layout.block_digests(new))
    body = new_block + tail
    sources = [0, 1, None, 3, None]
    assert await client.derive(new_id, len(new), base_id, sources, body, len(body)) is True
    assert (await http.get(f"/v1/chunks/{new_id.hex()}")).content == new
    # Again: present, so the body is read and dropped.
    assert await client.derive(new_id, len(new), base_id, sources, body, len(body)) is False
    # A wrong id stores nothing (and nothing is left in tmp/).
    wrong = layout.chunk_id_of(layout.block_digests(new[::-1]))
    with pytest.raises(DigestMismatch):
        await client.derive(wrong, len(new), base_id, sources, body, len(body))
    # A base the node lacks is a 404, and the connection stays usable.
    with pytest.raises(ChunkMissing):
        await client.derive(wrong, len(new), bytes(32), sources, body, len(body))
    # Sources that do not fit the length, or point past the base, are a 400.
    for bad_sources in ([0, 1, None], [0, 1, None, 9, None]):
        with pytest.raises(StorageError, match="HTTP 400"):
            await client.derive(wrong, len(new), base_id, bad_sources, body, len(body))
    assert not list((Path(node.data_dir) / "tmp").iterdir())
    assert sorted(p.name for p in chunk_files(Path(node.data_dir))) == sorted(
        [base_id.hex(), new_id.hex()]
    )


async def test_blocks_of_zeros_cross_no_network_and_take_no_disk(
    client: NodeClient, http: httpx.AsyncClient, node: cl.NodeProcess
) -> None:
    block = layout.BLOCK_SIZE
    one = os.urandom(block)
    data = bytes(3 * block) + one + bytes(60 * block + 5)  # zeros, a block, zeros
    chunk_id = layout.chunk_id_of(layout.block_digests(data))
    sources = [wire.ZERO] * 3 + [wire.BODY] + [wire.ZERO] * 61
    assert wire.encode_sources(sources) == "z*3,-,z*61"
    assert await client.derive(chunk_id, len(data), None, sources, one, len(one)) is True
    path = Path(node.data_dir) / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()
    assert path.stat().st_size == len(data)
    assert path.stat().st_blocks * 512 < 2 * block  # the zeros are holes
    assert (await http.get(f"/v1/chunks/{chunk_id.hex()}")).content == data
    # Sources naming base blocks need a base.
    with pytest.raises(StorageError, match="HTTP 400"):
        await client.derive(chunk_id, len(data), None, [0] * 64 + [wire.BODY], one, len(one))


def test_a_node_bounds_its_connections_and_cuts_off_a_slow_head(node_factory: Any) -> None:
    from chunkfs.serving import HEAD_TIMEOUT_S

    node = node_factory(extra_args=["--max-connections", "3"])
    conns = [socket.create_connection((cl.HOST, node.port), timeout=5) for _ in range(4)]
    try:
        for conn in conns:
            conn.sendall(b"GET /v1/health HTTP/1.1\r\nHo")  # a head that never ends
        # Connections that arrive together are taken in no set order (and
        # one the harness left may still hold a place): those over the bound
        # are closed at once, the others wait for their heads.
        assert select.select(conns, [], [], 5)[0]
        time.sleep(1)
        over = select.select(conns, [], [], 0)[0]
        for conn in over:
            with contextlib.suppress(ConnectionResetError):  # closed with the head unread
                assert conn.recv(100) == b""
        held = [c for c in conns if c not in over]
        assert 1 <= len(held) <= 3
        start = time.monotonic()
        for conn in held:
            conn.settimeout(HEAD_TIMEOUT_S + 10)
            while conn.recv(4096):  # whatever it says, the node ends the connection
                pass
        assert time.monotonic() - start < HEAD_TIMEOUT_S + 5
    finally:
        for conn in conns:
            conn.close()
    assert node.health()["status"] == "ok"  # room again once they are gone
