"""The virtual filesystem: handles, spooled writes, reads and flush.

``VFS`` sits between the FUSE adapter and the metadata engine and chunk
store; it knows nothing of FUSE. Every open inode has one ``OpenFile`` shared
by all its handles: writes go to its spool, and flush (every close) or fsync
commits a new version: the spool is cut into six chunks, each is hashed and
pushed to its replicas, and only then is the chunk map switched in one
PostgreSQL transaction. A failed commit raises and keeps the spool, so the
caller sees the error and a later flush can retry.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from . import errors, layout, ring
from .cache import ContentCache
from .meta import Attrs, ChunkMap, ChunkRef, Ino, Meta, Settings, now_ns
from .spool import Spool, extent_digests
from .store import BATCH_ITEM_MAX, INLINE_PUT_MAX, WINDOW, ChunkStore, PutItem

log = logging.getLogger(__name__)

# Entries of the attribute, extended attribute and absent-name caches, each.
_CACHE_MAX = 10_000
# Files up to this size (bytes) are read and hashed at once on the commit.
SMALL_COMMIT_MAX = 256 << 10
# Forgotten inodes with no name left are purged in batches of up to this
# many, at most this many seconds after the kernel forgot them.
PURGE_BATCH = 256
PURGE_DELAY_S = 0.05
_EMPTY = ChunkMap(ino=Ino(0), version=0, size=0, sha256=None, chunks=())


@dataclass(eq=False)
class OpenFile:
    """The state of one open inode, shared by all its handles.

    ``base`` is the committed version the spool builds on. The spool holds
    the current content where it differs from ``base``: every base chunk in
    ``loaded`` has been copied in, and base bytes past ``base_valid`` were cut
    off by a truncate. ``dirty`` means the content differs from ``base``.
    ``pending`` holds the attribute changes (``mode`` permission bits,
    ``uid``, ``gid``, ``atime_ns``, ``mtime_ns``) made while the file is dirty
    or open for writing (``writers`` handles), published at the next flush or
    when the last writer goes; later changes join them until then, in order.
    """

    ino: Ino
    base: ChunkMap
    size: int
    base_valid: int
    handles: int = 0
    writers: int = 0
    spool: Spool | None = None
    loaded: set[int] = field(default_factory=set)
    dirty: bool = False
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    pending: dict[str, int] = field(default_factory=dict)
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def holds_changes(self) -> bool:
        """Whether an attribute change now waits for the next flush."""
        return self.dirty or self.writers > 0 or bool(self.pending)


@dataclass(frozen=True)
class Handle:
    """An open file description: the inode and the open(2) flags."""

    ino: Ino
    flags: int


class VFS:
    """Filesystem operations over ``Meta`` (metadata) and ``ChunkStore`` (data).

    ``cache_dir`` holds the spool files; ``cache`` keeps committed contents
    for later reads (see ``chunkfs.cache``). ``attr_ttl`` and ``entry_ttl``
    (seconds) bound how long attributes this mount's own changes returned,
    and names it found absent, are trusted (the kernel's attribute and entry
    timeouts). Methods raise ``ChunkfsError`` subclasses, each carrying its
    errno.
    """

    def __init__(
        self,
        meta: Meta,
        store: ChunkStore,
        settings: Settings,
        cache_dir: str,
        *,
        attr_ttl: float = 1.0,
        entry_ttl: float = 1.0,
        cache: ContentCache | None = None,
    ) -> None:
        self.meta = meta
        self.store = store
        self.settings = settings
        self.cache_dir = cache_dir
        self.cache = cache or ContentCache.disabled()
        self._files: dict[Ino, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        # Inodes that lost their last name here; purged when nothing uses them,
        # in batches (one statement for many: rm -rf forgets one per file).
        self._unlinked: set[Ino] = set()
        self._to_purge: set[Ino] = set()
        self._purge_soon = trio.Event()
        # Version of each inode the kernel's page cache holds, for keep_cache.
        self._cached_version: dict[Ino, int] = {}
        # Attributes that this mount's own changes returned, trusted for
        # attr_ttl seconds (as long as the kernel may cache them): the kernel
        # drops its copy at every write and asks again after the close.
        self._attrs: dict[Ino, tuple[float, Attrs]] = {}
        # Extended attributes per inode, trusted for attr_ttl seconds: the
        # kernel asks for security.capability before every write.
        self._xattrs: dict[Ino, tuple[float, dict[bytes, bytes]]] = {}
        self._attr_ttl = attr_ttl
        # Names found absent, trusted as absent for entry_ttl seconds (as long
        # as the kernel may trust a name it looked up) unless this mount gives
        # them meanwhile: the kernel asks again before an O_EXCL create and
        # for a rename's target, right after cp or rsync found the name absent.
        # A name another mount made meanwhile still fails such a create with
        # EEXIST, and a rename replaces it, as the database decides both.
        self._absent: dict[tuple[Ino, bytes], float] = {}
        self._naming_count = 0  # names given by this mount so far, or being given
        self._entry_ttl = entry_ttl

    # ------------------------------------------------------- attributes

    def _overlay(self, attrs: Attrs) -> Attrs:
        """Attributes with the unflushed size, times and changes of an open file."""
        f = self._files.get(attrs.ino)
        if f is None or not (f.dirty or f.pending):
            return attrs
        changed: dict[str, Any] = dict(f.pending)
        if "mode" in changed:
            changed["mode"] |= attrs.mode & ~0o7777
        if f.dirty:
            changed.update(size=f.size, mtime_ns=f.mtime_ns or attrs.mtime_ns)
        return replace(attrs, ctime_ns=max(attrs.ctime_ns, f.ctime_ns or 0), **changed)

    async def getattr(self, ino: Ino) -> Attrs:
        """Attributes of ``ino``, including unflushed writes. Raises ``NotFound``."""
        cached = self._attrs.get(ino)
        if cached is not None and cached[0] > trio.current_time():
            return self._overlay(cached[1])
        attrs = await self.meta.getattr(ino)
        if stat.S_ISDIR(attrs.mode):
            # With default_permissions the kernel asks again after every name
            # change inside (its copy is dropped), to check the permission bits.
            self._remember(attrs)
        return self._overlay(attrs)

    def _remember(self, attrs: Attrs) -> Attrs:
        """Trust ``attrs``, just read or returned by a change made here, for
        ``attr_ttl`` seconds (as long as the kernel may cache them).
        """
        _make_room(self._attrs)
        self._attrs[attrs.ino] = (trio.current_time() + self._attr_ttl, attrs)
        return attrs

    def _dir_changed(self, ino: Ino, now: int, nlink_delta: int = 0) -> None:
        """A name in directory ``ino`` changed at ``now`` (ns): bring its
        remembered attributes to what the metadata statement just wrote.
        """
        cached = self._attrs.get(ino)
        if cached is not None:
            attrs = cached[1]
            self._attrs[ino] = (
                cached[0],
                replace(attrs, mtime_ns=now, ctime_ns=now, nlink=attrs.nlink + nlink_delta),
            )

    async def lookup(self, parent: Ino, name: bytes) -> Attrs:
        """Attributes of ``name`` in ``parent``. Raises ``NotFound``, ``NameTooLong``."""
        key = (parent, name)
        until = self._absent.get(key)
        if until is not None and until > trio.current_time():
            raise errors.NotFound(name.decode(errors="replace"))
        count = self._naming_count
        try:
            return self._overlay(await self.meta.lookup(parent, name))
        except errors.NotFound:
            # Not when this mount gave a name meanwhile: it may be this one.
            if count == self._naming_count:
                _make_room(self._absent)
                self._absent[key] = trio.current_time() + self._entry_ttl
            raise

    @contextmanager
    def _naming(self, parent: Ino, name: bytes) -> Iterator[None]:
        """Around a change that may give ``parent`` the name ``name``: it is
        no longer known absent, nor by a lookup that overlaps the change.
        """
        self._absent.pop((parent, name), None)
        self._naming_count += 1
        try:
            yield
        finally:
            self._absent.pop((parent, name), None)
            self._naming_count += 1

    async def setattr(
        self,
        ino: Ino,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attrs:
        """chmod / chown / utimensat / truncate. A truncate of a file that no
        handle has open is committed at once; otherwise at the next flush.
        The other changes to a file with unflushed writes, or open for
        writing, wait for its next flush and are committed with its writes in
        one transaction (other mounts see both then, as with close-to-open
        consistency); the rest at once.
        Raises ``FileTooLarge``, ``IsADirectory``, ``NotFound``, ``StorageError``.
        """
        if size is not None:
            await self._truncate(ino, size)
        f = self._files.get(ino)
        if f is not None and f.holds_changes:
            async with f.lock:  # not while a flush of the same file commits
                if f.holds_changes:
                    attrs = await self.getattr(ino)
                    changes = {
                        "mode": mode & 0o7777 if mode is not None else None,
                        "uid": uid,
                        "gid": gid,
                        "atime_ns": atime_ns,
                        "mtime_ns": mtime_ns,
                    }
                    f.pending.update((k, v) for k, v in changes.items() if v is not None)
                    if mtime_ns is not None:
                        f.mtime_ns = mtime_ns  # kept by the commit of the writes
                    f.ctime_ns = now_ns()
                    return self._overlay(attrs)
        attrs = await self.meta.setattr(
            ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns
        )
        return self._overlay(self._remember(attrs))

    async def _truncate(self, ino: Ino, size: int) -> None:
        attrs = await self.meta.getattr(ino)
        if attrs.mode & 0o170000 == 0o040000:
            raise errors.IsADirectory("cannot truncate a directory")
        if size > self.settings.max_file_size:
            raise errors.FileTooLarge(f"{size} bytes is over the maximum file size")
        f = await self._open_file(ino)
        try:
            await self._truncate_file(f, size)
            if f.handles == 0:
                await self._commit(f)
        finally:
            self._drop_if_unused(f)

    async def _truncate_file(self, f: OpenFile, size: int) -> None:
        """Cut or extend the spooled content to ``size`` bytes (committed later)."""
        async with f.lock:
            spool = self._spool(f)
            await trio.to_thread.run_sync(spool.truncate, size)
            f.base_valid = min(f.base_valid, size)
            f.size = size
            self._mark_dirty(f)

    # -------------------------------------------------------- namespace

    async def create_node(
        self,
        parent: Ino,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Attrs:
        """mkdir / mknod / symlink: see ``Meta.create``."""
        now = now_ns()
        with self._naming(parent, name):
            attrs = await self.meta.create(
                parent, name, mode, uid, gid, rdev=rdev, target=target, now=now
            )
        self._dir_changed(parent, now, 1 if stat.S_ISDIR(mode) else 0)
        self._cache_xattrs({attrs.ino: {}})  # a new inode has none
        return attrs

    async def link(self, ino: Ino, parent: Ino, name: bytes) -> Attrs:
        """A new hard link; see ``Meta.link``."""
        self._unlinked.discard(ino)
        self._attrs.pop(ino, None)
        self._attrs.pop(parent, None)
        with self._naming(parent, name):
            return self._overlay(await self.meta.link(ino, parent, name))

    async def unlink(self, parent: Ino, name: bytes, *, is_dir: bool = False) -> None:
        """unlink / rmdir; the inode is purged once nothing uses it."""
        now = now_ns()
        attrs = await self.meta.unlink(parent, name, is_dir=is_dir, now=now)
        self._dir_changed(parent, now, -1 if is_dir else 0)
        self._attrs.pop(attrs.ino, None)
        if attrs.nlink == 0:
            self._unlinked.add(attrs.ino)

    async def rename(
        self,
        old_parent: Ino,
        old_name: bytes,
        new_parent: Ino,
        new_name: bytes,
        *,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> None:
        """rename(2) with its flags; see ``Meta.rename``."""
        now = now_ns()
        with self._naming(new_parent, new_name):
            done = await self.meta.rename(
                old_parent,
                old_name,
                new_parent,
                new_name,
                noreplace=noreplace,
                exchange=exchange,
                now=now,
            )
        if done.moved is None:
            self._attrs.clear()  # a directory's move or an exchange reaches further
        else:
            self._attrs.pop(done.moved, None)
            self._dir_changed(old_parent, now)
            if new_parent != old_parent:
                self._dir_changed(new_parent, now)
        if done.replaced is not None:
            self._attrs.pop(done.replaced.ino, None)
            if done.replaced.nlink == 0:
                self._unlinked.add(done.replaced.ino)

    async def forget(self, ino: Ino) -> None:
        """The kernel no longer knows ``ino``: purge it (within ``PURGE_DELAY_S``
        seconds, see ``run_purger``) if it has no name and no open handle.
        Never raises.
        """
        if ino in self._unlinked and ino not in self._files:
            self._to_purge.add(ino)
            if len(self._to_purge) >= PURGE_BATCH:
                self._purge_soon.set()

    async def run_purger(self) -> None:
        """Purge the forgotten inodes every ``PURGE_DELAY_S`` seconds, or as
        soon as ``PURGE_BATCH`` wait; runs until cancelled.
        """
        while True:
            with trio.move_on_after(PURGE_DELAY_S):
                await self._purge_soon.wait()
            self._purge_soon = trio.Event()
            await self._purge()

    async def _purge(self) -> None:
        batch = [ino for ino in self._to_purge if ino not in self._files]
        self._to_purge.clear()
        if not batch:
            return
        try:
            await self.meta.purge(batch)
        except errors.ChunkfsError as exc:
            log.warning("could not purge %d inodes: %s", len(batch), exc)
            return
        for ino in batch:
            self._unlinked.discard(ino)
            self._attrs.pop(ino, None)
            self._cached_version.pop(ino, None)

    # ------------------------------------------------------------ files

    async def create(
        self, parent: Ino, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attrs]:
        """Create and open a regular file; return ``(fh, attrs)``."""
        now = now_ns()
        with self._naming(parent, name):
            attrs = self._remember(await self.meta.create(parent, name, mode, uid, gid, now=now))
        self._dir_changed(parent, now)
        self._cache_xattrs({attrs.ino: {}})  # the kernel asks at the first write
        f = OpenFile(ino=attrs.ino, base=replace(_EMPTY, ino=attrs.ino), size=0, base_valid=0)
        self._files[attrs.ino] = f
        return self._new_handle(f, flags), attrs

    async def open(self, ino: Ino, flags: int) -> tuple[int, bool, int]:
        """Open a file; return ``(fh, keep_cache, version)``: ``keep_cache`` is
        True when the kernel's cached pages are of the version now committed,
        so a file changed by another mount is re-read (close-to-open
        consistency); ``version`` is the committed content version.
        """
        f = await self._open_file(ino)
        cached = self._attrs.get(ino)
        if cached is not None and cached[1].version != f.base.version:
            del self._attrs[ino]  # another mount committed since: close-to-open
        keep = self._cached_version.get(ino) == f.base.version and not f.dirty
        self._cached_version[ino] = f.base.version
        fh = self._new_handle(f, flags)
        if flags & os.O_TRUNC:
            # The kernel leaves O_TRUNC to the filesystem (atomic_o_trunc);
            # Linux truncates even with O_RDONLY (the kernel checked write access).
            try:
                await self._truncate_file(f, 0)
            except BaseException:
                await self.release(fh)
                raise
            keep = False
        return fh, keep, f.base.version

    async def _open_file(self, ino: Ino) -> OpenFile:
        """The inode's ``OpenFile``, made (with its latest committed chunk map)
        when none exists, or brought up to date when it is clean.
        """
        f = self._files.get(ino)
        if f is not None and (f.dirty or f.handles):
            return f
        cmap = await self.meta.chunk_map(ino)
        f = self._files.get(ino)  # another task may have made it meanwhile
        if f is not None and (f.dirty or f.handles):
            return f
        if f is not None:
            self._close_spool(f)
        f = OpenFile(ino=ino, base=cmap, size=cmap.size, base_valid=cmap.size)
        self._files[ino] = f
        return f

    def _new_handle(self, f: OpenFile, flags: int) -> int:
        f.handles += 1
        f.writers += _writable(flags)
        fh = next(self._fh)
        self._handles[fh] = Handle(f.ino, flags)
        return fh

    def handle(self, fh: int) -> Handle:
        """The handle ``fh``. Raises ``InvalidArgument`` (EBADF-like) if unknown."""
        try:
            return self._handles[fh]
        except KeyError:
            raise errors.InvalidArgument(f"unknown file handle {fh}") from None

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short at the end of the file."""
        f = self._files[self.handle(fh).ino]
        end = min(offset + length, f.size)
        if end <= offset:
            return b""
        if f.spool is None:
            return await self._read_base(f.base, offset, end)
        if self._unloaded(f, offset, end):
            async with f.lock:  # loads must not race with writes and truncates
                await self._load(f, offset, end)
        return await trio.to_thread.run_sync(f.spool.pread, offset, end - offset)

    async def _read_base(self, cmap: ChunkMap, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a committed version; the chunks it spans
        are fetched concurrently, unless the local content cache holds it.
        """
        data = self.cache.pread(cmap.sha256, start, end - start)
        if data is not None and len(data) == end - start:
            return data
        wanted = [
            (
                ref,
                max(start, ref.offset) - ref.offset,
                min(end, ref.offset + ref.length) - ref.offset,
            )
            for ref in cmap.chunks
            if max(start, ref.offset) < min(end, ref.offset + ref.length)
        ]
        if len(wanted) == 1:
            return await self.store.read(*wanted[0])
        await self.store.prefetch([ref for ref, _, _ in wanted])
        parts: list[bytes] = [b""] * len(wanted)

        async def fetch(i: int) -> None:
            parts[i] = await self.store.read(*wanted[i])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(wanted)):
                    nursery.start_soon(fetch, i)
        except BaseExceptionGroup as group:
            raise errors.leaf(group) from None
        return b"".join(parts)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` into the spool; return its length.

        Raises ``FileTooLarge`` past the maximum file size and ``NoSpace`` when
        the spool's disk is full.
        """
        h = self.handle(fh)
        f = self._files[h.ino]
        end = offset + len(data)
        if end > self.settings.max_file_size:
            raise errors.FileTooLarge(f"a write to {end} bytes is over the maximum file size")
        async with f.lock:
            spool = self._spool(f)
            await self._load(f, offset, end)
            try:
                spool.pwrite(offset, data)
            except OSError as exc:
                raise _os_error(exc, "spool write failed") from exc
            f.size = max(f.size, end)
            self._mark_dirty(f)
        return len(data)

    async def flush(self, fh: int) -> None:
        """Commit the file's unflushed writes (every close(2) comes here)."""
        await self._commit(self._files[self.handle(fh).ino])

    async def fsync(self, fh: int) -> None:
        """fsync(2): the same commit as flush; for a file with nothing to
        commit, the metadata changes made so far are made durable.
        """
        f = self._files[self.handle(fh).ino]
        durable = f.dirty  # a commit of writes is durable at once
        await self._commit(f)
        if not durable:
            await self.meta.sync()

    async def sync(self) -> None:
        """Make every metadata change so far durable (fsync of a directory)."""
        await self.meta.sync()

    async def release(self, fh: int) -> Ino:
        """The last close of a handle; return its inode. A file whose commit
        failed keeps its spool in memory for the next open to retry.
        """
        h = self._handles.pop(fh)
        f = self._files[h.ino]
        f.handles -= 1
        f.writers -= _writable(h.flags)
        # Without a flush before it (a writable mapping outlives its
        # descriptor), the last writer's release publishes what waited for it.
        if (f.dirty and f.handles == 0) or (f.pending and not f.dirty and not f.writers):
            try:
                await self._commit(f)
            except errors.ChunkfsError as exc:
                log.error("inode %d: unflushed data kept in its spool: %s", f.ino, exc)
        self._drop_if_unused(f)
        return h.ino

    def _drop_if_unused(self, f: OpenFile) -> None:
        if f.handles == 0 and not (f.dirty or f.pending) and self._files.get(f.ino) is f:
            del self._files[f.ino]
            self._close_spool(f)

    def _close_spool(self, f: OpenFile) -> None:
        """Free the spool, keeping it in the content cache when it holds
        exactly the committed version.
        """
        if f.spool is None:
            return
        if (
            not f.dirty
            and f.base.sha256 is not None
            and f.base_valid == f.base.size == f.size
            and len(f.loaded) == len(f.base.chunks)
        ):
            self.cache.adopt(f.spool.fileno(), f.base.sha256, f.size)
        f.spool.close()
        f.spool = None

    # ------------------------------------------------------ spool upkeep

    def _spool(self, f: OpenFile) -> Spool:
        if f.spool is None:
            try:
                f.spool = Spool(self.cache_dir)
                f.spool.truncate(f.size)
            except OSError as exc:
                raise _os_error(exc, "cannot create a spool file") from exc
        return f.spool

    def _mark_dirty(self, f: OpenFile) -> None:
        f.dirty = True
        f.mtime_ns = f.ctime_ns = now_ns()

    def _unloaded(self, f: OpenFile, start: int, end: int) -> list[layout.Extent]:
        """Base chunks overlapping ``[start, end)`` not yet copied to the spool."""
        end = min(end, f.base_valid)
        return [
            e for e in layout.overlapping(_extents(f.base), start, end) if e.index not in f.loaded
        ]

    async def _load(self, f: OpenFile, start: int, end: int) -> None:
        """Copy the committed bytes of every base chunk overlapping
        ``[start, end)`` into the spool, once, before anything overwrites them.
        The caller holds ``f.lock``.
        """
        for ext in self._unloaded(f, start, end):
            stop = min(ext.end, f.base_valid)
            for pos in range(ext.offset, stop, WINDOW):
                piece = await self._read_base(f.base, pos, min(pos + WINDOW, stop))
                self._spool(f).pwrite(pos, piece)
            f.loaded.add(ext.index)

    # ------------------------------------------------------------ commit

    async def _commit(self, f: OpenFile) -> None:
        """Push the spool's chunks and switch the chunk map; see the module doc."""
        async with f.lock:
            if not f.dirty:
                await self._publish_pending(f)
                return
            t0 = time.perf_counter()
            await self._load(f, 0, f.size)
            exts = layout.extents(f.size)
            if f.size <= SMALL_COMMIT_MAX:
                # Read and hashed on the event loop: cheaper than thread trips.
                content = self._spool(f).pread(0, f.size).ljust(f.size, b"\0")
                ids, blocks = extent_digests(
                    lambda offset, length: content[offset : offset + length], exts
                )
                digest = hashlib.sha256(content).digest()
            else:
                content = None
                ids, blocks, digest = await self._spool(f).digests(exts)
            t1 = time.perf_counter()
            known = {c.chunk_id: c.nodes for c in f.base.chunks}
            fresh = [(e, i) for e, i in zip(exts, ids, strict=False) if i not in known]
            session, reusable = await self.meta.begin_commit(
                f.ino, [i for _, i in fresh], self.settings.upload_ttl_s, self.store.replicas
            )
            known.update(reusable)  # identical chunks other files hold: stored once
            fresh = [(e, i) for e, i in fresh if i not in known]
            positions = {e.index: _position(f.ino, e, i) for e, i in zip(exts, ids, strict=False)}
            t2 = time.perf_counter()
            try:
                placed: dict[bytes, Sequence[str]] = dict(
                    await self.store.put(
                        [
                            await self._put_item(f, e, i, positions[e.index], content)
                            for e, i in fresh
                        ]
                    )
                )
            except errors.ChunkfsError:
                await self._fail_upload(session)
                raise
            t3 = time.perf_counter()
            try:
                attrs = await self.meta.commit_chunks(
                    f.ino,
                    session,
                    size=f.size,
                    sha256=digest,
                    chunks=[
                        (e.index, e.offset, e.length, i, b, positions[e.index])
                        for e, i, b in zip(exts, ids, blocks, strict=False)
                    ],
                    replicas=placed,
                    mtime_ns=f.mtime_ns or now_ns(),
                    ctime_ns=f.ctime_ns or now_ns(),
                    changes=f.pending,
                    max_file_size=self.settings.max_file_size,
                )
            except errors.NotFound:
                # Another mount removed the file while it was open here: as
                # on a local filesystem, what is written to a file no name
                # reaches any more is dropped, without an error.
                await self._fail_upload(session)
                f.dirty = False
                f.pending.clear()
                log.info("inode %d was removed elsewhere: its unflushed writes are dropped", f.ino)
                return
            self._remember(attrs)
            t4 = time.perf_counter()
            log.debug(
                "commit of inode %d: hash %.2f ms, session %.2f ms, put %.2f ms, metadata %.2f ms",
                f.ino,
                (t1 - t0) * 1e3,
                (t2 - t1) * 1e3,
                (t3 - t2) * 1e3,
                (t4 - t3) * 1e3,
            )
            placed.update(known)
            f.base = ChunkMap(
                ino=f.ino,
                version=attrs.version,
                size=f.size,
                sha256=digest,
                chunks=tuple(
                    ChunkRef(
                        e.index, e.offset, e.length, i, tuple(placed[i]), b, positions[e.index]
                    )
                    for e, i, b in zip(exts, ids, blocks, strict=False)
                ),
            )
            f.base_valid = f.size
            f.loaded = {e.index for e in exts}
            f.dirty = False
            f.pending.clear()
            # The kernel's pages hold what was just committed.
            self._cached_version[f.ino] = attrs.version

    async def _publish_pending(self, f: OpenFile) -> None:
        """Commit the attribute changes waiting on a file with no unflushed writes."""
        if not f.pending:
            return
        try:
            attrs = await self.meta.setattr(f.ino, ctime_ns=f.ctime_ns, **f.pending)
        except errors.NotFound:
            log.info("inode %d was removed elsewhere: its attribute changes are dropped", f.ino)
        else:
            self._remember(attrs)
        f.pending.clear()

    async def _put_item(
        self,
        f: OpenFile,
        ext: layout.Extent,
        chunk_id: bytes,
        position: int,
        content: bytes | None,
    ) -> PutItem:
        """What to upload for one chunk: its bytes sliced from ``content`` (the
        whole file, when it was read at once), read from the spool, or a
        stream of them for a large chunk.
        """
        if content is not None:
            return PutItem(chunk_id, ext.length, position, data=content[ext.offset : ext.end])
        spool = self._spool(f)
        if ext.length <= INLINE_PUT_MAX:
            data = await trio.to_thread.run_sync(spool.pread, ext.offset, ext.length)
            return PutItem(chunk_id, ext.length, position, data=data)
        return PutItem(
            chunk_id, ext.length, position, stream=lambda: spool.stream(ext.offset, ext.length)
        )

    async def _fail_upload(self, session: int) -> None:
        try:
            await self.meta.fail_upload(session)
        except errors.ChunkfsError as exc:
            log.warning("could not mark upload session %d failed: %s", session, exc)

    # ------------------------------------------------------------ xattrs

    async def _xattr_map(self, ino: Ino) -> dict[bytes, bytes]:
        cached = self._xattrs.get(ino)
        if cached is not None and cached[0] > trio.current_time():
            return cached[1]
        values = await self.meta.xattrs(ino)
        self._cache_xattrs({ino: values})
        return values

    def _cache_xattrs(self, found: dict[Ino, dict[bytes, bytes]]) -> None:
        """Trust these inodes' extended attributes for the next ``attr_ttl`` seconds."""
        expiry = trio.current_time() + self._attr_ttl
        _make_room(self._xattrs, len(found))
        for ino, values in found.items():
            self._xattrs[ino] = (expiry, values)

    async def getxattr(self, ino: Ino, name: bytes) -> bytes:
        """An extended attribute's value. Raises ``NoAttribute`` (ENODATA)."""
        try:
            return (await self._xattr_map(ino))[name]
        except KeyError:
            raise errors.NoAttribute(name.decode(errors="replace")) from None

    async def listxattr(self, ino: Ino) -> list[bytes]:
        """The names of the inode's extended attributes."""
        return sorted(await self._xattr_map(ino))

    async def setxattr(self, ino: Ino, name: bytes, value: bytes) -> None:
        """Set an extended attribute; see ``Meta.setxattr``."""
        self._xattrs.pop(ino, None)
        self._attrs.pop(ino, None)  # its ctime moves
        await self.meta.setxattr(ino, name, value)

    async def removexattr(self, ino: Ino, name: bytes) -> None:
        """Remove an extended attribute; see ``Meta.removexattr``."""
        self._xattrs.pop(ino, None)
        self._attrs.pop(ino, None)  # its ctime moves
        await self.meta.removexattr(ino, name)

    # ----------------------------------------------------- pass-throughs

    async def parent_of(self, ino: Ino) -> Ino:
        """The directory holding directory ``ino`` (the root is its own). Raises ``NotFound``."""
        return await self.meta.parent_of(ino)

    async def readlink(self, ino: Ino) -> bytes:
        """A symlink's target."""
        return await self.meta.readlink(ino)

    async def readdir(self, ino: Ino, after: int, limit: int) -> list[tuple[bytes, Attrs, int]]:
        """Directory entries after cookie ``after``; see ``Meta.readdir``.
        The entries' extended attributes are cached on the way, in one query:
        ``ls -l`` asks for some of every file it lists.
        """
        page = await self.meta.readdir(ino, after, limit)
        if page:
            found = await self.meta.xattrs_of([a.ino for _, a, _ in page])
            self._cache_xattrs({a.ino: found.get(a.ino, {}) for _, a, _ in page})
        return [(n, self._overlay(a), c) for n, a, c in page]

    async def statfs(self) -> tuple[int, int, int]:
        """``(capacity_bytes, free_bytes, inode_count)``."""
        return await self.meta.statfs()

    async def close(self) -> None:
        """Commit what is still unflushed (best effort), free the spools and
        purge the inodes that lost their last name."""
        for f in list(self._files.values()):
            if f.dirty or f.pending:
                try:
                    await self._commit(f)
                except errors.ChunkfsError as exc:
                    log.error("inode %d: unflushed data lost at unmount: %s", f.ino, exc)
            self._close_spool(f)
        self._files.clear()
        # Unmounted: the kernel holds none of the inodes that lost their last name.
        self._to_purge |= self._unlinked
        await self._purge()


def _make_room(cache: dict[Any, Any], adding: int = 1) -> None:
    """Empty ``cache`` when ``adding`` more entries would take it past
    ``_CACHE_MAX`` (crude, but these caches only save round trips).
    """
    if len(cache) + adding > _CACHE_MAX:
        cache.clear()


def _extents(cmap: ChunkMap) -> list[layout.Extent]:
    return [layout.Extent(c.index, c.offset, c.length) for c in cmap.chunks]


def _os_error(exc: OSError, what: str) -> errors.ChunkfsError:
    cls = errors.NoSpace if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errors.ChunkfsError
    return cls(f"{what}: {os.strerror(exc.errno or errno.EIO)}")


def _writable(flags: int) -> int:
    """1 for open(2) flags that allow writing, else 0."""
    return int(flags & os.O_ACCMODE != os.O_RDONLY)


def _position(ino: Ino, ext: layout.Extent, chunk_id: bytes) -> int:
    """Where the ring places a chunk: small chunks at their file's position
    (one batch request per replica node for the whole file), others at
    their own (a large file's chunks spread over the nodes).
    """
    if ext.length <= BATCH_ITEM_MAX:
        return ring.file_position(ino)
    return ring.key_position(chunk_id)
