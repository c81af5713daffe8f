"""Open files: one spool-backed buffer per open inode, its handles, and reads.

Every open inode has one ``OpenFile`` shared by all its handles: writes go
to its spool, reads come from the spool where it holds the current bytes
and from the committed version (the local content cache, else the storage
nodes) elsewhere. Committing is ``chunkfs.core.writer``'s job.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from .. import errors
from ..layout import BLOCK_SIZE as BLOCK
from ..meta import ChunkMap, ChunkRef, Content, Ino, now_ns
from ..store import Blob, ChunkStore
from .content_cache import ContentCache
from .spool import Spool

log = logging.getLogger(__name__)

# Bytes a spool keeps in memory, when no content cache keeps spools, before
# it moves to a file.
MEMORY_SPOOL_MAX = 256 << 10


@dataclass(eq=False)
class OpenFile:
    """The state of one open inode, shared by all its handles.

    ``base`` is the committed version the spool builds on, by 1 MiB blocks
    (``layout.BLOCK_SIZE``; block n holds bytes ``[n * BLOCK_SIZE, (n + 1) *
    BLOCK_SIZE)``). The spool holds the current bytes of every block in
    ``loaded`` and every byte at or past ``held_from``; elsewhere the current
    bytes are the base's. Base bytes past ``base_valid`` were cut off by a
    truncate, and the blocks in ``touched`` were written since ``base``: the
    other base blocks still hold the current bytes (a commit keeps them
    without reading them). ``dirty`` means the content differs from ``base``.
    ``pending`` holds the attribute changes (``mode`` permission bits,
    ``uid``, ``gid``, ``atime_ns``, ``mtime_ns``) made while the file is dirty
    or open for writing (``writers`` handles), published at the next flush or
    when the last writer goes; later changes join them until then, in order.
    ``outages`` is ``Database.outages`` when the file was opened.
    """

    ino: Ino
    base: ChunkMap
    size: int
    base_valid: int
    held_from: int
    handles: int = 0
    writers: int = 0
    spool: Spool | None = None
    loaded: set[int] = field(default_factory=set)
    touched: set[int] = field(default_factory=set)
    dirty: bool = False
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    pending: dict[str, int] = field(default_factory=dict)
    outages: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def holds_changes(self) -> bool:
        """Whether an attribute change now waits for the next flush."""
        return self.dirty or self.writers > 0 or bool(self.pending)

    @property
    def in_use(self) -> bool:
        """Whether a handle or an unflushed change keeps the file open."""
        return self.handles > 0 or self.dirty or bool(self.pending)


@dataclass(frozen=True)
class Handle:
    """An open file description: the inode, the open(2) flags, and whether
    the opener was privileged (uid 0).
    """

    ino: Ino
    flags: int
    privileged: bool = True

    @property
    def readable(self) -> bool:
        """Whether the handle was opened for reading."""
        return self.flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        """Whether the handle was opened for writing."""
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class OpenFiles:
    """The open inodes and handles of one mount (or other front end), with
    their spools in ``cache_dir`` and reads of committed versions through
    ``cache`` and ``store``.
    """

    def __init__(
        self, content: Content, store: ChunkStore, cache: ContentCache, cache_dir: str
    ) -> None:
        self._content = content
        self.store = store
        self.cache = cache
        self.cache_dir = cache_dir
        self.files: dict[Ino, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)

    # ----------------------------------------------------------- handles

    async def get(self, ino: Ino) -> OpenFile:
        """The inode's ``OpenFile``, made (with its latest committed chunk map)
        when none exists, or brought up to date when it is clean. Raises
        ``NotFound``.
        """
        f = self.files.get(ino)
        if f is not None and (f.dirty or f.handles):
            return f
        cmap = await self._content.chunk_map(ino)
        f = self.files.get(ino)  # another task may have made it meanwhile
        if f is not None and (f.dirty or f.handles):
            return f
        if f is not None:
            self.close_spool(f)
        f = OpenFile(
            ino=ino,
            base=cmap,
            size=cmap.size,
            base_valid=cmap.size,
            held_from=cmap.size,
            outages=self._content.db.outages,
        )
        self.files[ino] = f
        return f

    def new_file(self, ino: Ino) -> OpenFile:
        """The ``OpenFile`` of a file just created (empty, version 0)."""
        empty = ChunkMap(ino=ino, version=0, size=0, sha256=None, chunks=())
        f = self.files[ino] = OpenFile(
            ino=ino, base=empty, size=0, base_valid=0, held_from=0, outages=self._content.db.outages
        )
        return f

    def open(self, f: OpenFile, flags: int, *, privileged: bool) -> int:
        """A new handle on ``f`` with open(2) ``flags``; return its number."""
        h = Handle(f.ino, flags, privileged)
        f.handles += 1
        f.writers += h.writable
        fh = next(self._fh)
        self._handles[fh] = h
        return fh

    def handle(self, fh: int) -> Handle:
        """The handle ``fh``. Raises ``BadDescriptor`` if unknown."""
        try:
            return self._handles[fh]
        except KeyError:
            raise errors.BadDescriptor(f"unknown file handle {fh}") from None

    def file(self, fh: int) -> OpenFile:
        """The ``OpenFile`` of handle ``fh``. Raises ``BadDescriptor``."""
        return self.files[self.handle(fh).ino]

    def close(self, fh: int) -> OpenFile:
        """Forget handle ``fh``; return its file (the caller commits what
        waited for the last writer and drops the file when unused). Raises
        ``BadDescriptor``.
        """
        h = self.handle(fh)
        del self._handles[fh]
        f = self.files[h.ino]
        f.handles -= 1
        f.writers -= h.writable
        return f

    def drop_if_unused(self, f: OpenFile) -> None:
        """Free ``f`` and its spool once nothing keeps it open."""
        if not f.in_use and self.files.get(f.ino) is f:
            del self.files[f.ino]
            self.close_spool(f)

    def close_all(self) -> list[OpenFile]:
        """Forget every open file (unmount); return them, spools closed."""
        files = list(self.files.values())
        for f in files:
            self.close_spool(f)
        self.files.clear()
        return files

    # ------------------------------------------------------------- spool

    def spool(self, f: OpenFile) -> Spool:
        """The file's spool, made (as long as the file) on first use.
        Raises ``NoSpace`` or ``ChunkfsError`` when it cannot be made.
        """
        if f.spool is None:
            # Without a content cache to keep it, a small file's spool needs
            # no file: making and freeing one costs more than the file's bytes.
            memory_max = 0 if self.cache.budget else MEMORY_SPOOL_MAX
            try:
                f.spool = Spool(self.cache_dir, memory_max)
                f.spool.truncate(f.size)
            except OSError as exc:
                raise os_error(exc, "cannot create a spool file") from exc
        return f.spool

    def spool_bytes(self) -> int:
        """Bytes the spools of open files take on local disk (allocated blocks)."""
        return sum(f.spool.disk_bytes() for f in list(self.files.values()) if f.spool is not None)

    def close_spool(self, f: OpenFile) -> None:
        """Free the spool, keeping it in the content cache when it holds
        exactly the committed version.
        """
        if f.spool is None:
            return
        if (
            not f.dirty
            and f.base.sha256 is not None
            and f.base_valid == f.base.size == f.size
            and not self._unloaded(f, 0, f.size)
            # Before fileno(), which moves a spool held in memory to a file.
            and self.cache.fits(f.base.sha256, f.size)
        ):
            self.cache.adopt(f.spool.fileno(), f.base.sha256, f.size)
        f.spool.close()
        f.spool = None

    def mark_dirty(self, f: OpenFile) -> None:
        """The content of ``f`` changed now."""
        f.dirty = True
        f.mtime_ns = f.ctime_ns = now_ns()

    async def write(self, f: OpenFile, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (bytes) into the spool. Raises
        ``NoSpace`` when the spool's disk is full.
        """
        end = offset + len(data)
        async with f.lock:
            spool = self.spool(f)
            await self.load(f, offset, end, overwritten=True)
            try:
                spool.pwrite(offset, data)
            except OSError as exc:
                raise os_error(exc, "spool write failed") from exc
            f.size = max(f.size, end)
            f.touched.update(_blocks(offset, end))
            self.mark_dirty(f)

    async def truncate(self, f: OpenFile, size: int) -> None:
        """Cut or extend the spooled content to ``size`` bytes (committed later)."""
        async with f.lock:
            spool = self.spool(f)
            try:
                await trio.to_thread.run_sync(spool.truncate, size)
            except OSError as exc:
                raise os_error(exc, "spool truncate failed") from exc
            f.base_valid = min(f.base_valid, size)
            f.held_from = min(f.held_from, size)
            f.size = size
            self.mark_dirty(f)

    # ------------------------------------------------------------- reads

    async def read(self, f: OpenFile, offset: int, length: int) -> Blob:
        """Up to ``length`` bytes at ``offset``; short at the end of the file."""
        end = min(offset + length, f.size)
        if end <= offset:
            return b""
        if f.spool is None:
            return await self.read_base(f.base, offset, end)
        if self._unloaded(f, offset, end):
            async with f.lock:  # loads must not race with writes and truncates
                await self.load(f, offset, end)
        return await trio.to_thread.run_sync(f.spool.pread, offset, end - offset)

    def cold(self, f: OpenFile) -> bool:
        """Whether reading ``f`` needs the nodes: it holds committed bytes
        that neither its spool, the content cache nor the store's memory has.
        """
        if f.spool is not None or not f.base.size or self.cache.holds(f.base.sha256):
            return False
        return not all(map(self.store.holds, f.base.chunks))

    async def read_base(self, cmap: ChunkMap, start: int, end: int) -> Blob:
        """Bytes ``[start, end)`` of a committed version; the chunks it spans
        are fetched concurrently, unless the local content cache holds it.
        Raises ``StorageError`` when a chunk has no good replica.
        """
        data = self.cache.pread(cmap.sha256, start, end - start)
        if data is not None and len(data) == end - start:
            return data
        wanted = [
            _Piece(ref, start, end) for ref in cmap.chunks if ref.offset < end and start < ref.end
        ]
        if len(wanted) == 1:
            then = next((c for c in cmap.chunks if c.index == wanted[0].ref.index + 1), None)
            return await wanted[0].fetch(self.store, then)
        await self.store.prefetch([p.ref for p in wanted])
        parts: list[Blob] = [b""] * len(wanted)

        async def fetch(i: int) -> None:
            parts[i] = await wanted[i].fetch(self.store)

        with errors.unwrapped():
            async with trio.open_nursery() as nursery:
                for i in range(len(wanted)):
                    nursery.start_soon(fetch, i)
        return b"".join(parts)

    async def stream(self, f: OpenFile, offset: int, length: int) -> AsyncIterator[bytes]:
        """The current bytes ``[offset, offset + length)`` in pieces of at
        most a block, loading base blocks into the spool on the way. The
        caller holds ``f.lock``.
        """
        end = offset + length
        for lo in range(offset, end, BLOCK):
            hi = min(lo + BLOCK, end)
            await self.load(f, lo, hi)
            piece = await trio.to_thread.run_sync(self.spool(f).pread, lo, hi - lo)
            yield piece.ljust(hi - lo, b"\0")

    def _unloaded(self, f: OpenFile, start: int, end: int) -> list[int]:
        """Blocks overlapping ``[start, end)`` that hold base bytes the spool lacks."""
        return [n for n in _blocks(start, min(end, f.held_from)) if n not in f.loaded]

    async def load(self, f: OpenFile, start: int, end: int, *, overwritten: bool = False) -> None:
        """Copy the committed bytes of every block overlapping ``[start,
        end)`` into the spool, once, before anything overwrites them; with
        ``overwritten``, a write of ``[start, end)`` follows, so a block it
        covers whole is not fetched. The caller holds ``f.lock``.
        """
        for n in self._unloaded(f, start, end):
            lo, hi = n * BLOCK, min((n + 1) * BLOCK, f.held_from)
            holes = all(c.hole for c in f.base.chunks if c.offset < hi and lo < c.end)
            if not holes and not (overwritten and start <= lo and hi <= end):
                self.spool(f).pwrite(lo, await self.read_base(f.base, lo, hi))
            f.loaded.add(n)  # the spool reads zeros where nothing was written


def _blocks(start: int, end: int) -> range:
    """The numbers of the blocks that share a byte with ``[start, end)``."""
    return range(start // BLOCK, -(-end // BLOCK)) if end > start else range(0)


@dataclass(frozen=True)
class _Piece:
    """The part of chunk ``ref`` that file bytes ``[start, end)`` cover."""

    ref: ChunkRef
    start: int
    end: int

    async def fetch(self, store: ChunkStore, then: ChunkRef | None = None) -> Blob:
        """The covered bytes, read (and verified) through ``store``; ``then``
        is the next chunk of the file (see ``ChunkStore.read``). Raises
        ``StorageError``.
        """
        ref = self.ref
        return await store.read(
            ref,
            max(self.start, ref.offset) - ref.offset,
            min(self.end, ref.end) - ref.offset,
            then,
        )


def os_error(exc: OSError, what: str) -> errors.ChunkfsError:
    """The ``ChunkfsError`` for a local I/O failure: ``NoSpace`` for a full disk."""
    cls = errors.NoSpace if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errors.ChunkfsError
    return cls(f"{what}: {os.strerror(exc.errno or errno.EIO)}")
