"""Checking a filesystem: metadata invariants, and every replica on its node.

``scan`` walks every chunk object a file uses, in id order, and sorts its
recorded replicas into good ones (on a live node that lists it and, with
``verify``, whose bytes hash to the chunk id) and bad ones, with the reason.
``check`` (``chunkfs fsck``) reports from it; ``chunkfs repair`` and
``chunkfs rebalance`` (``replicas.py``) act on it. Each node's listing is
read alongside (``Listings``), so memory does not grow with the chunks. A replica recorded on a
node that is down is neither: it is not counted, so a chunk needs R good
replicas elsewhere to be healthy, in R distinct zones when R zones are
writable.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .. import errors, layout
from ..meta import Meta
from ..nodeclient import NodeClient
from ..store import ChunkStore

log = logging.getLogger(__name__)
PAGE = 1000  # chunk objects per metadata query, and ids per node listing request
MAX_PAGES = 10_000_000  # bounds every paged walk
VERIFY_CONCURRENCY = 8  # replicas hashed at once

# Why a recorded replica is bad.
MISSING = "missing"  # the node is up but does not hold the chunk
CORRUPT = "corrupt"  # the node's bytes do not hash to the chunk id
UNREADABLE = "unreadable"  # the node failed the read


class Progress(Protocol):
    """How far a walk over the chunk objects is (a tqdm bar fits): ``total``
    is set once known, ``update(n)`` adds ``n`` objects done.
    """

    total: float | None

    def update(self, n: float = 1) -> object:
        """Count ``n`` more objects done."""
        ...


@dataclass
class ObjectState:
    """One chunk object as found: ``good`` and ``bad`` (node id -> reason)
    replicas, and the recorded holders that are down (not checked).
    """

    chunk_id: bytes
    length: int
    position: int  # on the ring (unsigned): where its replicas belong
    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    down: list[str] = field(default_factory=list)


@dataclass
class FsckReport:
    """What ``check`` found: counts, serious problems (each one line) and
    warnings. The filesystem is clean when there are no problems.
    """

    inodes: int = 0
    objects: int = 0
    replicas: int = 0
    under_replicated: int = 0
    lost: int = 0
    zone_shared: int = 0  # chunks whose replicas span fewer zones than they could
    over_replicated: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Whether fsck found no problem (warnings aside)."""
        return not self.problems


class _Cursor:
    """One node's chunk ids, read a page at a time in ascending order."""

    def __init__(self, client: NodeClient) -> None:
        self._client = client
        self._page: list[bytes] = []
        self._pos = 0
        self._after: bytes | None = None
        self._done = False

    async def holds(self, chunk_id: bytes) -> bool:
        """Whether the node lists ``chunk_id``; asked in ascending order."""
        for _ in range(MAX_PAGES):
            self._pos = bisect.bisect_left(self._page, chunk_id, self._pos)
            if self._pos < len(self._page):
                return self._page[self._pos] == chunk_id
            if self._done:
                return False
            page = await self._client.list(after=self._after, limit=PAGE)
            self._page, self._pos, self._after = page.ids, 0, page.after
            self._done = page.after is None
        raise errors.StorageError(f"node {self._client.base_url}: over {MAX_PAGES} pages")


class Listings:
    """What the live nodes hold, read page by page alongside the walk over
    the chunk objects (a merge of sorted lists: one page per node in
    memory, whatever the number of chunks). A node whose listing fails
    counts as down from then on; ``failed`` says why (node id -> error).
    """

    def __init__(self, store: ChunkStore) -> None:
        self._cursors = {n: _Cursor(store.client(n)) for n in sorted(store.live_nodes())}
        self.failed: dict[str, str] = {}

    async def holds(self, node_id: str, chunk_id: bytes) -> bool | None:
        """Whether node ``node_id`` holds ``chunk_id`` (None: the node is
        down or could not be listed). Per node, ids must come ascending.
        """
        cursor = self._cursors.get(node_id)
        if cursor is None or node_id in self.failed:
            return None
        try:
            return await cursor.holds(chunk_id)
        except errors.StorageError as exc:
            self.failed[node_id] = str(exc)
            return None


async def scan(
    meta: Meta,
    store: ChunkStore,
    listings: Listings,
    *,
    verify: bool,
    progress: Progress | None = None,
) -> AsyncIterator[ObjectState]:
    """Yield the state of every chunk object a file uses (see the module doc).
    ``listings`` follows the walk; ``progress`` learns the total,
    then the objects done after each page.
    """
    if progress is not None:
        progress.total = await meta.maintenance.used_object_count()
    after = b""
    for _ in range(MAX_PAGES):
        page = await meta.maintenance.used_objects(after, PAGE)
        if not page:
            return
        states = []
        for obj in page:
            state = ObjectState(obj.chunk_id, obj.length, obj.position)
            for node_id in obj.nodes:
                held = await listings.holds(node_id, obj.chunk_id)
                if held is None:
                    state.down.append(node_id)
                elif held:
                    state.good.append(node_id)
                else:
                    state.bad[node_id] = MISSING
            states.append(state)
        if verify:
            await _verify(store, states)
        for state in states:
            yield state
        if progress is not None:
            progress.update(len(page))
        after = page[-1].chunk_id


async def _verify(store: ChunkStore, states: list[ObjectState]) -> None:
    """Hash every good replica of ``states``; move the bad ones to ``bad``."""
    limiter = trio.CapacityLimiter(VERIFY_CONCURRENCY)

    async def one(state: ObjectState, node_id: str) -> None:
        async with limiter:
            reason = await replica_fault(store, state.chunk_id, node_id)
        if reason is not None:
            state.good.remove(node_id)
            state.bad[node_id] = reason

    async with trio.open_nursery() as nursery:
        for state in states:
            for node_id in list(state.good):
                nursery.start_soon(one, state, node_id)


async def replica_fault(store: ChunkStore, chunk_id: bytes, node_id: str) -> str | None:
    """Read one replica whole and hash it: None when good, else the reason."""
    blocks, digest = layout.BlockHasher(), hashlib.sha256()  # either form of id
    try:
        async with store.client(node_id).stream(chunk_id) as pieces:
            async for piece in pieces:
                blocks.update(piece)
                digest.update(piece)
    except errors.ChunkMissing:
        return MISSING
    except errors.StorageError as exc:
        log.warning("chunk %s on node %s: %s", chunk_id.hex()[:16], node_id, exc)
        return UNREADABLE
    good = chunk_id in (layout.chunk_id_of(blocks.digests()), digest.digest())
    return None if good else CORRUPT


async def check(
    meta: Meta, *, verify: bool = False, progress: Progress | None = None
) -> FsckReport:
    """Check the metadata invariants and every replica (see the module doc).

    ``progress`` follows the walk over the chunk objects.
    Raises ``ChunkfsError`` only when PostgreSQL fails.
    """
    report = FsckReport()
    for p in await meta.maintenance.inode_problems():
        (report.problems if p.serious else report.warnings).append(f"inode {p.ino}: {p.what}")
    report.inodes = (await meta.maintenance.file_totals()).files
    store = await ChunkStore.for_maintenance(meta)
    try:
        replicas, wanted = store.replicas, store.zones_wanted()
        writable = len(store.writable_zones())
        for node in store.nodes():
            if not node.live:
                report.warnings.append(f"node {node.node_id} is down: its replicas are not counted")
        listings = Listings(store)
        async for state in scan(meta, store, listings, verify=verify, progress=progress):
            report.objects += 1
            report.replicas += len(state.good)
            cid = state.chunk_id.hex()
            for node_id, reason in sorted(state.bad.items()):
                report.problems.append(f"chunk {cid}: replica on node {node_id} is {reason}")
            if not state.good:
                report.lost += 1
                report.problems.append(
                    f"chunk {cid}: no good replica"
                    + (f" (holders down: {', '.join(state.down)})" if state.down else "")
                )
            elif len(state.good) < replicas:
                report.under_replicated += 1
                report.problems.append(
                    f"chunk {cid}: {len(state.good)} of {replicas} replicas good"
                )
            elif len(zones := {store.zone(n) for n in state.good}) < wanted:
                report.zone_shared += 1
                report.problems.append(
                    f"chunk {cid}: its replicas lie in {len(zones)} zone(s) "
                    f"({', '.join(sorted(zones))}) of the {writable} writable"
                )
            if len(state.good) > replicas:
                report.over_replicated += 1
                report.warnings.append(
                    f"chunk {cid}: {len(state.good)} replicas, more than {replicas}"
                )
        for node_id, why in listings.failed.items():
            report.problems.append(f"node {node_id} could not be listed: {why}")
    finally:
        await store.aclose()
    return report
