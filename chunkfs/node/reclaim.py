"""Continuous reclamation: a node gives back the space of chunks nothing needs.

Every ``interval_s`` seconds (and never more than a third of the time) the
node runs gc's pass (``chunkfs.admin.gc.collect_node``, with its safety
rules) over its own disk, pausing between pages of ids so that the database
and the disk see a bounded rate; it also expires the upload sessions gc
would. So superseded versions, deleted files and failed uploads give their
space back without an operator running ``chunkfs gc``.
"""

from __future__ import annotations

import logging
import time

import trio

from .. import errors, wire
from ..admin.gc import GcReport, collect_node
from ..meta import Meta
from ..nodeclient import ChunkPage
from .disk import ChunkDisk, DeleteRefused

log = logging.getLogger(__name__)

# Seconds between the pages of one pass (a page is gc's PAGE ids).
PAUSE_S = 0.2


class LocalChunks:
    """The node's own disk, as gc's ``NodeChunks``."""

    def __init__(self, disk: ChunkDisk) -> None:
        self._disk = disk

    async def clock_ns(self) -> int:
        """This host's clock (ns), as the chunk files' mtimes read."""
        return time.time_ns()

    async def list(self, after: bytes | None = None, limit: int = 1000) -> ChunkPage:
        """Up to ``limit`` chunk ids above ``after``, ascending."""
        ids = await self._disk.list_ids(None if after is None else wire.id_to_hex(after), limit)
        page = [wire.id_from_hex(i) for i in ids]
        return ChunkPage(page, page[-1] if len(page) == limit else None)

    async def delete(self, chunk_id: bytes, before_ns: int | None = None) -> bool:
        """Delete a chunk unless used at or after ``before_ns``; False when kept."""
        try:
            await self._disk.delete(wire.id_to_hex(chunk_id), before_ns)
        except errors.ChunkMissing:
            return True
        except DeleteRefused:
            return False
        return True


async def reclaim_forever(meta: Meta, disk: ChunkDisk, interval_s: float) -> None:
    """Run a reclamation pass every ``interval_s`` seconds, or three times
    the last pass's duration if longer; failures, whatever they are, are
    logged and the next pass tries again (the node keeps serving).
    """
    chunks = LocalChunks(disk)
    wait = interval_s
    while True:
        await trio.sleep(wait)
        started = time.monotonic()
        report = GcReport()
        try:
            report.sessions = await meta.maintenance.expire_sessions()
            await meta.maintenance.forget_commit_marks()
            await collect_node(meta, chunks, disk.node_id, report, pause_s=PAUSE_S)
        except errors.ChunkfsError as exc:
            log.warning("reclamation on node %s stopped early: %s", disk.node_id, exc)
        except Exception:  # a failed pass must not stop the node serving
            log.exception("reclamation on node %s failed", disk.node_id)
        if report.deleted:
            log.info("reclaimed %d chunks nothing needs", report.deleted)
        wait = max(interval_s, 3 * (time.monotonic() - started))
