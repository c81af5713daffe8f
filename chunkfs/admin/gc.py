"""Garbage collection: expired upload sessions and unreferenced chunk objects.

A chunk file on a node is deleted only when no live upload session protects
it and either no committed chunk map uses it or no replica record names that
node for it (a copy a failed or superseded move left behind). A writer may reuse an identical object
while gc runs; the node bumps an existing object's mtime on every PUT, and gc
deletes with ``before_ns`` = the node's clock read before the reference check,
so an object put again after that check survives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import errors
from ..meta import Meta
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


async def collect(meta: Meta) -> GcReport:
    """Run one gc pass over every active node; see the module doc."""
    report = GcReport(sessions=await meta.maintenance.expire_sessions())
    store = await ChunkStore.for_maintenance(meta)
    try:
        for node_id in sorted(store.live_nodes()):
            try:
                await _collect_node(meta, store, node_id, report)
            except errors.StorageError as exc:
                log.warning("node %s skipped: %s", node_id, exc)
                report.unreachable += 1
    finally:
        await store.aclose()
    return report


async def _collect_node(meta: Meta, store: ChunkStore, node_id: str, report: GcReport) -> None:
    client = store.client(node_id)
    before_ns = int((await client.health())["now_ns"])
    after = None
    for _ in range(MAX_PAGES):
        page = await client.list(after=after, limit=PAGE)
        ids, after = page.ids, page.after
        dead = await meta.maintenance.unneeded(node_id, ids)
        for chunk_id in sorted(dead):
            if await client.delete(chunk_id, before_ns=before_ns):
                report.deleted += 1
                await meta.maintenance.drop_replica(chunk_id, node_id)
            else:
                report.kept += 1
        report.kept += len(ids) - len(dead)
        if dead:
            await meta.maintenance.forget_objects(sorted(dead))
        if after is None:
            return
