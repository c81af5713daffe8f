"""Moving replicas: repair, rebalance and drain.

All three walk the chunk objects files use (``fsck.scan``) and copy a replica
from a good holder to the node that should hold it, streamed from node to
node; the receiving node checks the bytes against the chunk id, so a corrupt
source is refused and the next holder is tried. A copy is recorded only once
the node has it durably, and a replica is dropped (record first, then the
file) only once the chunk has its R good replicas elsewhere: no chunk ever
has fewer good replicas than it had before. While a copy is in flight, an
upload session (inode 0) keeps gc off the chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .. import errors
from ..meta import Ino, Meta
from ..store import ChunkStore
from .fsck import CORRUPT, Listings, ObjectState, Progress, scan

log = logging.getLogger(__name__)
MAINTENANCE_INO = Ino(0)  # the inode named by upload sessions of these tools


@dataclass
class MoveReport:
    """What a repair, rebalance or drain did (counts of replicas and objects)."""

    objects: int = 0
    copied: int = 0
    dropped: int = 0
    short: int = 0  # objects left with fewer than R good replicas
    lost: int = 0  # objects with no good replica at all
    unlisted: int = 0  # live nodes that could not be listed
    left: int = 0  # drain: chunks files use still recorded on the drained node

    @property
    def ok(self) -> bool:
        """Whether every object was left with R good replicas and every node listed."""
        return not (self.short or self.lost or self.unlisted)


async def copy_replica(
    meta: Meta, store: ChunkStore, state: ObjectState, target: str, ttl_s: int
) -> bool:
    """Copy ``state``'s chunk to ``target`` from the first good holder whose
    bytes the target accepts, and record it; an upload session of ``ttl_s``
    seconds guards the copy from gc. Returns whether it worked.
    """
    session = await meta.content.begin_upload(MAINTENANCE_INO, [state.chunk_id], ttl_s)
    try:
        for source in list(state.good):
            try:
                async with store.client(source).stream(state.chunk_id) as pieces:
                    await store.client(target).put(state.chunk_id, pieces, state.length)
            except errors.StorageError as exc:
                log.warning(
                    "copy of chunk %s from %s to %s failed: %s",
                    state.chunk_id.hex()[:16],
                    source,
                    target,
                    exc,
                )
                continue
            await meta.maintenance.add_replica(state.chunk_id, target)
            state.good.append(target)
            return True
        return False
    finally:
        await meta.content.end_upload(session)


async def drop_replica(meta: Meta, store: ChunkStore, chunk_id: bytes, node_id: str) -> None:
    """Forget a replica, then delete its file (best effort: gc deletes a
    file left behind, as nothing records it).
    """
    await meta.maintenance.drop_replica(chunk_id, node_id)
    try:
        await store.client(node_id).delete(chunk_id)
    except errors.StorageError as exc:
        log.warning("delete of chunk %s on %s failed: %s", chunk_id.hex()[:16], node_id, exc)


Act = Callable[[ChunkStore, ObjectState, MoveReport, int], Awaitable[None]]


async def _walk(meta: Meta, act: Act, *, verify: bool, progress: Progress | None) -> MoveReport:
    """Scan every used chunk object and ``act`` on each that has a good replica."""
    report = MoveReport()
    ttl_s = (await meta.registry.settings()).upload_ttl_s
    store = await ChunkStore.for_maintenance(meta)
    try:
        listings = Listings(store)
        async for state in scan(meta, store, listings, verify=verify, progress=progress):
            report.objects += 1
            if state.good:
                await act(store, state, report, ttl_s)
            if not state.good:
                report.lost += 1
            elif len(state.good) < store.replicas:
                report.short += 1
        report.unlisted = len(listings.failed)
    finally:
        await store.aclose()
    return report


async def repair(meta: Meta, *, progress: Progress | None = None) -> MoveReport:
    """Bring every chunk a file uses back to R good replicas: every replica
    is read and hashed; corrupt and missing ones are dropped, and good
    copies made from a good holder. ``progress`` follows the walk.
    """

    async def act(store: ChunkStore, state: ObjectState, report: MoveReport, ttl_s: int) -> None:
        for node_id, reason in sorted(state.bad.items()):
            if reason == CORRUPT:
                await drop_replica(meta, store, state.chunk_id, node_id)
            else:
                await meta.maintenance.drop_replica(state.chunk_id, node_id)
            report.dropped += 1
        # To the ring owners first, then the next nodes, until R good replicas.
        for target in store.placement(state.position):
            if len(state.good) >= store.replicas:
                break
            if target not in state.good and await copy_replica(meta, store, state, target, ttl_s):
                report.copied += 1
        await _spread(meta, store, state, report, ttl_s)

    return await _walk(meta, act, verify=True, progress=progress)


async def _spread(
    meta: Meta, store: ChunkStore, state: ObjectState, report: MoveReport, ttl_s: int
) -> None:
    """Until the good replicas span the zones they should (``zones_wanted``):
    copy one into a zone none holds, then drop one from a zone held twice.
    """
    wanted = store.zones_wanted()
    owners = store.placement(state.position, store.replicas)
    for target in store.placement(state.position):
        zones = [store.zone(n) for n in state.good]
        if len(set(zones)) >= wanted:
            return
        if store.zone(target) in zones or not await copy_replica(meta, store, state, target, ttl_s):
            continue
        report.copied += 1
        zones = [store.zone(n) for n in state.good]
        crowded = [n for n, z in zip(state.good, zones, strict=True) if zones.count(z) > 1]
        if not crowded or len(state.good) <= store.replicas:
            continue
        # Of the crowded replicas, one the ring does not place there goes.
        victim = next((n for n in crowded if n not in owners), crowded[-1])
        await drop_replica(meta, store, state.chunk_id, victim)
        state.good.remove(victim)
        report.dropped += 1


async def rebalance(meta: Meta, *, progress: Progress | None = None) -> MoveReport:
    """Move replicas to their ring owners (the first R writable nodes on the
    ring): copy to each owner lacking one, then drop the replicas held
    elsewhere. About 1/N of the replicas move when an N-th node joins.
    """

    async def act(store: ChunkStore, state: ObjectState, report: MoveReport, ttl_s: int) -> None:
        owners = store.placement(state.position, store.replicas)
        for target in owners:
            if target not in state.good and await copy_replica(meta, store, state, target, ttl_s):
                report.copied += 1
        if all(o in state.good for o in owners) and len(owners) == store.replicas:
            for node_id in [n for n in state.good if n not in owners]:
                await drop_replica(meta, store, state.chunk_id, node_id)
                state.good.remove(node_id)
                report.dropped += 1

    return await _walk(meta, act, verify=False, progress=progress)


async def drain(
    meta: Meta, node_ids: Sequence[str], *, progress: Progress | None = None
) -> MoveReport:
    """Mark the nodes ``node_ids`` draining and move every replica they
    hold to the ring owners; the report's ``left`` counts the chunk replicas
    files use that are still recorded on them (0 when they may be removed).
    Raises ``NotFound`` for an unknown node.
    """
    for node_id in node_ids:
        await meta.registry.set_draining(node_id, True)
    report = await rebalance(meta, progress=progress)
    for node_id in node_ids:
        report.left += await meta.maintenance.used_replicas_on(node_id)
    return report
