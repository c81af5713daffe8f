"""The commit of an open file: data first, then metadata.

On every flush (each close) and fsync of a changed file, the spool is cut
into six chunks (``chunkfs.layout``); the chunks whose bytes changed are
hashed and pushed to their R replicas (an unchanged chunk keeps its id and
is neither read nor sent, a chunk of zeros is a hole and goes nowhere), and
only then is the chunk map switched in one PostgreSQL
statement, through an upload session that protects the new chunks from gc
meanwhile, so that a reader sees the old version or the new one, never a
mix, and nothing acknowledged is lost. A failed commit raises and keeps the
spool, so the caller sees the error and a later flush can retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import trio

from .. import errors, layout, metrics, ring, wire
from ..layout import BLOCK_SIZE as BLOCK
from ..meta import Attrs, ChunkMap, ChunkRef, Ino, Meta, Settings, UploadSession, now_ns
from ..store import BATCH_ITEM_MAX, INLINE_PUT_MAX, Delta, PutItem
from .handles import OpenFile, OpenFiles
from .spool import extent_digests

log = logging.getLogger(__name__)
T = TypeVar("T")

# Files up to this size (bytes) are read and hashed at once on the commit.
SMALL_COMMIT_MAX = 256 << 10
# Uploads of one commit whose session was lost before the switch (each one
# pushes the new chunks again, under a new session), before it fails.
UPLOAD_ATTEMPTS = 3
# A changed chunk goes to the nodes holding its base as its changed blocks
# when those are at most this many bytes (held in memory for the upload).
DELTA_MAX = 16 << 20


class Writer:
    """Commits the open files of ``files`` through ``meta`` and their store.

    ``on_commit(ino, version)`` is called after each new content version is
    committed from this mount (a front end's caches then hold that version).
    """

    def __init__(
        self,
        meta: Meta,
        files: OpenFiles,
        settings: Settings,
        on_commit: Callable[[Ino, int], None] = lambda ino, version: None,
    ) -> None:
        self._meta = meta
        self._files = files
        self._store = files.store
        self._settings = settings
        self._on_commit = on_commit

    async def commit(self, f: OpenFile) -> Attrs | None:
        """Commit the unflushed writes of ``f`` with the attribute changes
        waiting on it, or those changes alone; return the attributes the
        commit wrote (None when there was nothing to commit, or the file
        was removed elsewhere: its changes are then dropped, as a local
        filesystem drops writes to a file no name reaches).

        Raises ``StorageError`` (EIO), ``NoSpace``, ``FileTooLarge`` and
        ``MetadataUnavailable``; the spool is kept for a retry.
        """
        async with f.lock:
            if not f.dirty:
                return await self._publish_pending(f)
            t0 = time.perf_counter()
            new, content, deltas = await self._cut(f)
            t1 = t2 = time.perf_counter()

            async def upload_and_switch() -> Attrs | None:
                nonlocal t2
                session, holders = await self._upload(f, new, content, deltas)
                t2 = time.perf_counter()
                return await self._switch(f, new, session, holders)

            attrs = await _until_not_lost(upload_and_switch)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
            log.debug(
                "commit of inode %d: hash %.2f ms, upload %.2f ms, metadata %.2f ms",
                f.ino,
                (t1 - t0) * 1e3,
                (t2 - t1) * 1e3,
                (time.perf_counter() - t2) * 1e3,
            )
            return attrs

    async def commit_shared(self, f: OpenFile, source: ChunkMap) -> Attrs | None:
        """Commit ``source``'s chunks as the new version of ``f`` (which has
        no unflushed writes), uploading nothing; None, changing nothing,
        when some chunk is not recorded on R nodes. Raises
        ``MetadataUnavailable``, ``NotFound`` and, when the session is lost
        before the switch ``UPLOAD_ATTEMPTS`` times, ``UploadLost``.
        """
        async with f.lock:
            ids = [c.chunk_id for c in source.chunks if not c.hole]
            new = replace(source, ino=f.ino, version=0)

            async def share() -> Attrs | None:
                session = await self._meta.content.begin_commit(
                    f.ino, ids, self._settings.upload_ttl_s, self._store.replicas
                )
                if any(chunk_id not in session.reusable for chunk_id in ids):
                    await self._fail_upload(session.session_id)
                    return None
                self._files.close_spool(f)  # it holds the old version's bytes
                f.loaded = set()
                f.held_from = f.size
                attrs = await self._switch(f, new, session, dict(session.reusable))
                f.size = f.base_valid = f.held_from = source.size
                return attrs

            return await _until_not_lost(share)

    async def _upload(
        self, f: OpenFile, new: ChunkMap, content: dict[int, bytes], deltas: dict[int, Delta]
    ) -> tuple[UploadSession, dict[bytes, Sequence[str]]]:
        """Open the upload session and bring every chunk of ``new`` that no
        committed file already holds R times to R nodes; return the session
        and the holders of every chunk (``{chunk_id: node ids}``, the ones
        just placed included). The session fails with the upload.
        """
        known: dict[bytes, Sequence[str]] = {
            c.chunk_id: c.nodes for c in f.base.chunks if not c.hole
        }
        fresh = [c for c in new.chunks if not c.hole and c.chunk_id not in known]
        # The session protects the kept chunks too: were the file rewritten
        # elsewhere meanwhile, reclamation must not take them before the switch.
        session = await self._meta.content.begin_commit(
            f.ino,
            [c.chunk_id for c in new.chunks if not c.hole],
            self._settings.upload_ttl_s,
            self._store.replicas,
        )
        known.update(session.reusable)  # identical chunks other files hold: stored once
        try:
            items = [
                await self._put_item(f, c, content, deltas.get(c.index))
                for c in fresh
                if c.chunk_id not in known
            ]
            placed = await self._store.put(items)
        except errors.ChunkfsError:
            await self._fail_upload(session.session_id)
            raise
        return replace(session, placed=placed), {**known, **placed}

    async def _switch(
        self,
        f: OpenFile,
        new: ChunkMap,
        session: UploadSession,
        holders: dict[bytes, Sequence[str]],
    ) -> Attrs | None:
        """Commit ``new`` as the file's version (with its waiting attribute
        changes) and make it the base the spool builds on (the blocks it
        loaded hold the new version's bytes too).
        """
        try:
            attrs = await self._meta.content.commit_chunks(
                f.ino,
                session.session_id,
                size=new.size,
                sha256=new.sha256 or b"",
                chunks=new.chunks,
                placed=session.placed,
                mtime_ns=f.mtime_ns or now_ns(),
                ctime_ns=f.ctime_ns or now_ns(),
                changes=f.pending,
                max_file_size=self._settings.max_file_size,
            )
        except errors.NotFound:
            await self._fail_upload(session.session_id)
            self._check_removed(f)
            f.dirty = False
            f.pending.clear()
            log.info("inode %d was removed elsewhere: its unflushed writes are dropped", f.ino)
            return None
        f.base = replace(
            new,
            version=attrs.version,
            chunks=tuple(
                replace(c, nodes=() if c.hole else tuple(holders[c.chunk_id])) for c in new.chunks
            ),
        )
        f.base_valid = f.size
        f.touched = set()
        f.dirty = False
        f.pending.clear()
        self._on_commit(f.ino, attrs.version)
        return attrs

    async def _cut(self, f: OpenFile) -> tuple[ChunkMap, dict[int, bytes], dict[int, Delta]]:
        """The new version's chunk map (no holders yet, version 0); the bytes
        of its changed chunks (by index) when the file is small, read once
        for hashing and upload; and the deltas of the changed chunks that
        keep blocks of the base chunk at their offset (by index).

        A base chunk that nothing changed and that sits where the new layout
        puts a chunk is kept as it is. Of a changed chunk, the blocks that
        nothing changed keep their digests (from the base chunk at the same
        offset) and are neither read nor sent; only the others are loaded
        into the spool (where they are not yet) and hashed.
        """
        exts = layout.extents(f.size)
        base_at = {c.offset: c for c in f.base.chunks if c.length and not c.hole}
        chunks: dict[int, ChunkRef] = {}
        changed: list[layout.Extent] = []
        known: dict[int, bytes] = {}  # block offset -> digest, from the base
        sources: dict[int, list[int | None]] = {}
        for e in exts:
            b = next(
                (c for c in f.base.chunks if (c.offset, c.length) == (e.offset, e.length)), None
            )
            if b is not None and self._intact(f, b.offset, b.end):
                chunks[e.index] = replace(b, index=e.index)
                continue
            changed.append(e)
            b = base_at.get(e.offset)
            if b is None or b.blocks is None or e.length <= BLOCK or f.size <= SMALL_COMMIT_MAX:
                continue
            sources[e.index] = []
            for k, lo in enumerate(range(e.offset, e.end, BLOCK)):
                n = min(BLOCK, e.end - lo)
                same = lo + n <= b.end and (n == BLOCK or lo + n == b.end)
                if same and self._intact(f, lo, lo + n):
                    known[lo] = b.blocks[k * layout.DIGEST_SIZE : (k + 1) * layout.DIGEST_SIZE]
                    sources[e.index].append(k)
                else:
                    sources[e.index].append(None)
        for e in changed:
            for lo in range(e.offset, e.end, BLOCK):
                if lo not in known:
                    await self._files.load(f, lo, min(lo + BLOCK, e.end))
        spool = self._files.spool(f)
        content: dict[int, bytes] = {}
        if f.size <= SMALL_COMMIT_MAX:
            # Read and hashed on the event loop: cheaper than thread trips.
            whole = spool.pread(0, f.size).ljust(f.size, b"\0")
            content = {e.index: whole[e.offset : e.end] for e in changed}
            ids, blocks = extent_digests(lambda offset, n: whole[offset : offset + n], changed)
        else:
            ids, blocks = await spool.digests(changed, known)
        deltas: dict[int, Delta] = {}
        for e, chunk_id, block_digests in zip(changed, ids, blocks, strict=True):
            position = 0 if chunk_id == layout.HOLE else _position(f.ino, e, chunk_id)
            plan = _plan(e, block_digests, sources.get(e.index))
            if chunk_id != layout.HOLE and plan is not None:
                reused = any(isinstance(src, int) for src in plan)
                delta = await self._delta(f, e, base_at[e.offset] if reused else None, plan)
                if delta is not None:
                    deltas[e.index] = delta
                    if delta.base is not None:
                        position = delta.base.position  # replicas where the base is
            chunks[e.index] = ChunkRef(
                e.index, e.offset, e.length, chunk_id, (), block_digests, position
            )
        ordered = tuple(chunks[e.index] for e in exts)
        cmap = ChunkMap(
            ino=f.ino,
            version=0,
            size=f.size,
            sha256=layout.file_digest(f.size, [c.chunk_id for c in ordered]),
            chunks=ordered,
        )
        return cmap, content, deltas

    @staticmethod
    def _intact(f: OpenFile, start: int, end: int) -> bool:
        """Whether the base bytes ``[start, end)`` are still the file's bytes."""
        first, stop = start // BLOCK, -(-end // BLOCK)
        if end > f.base_valid:
            return False
        if stop - first <= len(f.touched):  # whichever walk is shorter
            return not any(n in f.touched for n in range(first, stop))
        return not any(first <= n < stop for n in f.touched)

    async def _delta(
        self, f: OpenFile, e: layout.Extent, base: ChunkRef | None, plan: list[wire.Source]
    ) -> Delta | None:
        """The delta of extent ``e`` (``plan``: each block's source, blocks
        of ``base`` among them), with the bytes of its other blocks read from
        the spool; None when those are over ``DELTA_MAX``.
        """
        spans = [
            (lo, min(BLOCK, e.end - lo))
            for lo, src in zip(range(e.offset, e.end, BLOCK), plan, strict=True)
            if src is wire.BODY
        ]
        if sum(n for _, n in spans) > DELTA_MAX:
            return None
        spool = self._files.spool(f)
        data = await trio.to_thread.run_sync(
            lambda: b"".join(spool.pread(lo, n).ljust(n, b"\0") for lo, n in spans)
        )
        return Delta(base, tuple(plan), data)

    def _check_removed(self, f: OpenFile) -> None:
        """Raise ``MetadataUnavailable`` when ``f``'s inode, found gone, may
        not have been removed but lost: PostgreSQL went away since the file
        was opened, and a crash or failover loses what was committed
        asynchronously (its create, say) and not yet made durable. Such a
        file's writes are not dropped as a removed file's are: its close or
        fsync fails.
        """
        if self._meta.db.outages != f.outages:
            raise errors.MetadataUnavailable(
                f"inode {f.ino} is gone after PostgreSQL went away: its creation was "
                "not yet durable, and its writes are not committed"
            )

    async def _publish_pending(self, f: OpenFile) -> Attrs | None:
        """Commit the attribute changes waiting on a file with no unflushed writes."""
        if not f.pending:
            return None
        try:
            attrs: Attrs | None = await self._meta.namespace.setattr(
                f.ino, ctime_ns=f.ctime_ns, **f.pending
            )
        except errors.NotFound:
            self._check_removed(f)
            log.info("inode %d was removed elsewhere: its attribute changes are dropped", f.ino)
            attrs = None
        f.pending.clear()
        return attrs

    async def _put_item(
        self, f: OpenFile, ref: ChunkRef, content: dict[int, bytes], delta: Delta | None
    ) -> PutItem:
        """What to upload for one chunk: its bytes from ``content`` (when the
        commit read them already), read at once, or a stream of them for a
        large chunk or one with a ``delta`` (then for the nodes without its
        base); blocks the commit did not read are loaded on the way.
        """
        if ref.index in content:
            return PutItem(ref.chunk_id, ref.length, ref.position, data=content[ref.index])
        if ref.length <= INLINE_PUT_MAX and delta is None:
            data = b"".join([p async for p in self._files.stream(f, ref.offset, ref.length)])
            return PutItem(ref.chunk_id, ref.length, ref.position, data=data)
        return PutItem(
            ref.chunk_id,
            ref.length,
            ref.position,
            stream=lambda: self._files.stream(f, ref.offset, ref.length),
            delta=delta,
        )

    async def _fail_upload(self, session_id: int) -> None:
        try:
            await self._meta.content.fail_upload(session_id)
        except errors.ChunkfsError as exc:
            log.warning("could not mark upload session %d failed: %s", session_id, exc)


async def _until_not_lost(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` (an upload session and a switch), again while it raises
    ``UploadLost``, ``UPLOAD_ATTEMPTS`` times at most; the last one's
    ``UploadLost`` is raised.
    """
    for _ in range(UPLOAD_ATTEMPTS - 1):
        try:
            return await attempt()
        except errors.UploadLost as exc:
            log.warning("%s: tried again under a new session", exc)
    return await attempt()


def _plan(
    e: layout.Extent, block_digests: bytes | None, reused: list[int | None] | None
) -> list[wire.Source] | None:
    """Where each block of a changed chunk of more than one block can come
    from (``chunkfs.wire``): the base block ``reused`` names, zeros (its
    digest says so), else the body; None when every block needs the body.
    """
    if block_digests is None:
        return None
    plan: list[wire.Source] = []
    for k, lo in enumerate(range(e.offset, e.end, BLOCK)):
        digest = block_digests[k * layout.DIGEST_SIZE : (k + 1) * layout.DIGEST_SIZE]
        if reused is not None and reused[k] is not None:
            plan.append(reused[k])
        elif digest == layout.zero_digest(min(BLOCK, e.end - lo)):
            plan.append(wire.ZERO)
        else:
            plan.append(wire.BODY)
    return None if all(src is wire.BODY for src in plan) else plan


def _position(ino: Ino, ext: layout.Extent, chunk_id: bytes) -> int:
    """Where the ring places a chunk: small chunks at their file's position
    (one batch request per replica node for the whole file), others at
    their own (a large file's chunks spread over the nodes).
    """
    if ext.length <= BATCH_ITEM_MAX:
        return ring.file_position(ino)
    return ring.key_position(chunk_id)
