"""Garbage collection: expired upload sessions and unreferenced chunk objects.

A chunk file on a node is deleted only when no live upload session protects
it and either no committed chunk map uses it or no replica record names that
node for it (a copy a failed or superseded move left behind). A writer may
reuse an identical object while gc runs; the node bumps an existing object's
mtime on every PUT, and gc deletes with ``before_ns`` = the node's clock read
before the reference check, so an object put again after that check survives.
A commit names only chunks its still-live session protects (else it fails
with ``UploadLost`` and the writer pushes them again), so a session that
expired, or that a PostgreSQL failover lost, never lets a file name a chunk
gc took.

``collect`` is one pass over every live node through its HTTP API (``chunkfs
gc``); every node also runs ``collect_node`` on its own disk continuously
(``chunkfs.node.reclaim``), so nothing waits for an operator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from .. import errors
from ..meta import Meta
from ..nodeclient import ChunkPage
from ..store import ChunkStore

log = logging.getLogger(__name__)
PAGE = 1000
MAX_PAGES = 1_000_000  # bounds the walk of one node's listing


@dataclass
class GcReport:
    """What a gc run did: sessions expired, objects deleted and kept (counts),
    nodes that could not be reached.
    """

    sessions: int = 0
    deleted: int = 0
    kept: int = 0
    unreachable: int = 0


class NodeChunks(Protocol):
    """What a collection needs of one node's chunks: a ``NodeClient``, or
    the node's own disk (``chunkfs.node.reclaim.LocalChunks``).
    """

    async def clock_ns(self) -> int:
        """The node's clock (ns since the epoch), as its chunk mtimes read."""
        ...

    async def list(self, after: bytes | None = None, limit: int = 1000) -> ChunkPage:
        """Up to ``limit`` chunk ids above ``after``, ascending."""
        ...

    async def delete(self, chunk_id: bytes, before_ns: int | None = None) -> bool:
        """Delete a chunk unless used at or after ``before_ns``; False when kept."""
        ...


async def collect(meta: Meta) -> GcReport:
    """Run one gc pass over every active node; see the module doc."""
    report = GcReport(sessions=await meta.maintenance.expire_sessions())
    await meta.maintenance.forget_commit_marks()
    store = await ChunkStore.for_maintenance(meta)
    try:
        for node_id in sorted(store.live_nodes()):
            try:
                await collect_node(meta, store.client(node_id), node_id, report)
            except errors.StorageError as exc:
                log.warning("node %s skipped: %s", node_id, exc)
                report.unreachable += 1
    finally:
        await store.aclose()
    return report


async def collect_node(
    meta: Meta, chunks: NodeChunks, node_id: str, report: GcReport, *, pause_s: float = 0.0
) -> None:
    """Delete every chunk of node ``node_id`` that nothing needs (see the
    module doc), a page of ``PAGE`` ids at a time with ``pause_s`` seconds
    between pages; counts go to ``report``. Raises ``StorageError`` and
    ``MetadataUnavailable``.
    """
    before_ns = await chunks.clock_ns()
    after = None
    for _ in range(MAX_PAGES):
        page = await chunks.list(after=after, limit=PAGE)
        ids, after = page.ids, page.after
        dead = await meta.maintenance.take_unneeded(node_id, ids)
        deleted = [c for c in sorted(dead) if await chunks.delete(c, before_ns=before_ns)]
        report.deleted += len(deleted)
        report.kept += len(ids) - len(deleted)
        if dead:
            await meta.maintenance.forget_objects(sorted(dead))
        if after is None:
            return
        await trio.sleep(pause_s)
