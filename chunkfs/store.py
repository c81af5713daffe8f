"""Chunk objects on storage nodes: put on R replicas, get with fail-over.

``ChunkStore`` picks nodes with the consistent-hash ring over the live
nodes, pushes each chunk to R distinct nodes (the next node on the ring takes
the place of one that fails), reads from the recorded holders in turn, and
checks every byte it reads: a whole chunk against its id, a window of a
large chunk against the digests of the 1 MiB blocks it covers.
Content-addressed chunks never change, so what it caches is valid for ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio
from cachetools import LRUCache

from . import errors, layout, metrics, ring, wire
from .meta import ChunkRef, Meta, NodeInfo
from .nodeclient import NodeClient, http_client

log = logging.getLogger(__name__)

# Chunks up to this size are fetched whole (and verified) and cached.
WHOLE_FETCH_MAX = 8 << 20
# Larger chunks are fetched in aligned windows of this size (whole blocks):
# a random read costs one. When a chunk is read window after window, the
# windows up to READ_AHEAD past the one read are fetched in the background,
# SPAN windows to a request, the requests concurrently, so that the nodes
# read ahead while the reader consumes (measured, cold 1 GiB cat: 8 ahead in
# spans of 4, 406-443 MiB/s; 16 and 4, 413-539; 32 and 8, 473-611; 32 and
# 16, 358-601; 48 and 8, 246-365, its windows evicted before being read).
WINDOW = 1 << 20
READ_AHEAD = 32
# Reads in a row, each within two windows of where the last one ended, that
# make a reader sequential: a random reader's next read lands that near now
# and then (5 windows of a chunk's), rarely this many times running.
SEQUENTIAL_AFTER = 4
SPAN = 8
# Fetched bytes up to this size are hashed on the event loop; more (a whole
# window included), in a worker thread, so that two cores hash at once.
HASH_INLINE_MAX = 256 << 10
# A window is one block, so it is checked and kept by the block's digest.
assert WINDOW == layout.BLOCK_SIZE
# Chunks up to this size are read into memory for the upload; larger ones stream.
INLINE_PUT_MAX = 4 << 20
# Chunks up to this size travel in one batch request per node.
BATCH_ITEM_MAX = 256 << 10
# A suspect node (one that did not answer) is probed this often (seconds),
# each probe bounded by PROBE_TIMEOUT_S.
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Delta:
    """A chunk as the blocks a node can build it from (``chunkfs.wire``'s
    block sources): blocks of ``base`` (a chunk of the same file's last
    version, or None), blocks of zeros, and the others' bytes in ``data``.
    """

    base: ChunkRef | None
    sources: tuple[wire.Source, ...]
    data: bytes


@dataclass(frozen=True)
class PutItem:
    """A chunk to upload: its id, its length in bytes, its ring position
    (unsigned), and either its bytes or a function returning a fresh async
    stream of them (called once per replica); with a ``delta``, the nodes
    holding its base build it from that and the changed blocks, and the
    others get the whole bytes.
    """

    chunk_id: bytes
    length: int
    position: int
    data: bytes | None = None
    stream: Callable[[], AsyncIterable[bytes]] | None = None
    delta: Delta | None = None

    def content(self) -> bytes | AsyncIterable[bytes]:
        """The bytes, or a fresh stream of them."""
        if self.data is not None:
            return self.data
        if self.stream is None:
            raise ValueError("a PutItem needs data or a stream")
        return self.stream()


class BlockKeeper(Protocol):
    """Local storage for blocks by digest (``core.content_cache.ContentCache``)."""

    def keep(self, digest: bytes, data: bytes | bytearray) -> bool:
        """Keep ``data``, whose SHA-256 is ``digest``; whether it was kept."""
        ...

    def pread(self, digest: bytes | None, offset: int, length: int) -> bytes | None:
        """Bytes of the entry ``digest`` (None when not kept)."""
        ...


# Bytes handed out without a copy: a window is a view of the span it came in.
Blob = bytes | bytearray | memoryview


class _ChunkCache:
    """Fetched chunks (and windows of large ones) up to a byte budget,
    least recently used out first; a blob over the whole budget is not kept.
    """

    def __init__(self, budget: int) -> None:
        self._blobs: LRUCache[object, Blob] = LRUCache(maxsize=budget, getsizeof=len)

    def get(self, key: object) -> Blob | None:
        """The blob kept under ``key`` (now the most recently used), or None."""
        return self._blobs.get(key)

    def put(self, key: object, data: Blob) -> None:
        """Keep ``data`` under ``key``, the least recently used going first."""
        if len(data) <= self._blobs.maxsize:
            self._blobs[key] = data

    def discard(self, key: object) -> None:
        """Forget the blob under ``key``, if any."""
        self._blobs.pop(key, None)

    def __contains__(self, key: object) -> bool:
        """Whether a blob is kept under ``key`` (not counted as a use)."""
        return key in self._blobs


@dataclass(slots=True)
class _Stream:
    """A reader of one chunk: the window it wants next, and how many of its
    reads in a row went near there.
    """

    next_window: int
    streak: int


class ChunkStore:
    """Chunk I/O against the cluster's storage nodes.

    ``replicas`` is R; ``timeout`` (seconds) bounds every node request;
    ``cache_bytes`` bounds the read cache in memory; with ``kept``, the
    blocks that readers fetch out of order are also kept there (on local
    disk), since a random reader comes back to them; ``tls`` checks
    ``https://`` nodes (default: ``nodeclient.tls_context()``). Node
    membership and the ring are re-read from PostgreSQL at most every
    ``refresh_s`` seconds.

    A node that cannot be reached or times out is *suspect* from then on:
    writes pass it over and reads skip it, until it answers a health probe
    (one every ``PROBE_INTERVAL_S``, in the background), so a dead host costs
    one timeout rather than one per request.
    """

    def __init__(
        self,
        meta: Meta,
        token: str,
        replicas: int,
        *,
        timeout: float = 30.0,
        cache_bytes: int = 128 << 20,
        refresh_s: float = 5.0,
        max_requests: int = 16,
        kept: BlockKeeper | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._meta = meta
        self._kept = kept
        self._token = token
        self.replicas = replicas
        self._timeout = timeout
        self._refresh_s = refresh_s
        self._refreshed_at = -1e9
        self._nodes: dict[str, NodeInfo] = {}
        self._zones: dict[str, str] = {}  # node id -> zone
        self._writable: set[str] = set()
        self._clients: dict[str, NodeClient] = {}
        self._ring = ring.Ring([])
        self._cache = _ChunkCache(cache_bytes)
        self._inflight: dict[object, trio.Event] = {}
        # Per chunk: the window its last reader wants next, and how many of
        # its reads in a row went near there.
        self._streams: dict[bytes, _Stream] = {}
        self._background: set[trio.CancelScope] = set()
        self._limiter = trio.CapacityLimiter(max_requests)
        self._http = http_client(
            timeout, tls, httpx.Limits(max_connections=64, max_keepalive_connections=32)
        )
        self._suspects: set[str] = set()
        self._closed = False

    @classmethod
    async def for_maintenance(cls, meta: Meta) -> ChunkStore:
        """A store for gc, fsck and replica moves: settings and nodes read
        fresh from PostgreSQL, 60 s per node request. Close it with ``aclose``.
        """
        settings = await meta.registry.settings()
        store = cls(meta, settings.cluster_token, settings.replicas, timeout=60.0)
        await store.refresh(force=True)
        return store

    async def aclose(self) -> None:
        """Close every node connection."""
        self._closed = True
        for scope in list(self._background):
            scope.cancel()
        for client in self._clients.values():
            await client.aclose()
        await self._http.aclose()

    # ---------------------------------------------------------- topology

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the nodes and the ring when they are older than ``refresh_s``."""
        if not force and time.monotonic() - self._refreshed_at < self._refresh_s:
            return
        nodes = await self._meta.registry.nodes()
        vnodes = await self._meta.registry.ring_vnodes()
        self._nodes = {n.node_id: n for n in nodes}
        self._zones = {n.node_id: n.zone or n.node_id for n in nodes}
        self._writable = {n.node_id for n in nodes if n.writable}
        for n in nodes:
            client = self._clients.get(n.node_id)
            if client is None or client.base_url != n.base_url:
                if client is not None:
                    await client.aclose()
                self._clients[n.node_id] = NodeClient(
                    n.base_url, self._token, timeout=self._timeout, client=self._http
                )
        self._ring = ring.Ring(vnodes)
        self._refreshed_at = time.monotonic()

    def nodes(self) -> list[NodeInfo]:
        """Every registered node as of the last refresh."""
        return list(self._nodes.values())

    def live_nodes(self) -> set[str]:
        """Ids of the nodes with a fresh heartbeat at the last refresh."""
        return {i for i, n in self._nodes.items() if n.live}

    def zone(self, node_id: str) -> str:
        """The failure domain of a node (a node registered without one, or
        unknown, is a zone of its own).
        """
        return self._zones.get(node_id, node_id)

    def writable_zones(self) -> set[str]:
        """The zones that have writable nodes."""
        return {self._zones[i] for i in self._writable}

    def zones_wanted(self) -> int:
        """How many distinct zones a chunk's R replicas should span: R, or
        fewer when fewer zones have writable nodes.
        """
        return min(self.replicas, len(self.writable_zones()))

    def placement(self, pos: int, count: int | None = None) -> list[str]:
        """The writable nodes (live, not draining) in ring order from ring
        position ``pos`` (the first ``count``, or all), one per zone first:
        the first R own a chunk placed there, in R distinct zones when R
        zones are writable, and the rest take over when owners fail.
        """
        return self._ring.owners(pos, count, self._writable - self._suspects, self._zones)

    def _answered(self, node_id: str, *, up: int = 0, down: int = 0) -> None:
        """Count a request the node answered, with the chunk bytes it took
        (``up``) and gave (``down``).
        """
        metrics.NODE_REQUESTS.labels(node_id, "ok").inc()
        if up:
            metrics.NODE_BYTES.labels("up").inc(up)
        if down:
            metrics.NODE_BYTES.labels("down").inc(down)

    def _failed(self, node_id: str, exc: errors.ChunkfsError) -> None:
        """Count a failed request: a node that did not answer becomes suspect."""
        metrics.NODE_REQUESTS.labels(node_id, type(exc).__name__).inc()
        if not isinstance(exc, errors.NodeUnreachable) or node_id in self._suspects:
            return
        log.warning("node %s is suspect until it answers a health probe: %s", node_id, exc)
        self._suspects.add(node_id)
        self._spawn(self._probe, node_id)

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn(*args)`` in the background until it returns or the store
        closes; what it raises is logged.
        """

        async def run() -> None:
            with trio.CancelScope() as scope:
                self._background.add(scope)
                try:
                    await fn(*args)
                except Exception:  # a background task must not raise
                    log.exception("background task %s failed", fn.__name__)
                finally:
                    self._background.discard(scope)

        trio.lowlevel.spawn_system_task(run)

    async def _probe(self, node_id: str) -> None:
        """Probe a suspect node's health until it answers (or the store closes)."""
        while node_id in self._suspects and not self._closed:
            await trio.sleep(PROBE_INTERVAL_S)
            try:
                with trio.fail_after(PROBE_TIMEOUT_S):
                    await self.client(node_id).health()
            except (errors.ChunkfsError, trio.TooSlowError):
                continue
            except Exception as exc:  # noqa: BLE001 - a malformed answer: probe again
                log.warning("health probe of node %s failed: %s", node_id, exc)
                continue
            log.info("node %s answers again", node_id)
            self._suspects.discard(node_id)

    def client(self, node_id: str) -> NodeClient:
        """The HTTP client of a registered node. Raises ``StorageError``."""
        try:
            return self._clients[node_id]
        except KeyError:
            raise errors.StorageError(f"unknown storage node {node_id}") from None

    # --------------------------------------------------------------- put

    async def put(self, items: Sequence[PutItem]) -> dict[bytes, list[str]]:
        """Store every item durably on R distinct live nodes, concurrently.

        Small chunks bound for the same node travel in one batch request (a
        small file makes six chunks); a node that fails a batch is replaced,
        chunk by chunk, by the next nodes on the ring. Returns ``{chunk_id:
        [node_id, ...]}``, the nodes that acknowledged each chunk (fsynced).
        Raises ``NoSpace`` when nodes refused for lack of room and
        ``StorageError`` when fewer than R nodes took a chunk.
        """
        await self.refresh()
        unique = list({i.chunk_id: i for i in items}.values())
        done: dict[bytes, list[str]] = {i.chunk_id: [] for i in unique}
        tried: dict[bytes, set[str]] = {i.chunk_id: set() for i in unique}
        batches: dict[str, list[PutItem]] = {}
        for item in unique:
            if item.data is not None and item.length <= BATCH_ITEM_MAX:
                for node_id in self.placement(item.position, self.replicas):
                    batches.setdefault(node_id, []).append(item)
                    tried[item.chunk_id].add(node_id)
        with errors.unwrapped():
            async with trio.open_nursery() as nursery:
                for node_id, batch in batches.items():
                    nursery.start_soon(self._put_batch, node_id, batch, done)
                for item in unique:
                    if item.delta is not None:
                        nursery.start_soon(
                            self._put_delta, item, done[item.chunk_id], tried[item.chunk_id]
                        )
            async with trio.open_nursery() as nursery:
                for item in unique:
                    if len(done[item.chunk_id]) < self.replicas:
                        nursery.start_soon(
                            self._put_one, item, done[item.chunk_id], tried[item.chunk_id]
                        )
        return done

    async def _put_batch(
        self, node_id: str, batch: list[PutItem], done: dict[bytes, list[str]]
    ) -> None:
        try:
            async with self._limiter:
                await self.client(node_id).put_batch(
                    {i.chunk_id: i.data for i in batch if i.data is not None}
                )
        except errors.ChunkfsError as exc:
            self._failed(node_id, exc)
            log.warning("batch put of %d chunks on node %s failed: %s", len(batch), node_id, exc)
            return  # each chunk falls back to the next nodes on the ring
        self._answered(node_id, up=sum(i.length for i in batch))
        for item in batch:
            done[item.chunk_id].append(node_id)

    async def _put_delta(self, item: PutItem, done: list[str], tried: set[str]) -> None:
        """Have R writable nodes build the item from its delta: the holders
        of its base (or, without one, the item's owners on the ring); a node
        that cannot is left for ``_put_one`` to fill.
        """
        assert item.delta is not None
        delta, base = item.delta, item.delta.base
        if base is None:
            targets = self.placement(item.position, self.replicas)
        else:
            holders = [n for n in self._ring.walk(base.position) if n in base.nodes]
            targets = [n for n in holders if n in self._writable][: self.replicas]

        async def derive(client: NodeClient) -> None:
            await client.derive(
                item.chunk_id,
                item.length,
                None if base is None else base.chunk_id,
                delta.sources,
                delta.data,
                len(delta.data),
            )

        tried.update(targets)
        async with trio.open_nursery() as nursery:
            for node_id in targets:
                nursery.start_soon(self._send, "derive", node_id, item, derive, done, [], True)

    async def _put_one(self, item: PutItem, done: list[str], tried: set[str]) -> None:
        """Bring one chunk to R replicas, walking the ring past ``tried`` nodes."""

        async def put(client: NodeClient) -> None:
            await client.put(item.chunk_id, item.content(), item.length)

        # A stream may fetch base blocks as it goes (a delta's whole chunk),
        # which takes a limiter token of its own: streamed puts go unlimited
        # (a file has at most six, R times; the connection pool bounds them).
        limited = item.data is not None

        candidates = [n for n in self.placement(item.position) if n not in tried]
        failures: list[errors.ChunkfsError] = []
        while len(done) < self.replicas and candidates:
            wanted = self.replicas - len(done)
            batch, candidates = candidates[:wanted], candidates[wanted:]
            async with trio.open_nursery() as nursery:
                for node_id in batch:
                    nursery.start_soon(
                        self._send, "put", node_id, item, put, done, failures, limited
                    )
        if len(done) < self.replicas:
            if failures and all(isinstance(f, errors.NodeFull) for f in failures):
                raise errors.NoSpace("no storage node has room for the chunk")
            detail = f"; last error: {failures[-1]}" if failures else ""
            raise errors.StorageError(
                f"chunk {item.chunk_id.hex()[:16]} reached {len(done)} of "
                f"{self.replicas} replicas ({len(self.live_nodes())} live nodes){detail}"
            )

    async def _send(
        self,
        what: str,
        node_id: str,
        item: PutItem,
        request: Callable[[NodeClient], Awaitable[None]],
        done: list[str],
        failures: list[errors.ChunkfsError],
        limited: bool,
    ) -> None:
        """Make one ``request`` that stores ``item`` on ``node_id`` (holding
        a token of the request limiter when ``limited``): the node joins
        ``done`` when it answers, else the failure is logged and kept in
        ``failures``.
        """
        limit = self._limiter if limited else contextlib.nullcontext()
        try:
            async with limit:
                await request(self.client(node_id))
        except errors.ChunkfsError as exc:
            self._failed(node_id, exc)
            log.warning(
                "%s of chunk %s on node %s failed: %s", what, item.chunk_id.hex()[:16], node_id, exc
            )
            failures.append(exc)
        else:
            sent = item.length if item.delta is None or what == "put" else len(item.delta.data)
            self._answered(node_id, up=sent)
            done.append(node_id)

    # --------------------------------------------------------------- get

    async def read(self, ref: ChunkRef, start: int, end: int, then: ChunkRef | None = None) -> Blob:
        """Bytes ``[start, end)`` of a chunk (offsets within the chunk); a
        view of the cached window when they lie in one. ``then`` is the
        chunk that follows in the file: a sequential reader nearing the end
        of this one has its first windows read ahead.

        Tries each node holding the chunk in turn, and skips one whose bytes
        do not match their digests. Raises ``StorageError`` when no replica
        serves good bytes.
        """
        if end <= start:
            return b""
        if ref.hole:
            return bytes(end - start)
        if ref.length <= WHOLE_FETCH_MAX:
            data = await self._cached(ref.chunk_id, lambda: self._fetch(ref, 0, ref.length))
            return data[start:end]
        out: list[Blob] = []
        first, last = start // WINDOW, (end - 1) // WINDOW
        for w in range(first, last + 1):
            w_start, w_end = w * WINDOW, min((w + 1) * WINDOW, ref.length)
            lo, hi = max(start, w_start) - w_start, min(end, w_end) - w_start
            digest = self._block_digest(ref, w)
            in_memory = self._cache.get((ref.chunk_id, w)) is not None
            piece: Blob | None = None
            if digest is not None and not in_memory:
                piece = self._kept_piece(digest, lo, hi)
            # The kernel's reads of a sequential reader arrive a little out
            # of order: one within two windows of the last is in sequence.
            stream = self._streams.get(ref.chunk_id)
            near = stream is not None and stream.next_window - 2 <= w <= stream.next_window + 2
            streak = stream.streak + 1 if stream is not None and near else 0
            if piece is None:
                if streak >= SEQUENTIAL_AFTER:
                    self._sequential(ref, w, then)
                piece = (await self._window(ref, w, digest))[lo:hi]
            if len(self._streams) > 4096:
                self._streams.clear()
            self._streams[ref.chunk_id] = _Stream(w + 1, streak)
            out.append(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    async def _window(self, ref: ChunkRef, w: int, digest: bytes | None) -> Blob:
        """Window ``w`` of a large chunk, from memory or fetched on its own
        and then also kept on local disk under ``digest`` (its SHA-256; None:
        not kept): a window read ahead is not, since a sequential reader does
        not come back to it.
        """
        w_start, w_end = w * WINDOW, min((w + 1) * WINDOW, ref.length)

        async def fetch() -> Blob:
            data = await self._fetch(ref, w_start, w_end)
            if digest is not None and self._kept is not None:
                self._kept.keep(digest, data)
            return data

        return await self._cached((ref.chunk_id, w), fetch)

    def _block_digest(self, ref: ChunkRef, w: int) -> bytes | None:
        """The SHA-256 of window ``w`` when blocks are kept, else None."""
        if self._kept is None or ref.blocks is None:
            return None
        return ref.blocks[w * layout.DIGEST_SIZE : (w + 1) * layout.DIGEST_SIZE]

    def _kept_piece(self, digest: bytes, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of the kept block ``digest``, or None."""
        assert self._kept is not None
        try:
            data = self._kept.pread(digest, lo, hi - lo)
        except OSError as exc:
            log.warning("kept block %s unreadable: %s", digest.hex()[:16], exc)
            return None
        return data if data is not None and len(data) == hi - lo else None

    def _sequential(self, ref: ChunkRef, w: int, then: ChunkRef | None) -> None:
        """A sequential reader is at window ``w`` of ``ref`` (``then`` the
        chunk after it): drop behind it, read ahead of it (into ``then``
        when near the end).
        """
        # The reader does not come back (the kernel's page cache has the
        # bytes), and the windows it has yet to read must not be the ones evicted.
        self._cache.discard((ref.chunk_id, w - 2))
        self._read_ahead(ref, w, w + READ_AHEAD)
        past = w + READ_AHEAD - _windows(ref)
        if past >= 0 and then and not then.hole and then.length > WHOLE_FETCH_MAX:
            self._streams[then.chunk_id] = _Stream(0, SEQUENTIAL_AFTER)
            self._read_ahead(then, 0, past)

    def _read_ahead(self, ref: ChunkRef, w: int, last: int) -> None:
        """Start fetching, in the background, the windows ``w`` to ``last``
        of ``ref`` that are neither cached nor asked for, in spans of
        ``SPAN`` (the last may reach past ``last``, so that a reader moving
        on asks for a whole span at a time); a failure shows when the
        window is read.
        """
        count = _windows(ref)
        first = w
        while first <= min(last, count - 1):
            keys = []
            for n in range(first, min(first + SPAN, count)):
                key = (ref.chunk_id, n)
                if key in self._cache or key in self._inflight:
                    break
                keys.append(key)
            if keys:
                events = [trio.Event() for _ in keys]
                self._inflight.update(zip(keys, events, strict=True))
                self._spawn(self._span, ref, first, keys, events)
            first += max(len(keys), 1)

    async def _span(
        self, ref: ChunkRef, first: int, keys: list[tuple[bytes, int]], events: list[trio.Event]
    ) -> None:
        """Bring windows ``first`` on (``keys``, marked in flight with
        ``events``) into the cache in one request.
        """
        try:
            end = min((first + len(keys)) * WINDOW, ref.length)
            with contextlib.suppress(errors.ChunkfsError):
                data = await self._fetch(ref, first * WINDOW, end)
                view = memoryview(data)  # a cached window keeps its whole span alive
                for i, key in enumerate(keys):
                    self._cache.put(key, view[i * WINDOW : (i + 1) * WINDOW])
        finally:
            for key, event in zip(keys, events, strict=True):
                del self._inflight[key]
                event.set()

    def holds(self, ref: ChunkRef) -> bool:
        """Whether reading chunk ``ref`` whole needs no new request: a hole,
        an empty chunk, or one whole in memory or being fetched.
        """
        return (
            ref.hole
            or not ref.length
            or ref.chunk_id in self._cache
            or ref.chunk_id in self._inflight
        )

    async def prefetch(self, refs: Sequence[ChunkRef]) -> None:
        """Bring small chunks into the cache with as few requests as possible:
        one batch request per node (per ``wire.BATCH_GET_MAX`` chunks), the nodes chosen so that few cover all
        the chunks (greedy set cover). Chunks a batch does not bring back
        good are left for ``read`` to fetch one by one, from any replica.
        """
        await self.refresh()
        todo = {
            r.chunk_id: r
            for r in refs
            if 0 < r.length <= WHOLE_FETCH_MAX
            and not r.hole
            and self._cache.get(r.chunk_id) is None
            and r.chunk_id not in self._inflight
        }
        live = self.live_nodes() - self._suspects
        plan: dict[str, list[ChunkRef]] = {}
        while todo:
            counts: dict[str, int] = {}
            for ref in todo.values():
                for n in ref.nodes:
                    if n in live:
                        counts[n] = counts.get(n, 0) + 1
            if not counts:
                break
            best = max(sorted(counts), key=counts.__getitem__)
            plan[best] = [r for r in todo.values() if best in r.nodes]
            for ref in plan[best]:
                del todo[ref.chunk_id]
        if len(plan) < 1 or sum(map(len, plan.values())) < 2:
            return  # a single chunk: read() fetches it as cheaply
        async with trio.open_nursery() as nursery:
            for node_id, batch in plan.items():
                for at in range(0, len(batch), wire.BATCH_GET_MAX):
                    nursery.start_soon(
                        self._get_batch, node_id, batch[at : at + wire.BATCH_GET_MAX]
                    )

    async def _get_batch(self, node_id: str, batch: list[ChunkRef]) -> None:
        try:
            async with self._limiter:
                found = await self.client(node_id).get_batch([r.chunk_id for r in batch])
        except errors.ChunkfsError as exc:
            self._failed(node_id, exc)
            log.warning("batch read from node %s failed: %s", node_id, exc)
            return
        self._answered(node_id, down=sum(map(len, found.values())))
        for ref in batch:
            data = found.get(ref.chunk_id)
            if data is not None and layout.id_matches(ref.chunk_id, data):
                self._cache.put(ref.chunk_id, data)
            else:
                log.error(
                    "chunk %s from node %s does not match its digest",
                    ref.chunk_id.hex()[:16],
                    node_id,
                )

    async def _cached(self, key: object, fetch: Callable[[], Awaitable[Blob]]) -> Blob:
        """One fetch per key at a time; later callers wait and share it."""
        while True:
            data = self._cache.get(key)
            if data is not None:
                return data
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()
        event = self._inflight[key] = trio.Event()
        try:
            data = await fetch()
            self._cache.put(key, data)
            return data
        finally:
            del self._inflight[key]
            event.set()

    async def _fetch(self, ref: ChunkRef, start: int, end: int) -> bytes | bytearray:
        await self.refresh()
        whole = start == 0 and end == ref.length
        last_error: Exception | None = None
        for node_id in self._read_order(ref, start):
            try:
                async with self._limiter:
                    data = await self.client(node_id).get(ref.chunk_id, start, end)
            except errors.ChunkfsError as exc:
                last_error = exc
                self._failed(node_id, exc)
                log.warning(
                    "read of chunk %s from node %s failed: %s",
                    ref.chunk_id.hex()[:16],
                    node_id,
                    exc,
                )
                continue
            if len(data) != end - start or not (
                _verified(ref, start, data, whole)
                if len(data) <= HASH_INLINE_MAX
                else await trio.to_thread.run_sync(_verified, ref, start, data, whole)
            ):
                last_error = errors.DigestMismatch(f"node {node_id} returned bad bytes")
                log.error(
                    "chunk %s from node %s does not match its digest",
                    ref.chunk_id.hex()[:16],
                    node_id,
                )
                continue
            self._answered(node_id, down=len(data))
            return data
        why = last_error or f"no holder answers (recorded: {', '.join(ref.nodes) or 'none'})"
        raise errors.StorageError(
            f"no replica of chunk {ref.chunk_id.hex()[:16]} could be read: {why}"
        )

    def _read_order(self, ref: ChunkRef, start: int = 0) -> list[str]:
        """Holders, live ones first, in ring order from the chunk's position;
        the live ones turned by one for each span of a large chunk, so that
        a sequential reader's requests go to all its replicas at once.
        Suspects are left out: a read that has only them fails at once
        rather than after a timeout per request, until a probe clears them.
        """
        holders = set(ref.nodes)
        live = self.live_nodes() - self._suspects
        walk = [n for n in self._ring.walk(ref.position) if n in holders]
        walk += sorted(holders - set(walk))
        up = [n for n in walk if n in live]
        if up:
            turn = start // (SPAN * WINDOW) % len(up)
            up = up[turn:] + up[:turn]
        return up + [n for n in walk if n not in live and n not in self._suspects]


def _windows(ref: ChunkRef) -> int:
    """How many windows chunk ``ref`` has."""
    return (ref.length + WINDOW - 1) // WINDOW


def _verified(ref: ChunkRef, start: int, data: bytes | bytearray, whole: bool) -> bool:
    """Whether ``data``, read at ``start`` in the chunk, matches its digests:
    the chunk's id for a whole chunk (``layout.id_matches``), else the digest
    of every 1 MiB block it covers (a read starts at a block boundary and
    ends at one or at the end of the chunk).
    """
    if whole:
        return layout.id_matches(ref.chunk_id, data)
    end = start + len(data)
    if (
        ref.blocks is None
        or start % layout.BLOCK_SIZE
        or (end != ref.length and end % layout.BLOCK_SIZE)
    ):
        return False  # nothing to check these bytes against
    size = layout.DIGEST_SIZE
    for n, pos in enumerate(
        range(0, len(data), layout.BLOCK_SIZE), start=start // layout.BLOCK_SIZE
    ):
        if (
            hashlib.sha256(data[pos : pos + layout.BLOCK_SIZE]).digest()
            != ref.blocks[n * size : (n + 1) * size]
        ):
            return False
    return True
