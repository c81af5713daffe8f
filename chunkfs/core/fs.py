"""The filesystem core: every operation with its POSIX rules, for any front end.

``FileSystem`` takes plain Python values (inode numbers, names as bytes,
open(2) flags, the caller's ids) and raises ``ChunkfsError`` subclasses,
each carrying its errno; it knows nothing of FUSE or HTTP. The FUSE mount
(``chunkfs.fuse``) translates kernel requests into these calls; a script or
a test can drive it the same way, with no ``/dev/fuse``. The rules it keeps
are those the kernel does not check for a FUSE filesystem: names and their
limits, xattr namespaces, who may see ``trusted.*``, access(2) by mode bits,
setuid/setgid dropped by unprivileged writes and truncates, timestamps
clamped to 64-bit nanoseconds, rename flags, and what a handle was opened for.

Permission bits are the kernel's to check on a mount (default_permissions):
the core does not check them; a front end serving other users asks
``access`` first. The core holds an inode that lost its last name until its
front end calls ``forget`` (a kernel forgets an inode it no longer caches);
``close`` purges the rest.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import trio

from .. import errors
from ..meta import NAME_MAX, Attrs, DirEntry, Ino, Meta, Settings, check_name, now_ns
from ..pg import open_database
from ..store import Blob, ChunkStore
from .caches import TtlCache
from .content_cache import ContentCache
from .handles import OpenFile, OpenFiles
from .scan import SCAN_FILE_MAX, DirectoryScans
from .writer import Writer

log = logging.getLogger(__name__)

# Forgotten inodes with no name left are purged in batches of up to this
# many, at most this many seconds after the last user forgot them.
PURGE_BATCH = 256
PURGE_DELAY_S = 0.05
# renameat2(2) flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# The xattr namespaces kept, as ext4 keeps them. POSIX ACLs (system.*) are
# not supported, as on ext4 mounted noacl: cp -a then falls back to chmod.
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# Names in those namespaces that are not kept: SELinux labels a FUSE mount
# by policy (genfscon), never from an xattr. Answering "not supported"
# lets ls -l stop asking for it after one file of the mount (coreutils
# remembers the device), where each answer costs a FUSE request per file.
XATTR_UNKEPT = frozenset({b"security.selinux"})
# Timestamps are 64-bit nanoseconds (years 1677 to 2262).
_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1
# Inodes are rows in PostgreSQL: statfs reports this many free.
_FREE_INODES = 1 << 32
STATFS_BLOCK = 4096


@dataclass(frozen=True)
class Caller:
    """Who asks: the user and group ids of the calling process."""

    uid: int
    gid: int

    @property
    def privileged(self) -> bool:
        """Whether the caller is root (uid 0)."""
        return self.uid == 0


ROOT = Caller(0, 0)


@dataclass(frozen=True)
class Opened:
    """An open file: its handle number, the content version now committed,
    whether this mount holds unflushed writes to it (the content differs
    from that version), and whether the open changed its mode (setuid /
    setgid dropped by an unprivileged ``O_TRUNC``).
    """

    fh: int
    version: int
    dirty: bool
    mode_changed: bool = False


@dataclass(frozen=True)
class Created:
    """A file just created and opened: its handle number and attributes."""

    fh: int
    attrs: Attrs


@dataclass(frozen=True)
class StatFs:
    """statvfs(3)'s figures: blocks of ``block_size`` bytes, inodes, and
    the longest name (bytes).
    """

    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int


class FileSystem:
    """Filesystem operations over ``Meta`` (metadata) and ``ChunkStore`` (data).

    ``cache_dir`` holds the spool files; ``cache`` keeps committed contents
    for later reads (see ``chunkfs.core.content_cache``). ``attr_ttl`` and ``entry_ttl``
    (seconds) bound how long attributes this mount's own changes returned,
    and names it found absent, are trusted (a kernel's attribute and entry
    timeouts). ``on_commit(ino, version)`` hears of every content version
    committed here.
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
        on_commit: Callable[[Ino, int], None] = lambda ino, version: None,
    ) -> None:
        self.meta = meta
        self.settings = settings
        self.files = OpenFiles(meta.content, store, cache or ContentCache.disabled(), cache_dir)
        self.writer = Writer(meta, self.files, settings, on_commit)
        self.scans = DirectoryScans(meta.content, store)
        # Inodes that lost their last name here; purged when nothing uses them,
        # in batches (one statement for many: rm -rf forgets one per file).
        self._unlinked: set[Ino] = set()
        self._to_purge: set[Ino] = set()
        self._purge_soon = trio.Event()
        # Attributes that this mount's own changes returned, trusted for
        # attr_ttl seconds (as long as the kernel may cache them): the kernel
        # drops its copy at every write and asks again after the close.
        self._attrs: TtlCache[Ino, Attrs] = TtlCache(attr_ttl)
        # Extended attributes per inode, trusted for attr_ttl seconds: the
        # kernel asks for security.capability before every write.
        self._xattrs: TtlCache[Ino, dict[bytes, bytes]] = TtlCache(attr_ttl)
        # Names found absent, trusted as absent for entry_ttl seconds (as long
        # as the kernel may trust a name it looked up) unless this mount gives
        # them meanwhile: the kernel asks again before an O_EXCL create and
        # for a rename's target, right after cp or rsync found the name absent.
        # A name another mount made meanwhile still fails such a create with
        # EEXIST, and a rename replaces it, as the database decides both.
        self._absent: TtlCache[tuple[Ino, bytes], bool] = TtlCache(entry_ttl)
        # Directories this mount made, with the names it gave in them since,
        # trusted for entry_ttl seconds as all their names: any other is
        # absent (cp, rsync and tar look up every name before they create
        # it in the directory they just made), with the same caveat.
        self._made: TtlCache[Ino, set[bytes]] = TtlCache(entry_ttl)
        self._naming_count = 0  # names given by this mount so far, or being given

    # ------------------------------------------------------- attributes

    def _overlay(self, attrs: Attrs) -> Attrs:
        """Attributes with the unflushed size, times and changes of an open file."""
        f = self.files.files.get(attrs.ino)
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
        if cached is not None:
            return self._overlay(cached)
        attrs = await self.meta.namespace.getattr(ino)
        if attrs.is_dir:
            # With default_permissions the kernel asks again after every name
            # change inside (its copy is dropped), to check the permission bits.
            self._attrs.put(ino, attrs)
        return self._overlay(attrs)

    def _dir_changed(self, ino: Ino, now: int, nlink_delta: int = 0) -> None:
        """A name in directory ``ino`` changed at ``now`` (ns): bring its
        trusted attributes to what the metadata statement just wrote.
        """
        self._attrs.refresh(
            ino,
            lambda a: replace(a, mtime_ns=now, ctime_ns=now, nlink=a.nlink + nlink_delta),
        )

    async def lookup(self, parent: Ino, name: bytes) -> Attrs:
        """Attributes of ``name`` in ``parent`` (``.`` and ``..`` included).
        Raises ``NotFound``, ``NameTooLong``.
        """
        if name == b".":
            return await self.getattr(parent)
        if name == b"..":
            return await self.getattr(await self.parent_of(parent))
        check_name(name)
        key = (parent, name)
        given = self._made.get(parent)
        if self._absent.get(key) or (given is not None and name not in given):
            raise errors.NotFound(name.decode(errors="replace"))
        count = self._naming_count
        try:
            return self._overlay(await self.meta.namespace.lookup(parent, name))
        except errors.NotFound:
            # Not when this mount gave a name meanwhile: it may be this one.
            if count == self._naming_count:
                self._absent.put(key, True)
            raise

    @contextmanager
    def _naming(self, parent: Ino, name: bytes) -> Iterator[None]:
        """Around a change that may give ``parent`` the name ``name``: it is
        no longer known absent, nor by a lookup that overlaps the change.
        """
        self._absent.pop((parent, name))
        given = self._made.get(parent)
        if given is not None:
            given.add(name)
        self._naming_count += 1
        try:
            yield
        finally:
            self._absent.pop((parent, name))
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
        """chmod / chown / utimensat / truncate (times in ns, clamped to the
        64-bit range as ext4 clamps to its own). A truncate of a file that no
        handle has open is committed at once; otherwise at the next flush.
        The other changes to a file with unflushed writes, or open for
        writing, wait for its next flush and are committed with its writes in
        one transaction (other mounts see both then, as with close-to-open
        consistency); the rest at once.
        Raises ``FileTooLarge``, ``IsADirectory``, ``NotFound``, ``StorageError``.
        """
        atime_ns = None if atime_ns is None else clamp_ns(atime_ns)
        mtime_ns = None if mtime_ns is None else clamp_ns(mtime_ns)
        if size is not None:
            await self._truncate(ino, size)
        f = self.files.files.get(ino)
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
        attrs = await self.meta.namespace.setattr(
            ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns
        )
        return self._overlay(self._attrs.put(ino, attrs))

    async def _truncate(self, ino: Ino, size: int) -> None:
        attrs = await self.meta.namespace.getattr(ino)
        if attrs.is_dir:
            raise errors.IsADirectory("cannot truncate a directory")
        if size > self.settings.max_file_size:
            raise errors.FileTooLarge(f"{size} bytes is over the maximum file size")
        f = await self.files.get(ino)
        try:
            await self.files.truncate(f, size)
            if f.handles == 0:
                await self._commit(f)
        finally:
            self.files.drop_if_unused(f)

    async def drop_privileged_bits(self, ino: Ino, caller: Caller) -> Attrs | None:
        """Clear setuid / setgid as a write or truncate by an unprivileged
        ``caller`` does (setgid only with group execute, as the kernel does);
        return the new attributes when they changed.
        """
        if caller.privileged:
            return None
        attrs = await self.getattr(ino)
        bits = privileged_bits(attrs.mode)
        if not bits:
            return None
        return await self.setattr(ino, mode=attrs.mode & ~bits)

    async def access(self, ino: Ino, want: int, caller: Caller) -> bool:
        """access(2) by mode bits (``want``: ``os.R_OK | W_OK | X_OK`` or
        ``F_OK``), as the kernel checks them with default_permissions.
        """
        return permitted(await self.getattr(ino), want, caller)

    # -------------------------------------------------------- namespace

    async def create_node(
        self,
        parent: Ino,
        name: bytes,
        mode: int,
        caller: Caller,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Attrs:
        """mkdir / mknod / symlink (``mode`` with its file type, umask
        applied), owned by ``caller``: see ``Namespace.create``.
        """
        now = now_ns()
        with self._naming(parent, name):
            attrs = await self.meta.namespace.create(
                parent, name, mode, caller.uid, caller.gid, rdev=rdev, target=target, now=now
            )
        self._dir_changed(parent, now, 1 if stat.S_ISDIR(mode) else 0)
        self._xattrs.put(attrs.ino, {})  # a new inode has none
        if attrs.is_dir:
            self._made.put(attrs.ino, set())
        return attrs

    async def mkdir(self, parent: Ino, name: bytes, mode: int, caller: Caller) -> Attrs:
        """mkdir(2) with the permission bits of ``mode`` (the caller applies
        its umask), owned by ``caller``.
        """
        return await self.create_node(parent, name, stat.S_IFDIR | (mode & 0o7777), caller)

    async def symlink(self, parent: Ino, name: bytes, target: bytes, caller: Caller) -> Attrs:
        """symlink(2): ``name`` in ``parent`` pointing at ``target``."""
        return await self.create_node(parent, name, stat.S_IFLNK | 0o777, caller, target=target)

    async def link(self, ino: Ino, parent: Ino, name: bytes) -> Attrs:
        """A new hard link; see ``Namespace.link``."""
        self._unlinked.discard(ino)
        self._attrs.pop(ino)
        self._attrs.pop(parent)
        with self._naming(parent, name):
            return self._overlay(await self.meta.namespace.link(ino, parent, name))

    async def unlink(self, parent: Ino, name: bytes, *, is_dir: bool = False) -> None:
        """unlink / rmdir (``is_dir``). An inode that lost its last name is
        purged once no handle has it open and the front end has called
        ``forget`` for it (or at ``close``). Raises ``NotFound``,
        ``IsADirectory``, ``NotADirectory``, ``NotEmpty``.
        """
        now = now_ns()
        attrs = await self.meta.namespace.unlink(parent, name, is_dir=is_dir, now=now)
        self._dir_changed(parent, now, -1 if is_dir else 0)
        self._attrs.pop(attrs.ino)
        if attrs.nlink == 0:
            self._unlinked.add(attrs.ino)

    async def rename(
        self, old_parent: Ino, old_name: bytes, new_parent: Ino, new_name: bytes, flags: int = 0
    ) -> None:
        """rename(2) with renameat2's ``flags`` (``RENAME_NOREPLACE``,
        ``RENAME_EXCHANGE``); see ``Namespace.rename``. Raises
        ``InvalidArgument`` for other flags.
        """
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise errors.InvalidArgument("unsupported rename flags")
        now = now_ns()
        with self._naming(new_parent, new_name):
            done = await self.meta.namespace.rename(
                old_parent,
                old_name,
                new_parent,
                new_name,
                noreplace=bool(flags & RENAME_NOREPLACE),
                exchange=bool(flags & RENAME_EXCHANGE),
                now=now,
            )
        if done.moved is None:
            self._attrs.clear()  # a directory's move or an exchange reaches further
        else:
            self._attrs.pop(done.moved)
            self._dir_changed(old_parent, now)
            if new_parent != old_parent:
                self._dir_changed(new_parent, now)
        if done.replaced is not None:
            self._attrs.pop(done.replaced.ino)
            if done.replaced.nlink == 0:
                self._unlinked.add(done.replaced.ino)

    async def forget(self, ino: Ino) -> None:
        """No user holds ``ino`` any more: purge it (within ``PURGE_DELAY_S``
        seconds, see ``run_purger``) if it has no name and no open handle.
        Never raises.
        """
        if ino in self._unlinked and ino not in self.files.files:
            self._to_purge.add(ino)
            if len(self._to_purge) >= PURGE_BATCH:
                self._purge_soon.set()

    async def forget_unlinked(self) -> None:
        """``forget`` every inode that lost its last name here: for a front
        end that keeps no lookup counts (the S3 gateway), an inode is in use
        only while a handle has it open.
        """
        for ino in list(self._unlinked):
            await self.forget(ino)

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
        batch = [ino for ino in self._to_purge if ino not in self.files.files]
        self._to_purge.clear()
        if not batch:
            return
        try:
            await self.meta.namespace.purge(batch)
        except errors.ChunkfsError as exc:
            log.warning("could not purge %d inodes: %s", len(batch), exc)
            return
        for ino in batch:
            self._unlinked.discard(ino)
            self._attrs.pop(ino)

    # ------------------------------------------------------------ files

    async def create(
        self, parent: Ino, name: bytes, mode: int, flags: int, caller: Caller
    ) -> Created:
        """Create and open (with open(2) ``flags``) a regular file owned by
        ``caller``, with the permission bits of ``mode`` (the caller's umask
        applied; its file type, if any, must be ``S_IFREG``). Raises
        ``Exists``, ``NameTooLong``, ``NotFound``, ``NotADirectory``, and
        ``InvalidArgument`` for another file type.
        """
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise errors.InvalidArgument("create makes regular files only")
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        now = now_ns()
        with self._naming(parent, name):
            attrs = await self.meta.namespace.create(
                parent, name, mode, caller.uid, caller.gid, now=now
            )
        self._attrs.put(attrs.ino, attrs)
        self._dir_changed(parent, now)
        self._xattrs.put(attrs.ino, {})  # the kernel asks at the first write
        f = self.files.new_file(attrs.ino)
        return Created(self.files.open(f, flags, privileged=caller.privileged), attrs)

    async def open(self, ino: Ino, flags: int, caller: Caller) -> Opened:
        """Open a file with open(2) ``flags`` (``O_TRUNC`` truncates, and
        by an unprivileged caller drops setuid / setgid as a truncate does).
        A file changed by another mount since this one last looked is seen
        in its new version (close-to-open consistency).
        """
        f = await self.files.get(ino)
        cached = self._attrs.get(ino)
        if cached is not None and cached.version != f.base.version:
            self._attrs.pop(ino)  # another mount committed since: close-to-open
        opened = Opened(
            self.files.open(f, flags, privileged=caller.privileged), f.base.version, f.dirty
        )
        reading = flags & os.O_ACCMODE != os.O_WRONLY and not flags & os.O_TRUNC
        if reading and f.size <= SCAN_FILE_MAX and self.files.cold(f):
            self.scans.opened_cold(ino)
        if flags & os.O_TRUNC:
            # Linux truncates even with O_RDONLY (the caller checked write access).
            try:
                await self.files.truncate(f, 0)
                dropped = await self.drop_privileged_bits(ino, caller)
            except BaseException:
                await self.release(opened.fh)
                raise
            opened = replace(opened, dirty=True, mode_changed=dropped is not None)
        return opened

    async def read(self, fh: int, offset: int, length: int) -> Blob:
        """Up to ``length`` bytes at ``offset``; short at the end of the file.
        Raises ``BadDescriptor`` for a handle not open for reading.
        """
        h = self.files.handle(fh)
        if not h.readable:
            raise errors.BadDescriptor("the file is not open for reading")
        return await self.files.read(self.files.files[h.ino], offset, length)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` into the spool; return its length.

        Raises ``BadDescriptor`` for a handle not open for writing,
        ``FileTooLarge`` past the maximum file size and ``NoSpace`` when the
        spool's disk is full.
        """
        h = self.files.handle(fh)
        if not h.writable:
            raise errors.BadDescriptor("the file is not open for writing")
        end = offset + len(data)
        if end > self.settings.max_file_size:
            raise errors.FileTooLarge(f"a write to {end} bytes is over the maximum file size")
        await self.files.write(self.files.files[h.ino], offset, data)
        return len(data)

    async def flush(self, fh: int) -> Attrs | None:
        """close(2) of a descriptor: commit the file's unflushed writes (and
        the attribute changes waiting with them); return the attributes the
        commit wrote, None when there was nothing to commit. Raises what
        ``Writer.commit`` raises; the writes are kept for a retry.
        """
        return await self._commit(self.files.file(fh))

    async def share_content(self, fh: int, source_fh: int) -> Attrs | None:
        """Make the file of handle ``fh`` (with no unflushed writes) a copy
        of the committed version open as ``source_fh`` that shares its
        chunks, uploading nothing; return the attributes committed, or None
        when some chunk is not held on R nodes (the caller then copies the
        bytes). Raises ``BadDescriptor``, ``NotFound``, ``MetadataUnavailable``.
        """
        source = self.files.file(source_fh).base
        attrs = await self.writer.commit_shared(self.files.file(fh), source)
        if attrs is not None:
            self._attrs.put(attrs.ino, attrs)
        return attrs

    def discard(self, fh: int) -> None:
        """Forget handle ``fh`` and drop the file's unflushed writes and
        attribute changes (an upload given up before its commit); the
        committed version stays as it was.
        """
        f = self.files.close(fh)
        if f.handles == 0:
            f.dirty = False
            f.pending.clear()
        self.files.drop_if_unused(f)

    async def fsync(self, fh: int) -> None:
        """fsync(2): the same commit as flush; for a file with nothing to
        commit, the metadata changes made so far are made durable.
        """
        f = self.files.file(fh)
        durable = f.dirty  # a commit of writes is durable at once
        await self._commit(f)
        if not durable:
            await self.meta.sync()

    async def sync(self) -> None:
        """Make every metadata change so far durable (fsync of a directory)."""
        await self.meta.sync()

    async def release(self, fh: int) -> Ino:
        """Forget handle ``fh`` (its last close); return its inode. The last
        handle commits what no ``flush`` committed yet, so a front end may
        call ``flush`` first to see the commit's error, or ``release``
        alone; a commit that fails here is logged and its writes kept for
        the next open to retry.
        """
        f = self.files.close(fh)
        # Without a flush before it (a writable mapping outlives its
        # descriptor), the last writer's release publishes what waited for it.
        if (f.dirty and f.handles == 0) or (f.pending and not f.dirty and not f.writers):
            try:
                await self._commit(f)
            except errors.ChunkfsError as exc:
                log.error("inode %d: unflushed data kept in its spool: %s", f.ino, exc)
        self.files.drop_if_unused(f)
        return f.ino

    async def _commit(self, f: OpenFile) -> Attrs | None:
        attrs = await self.writer.commit(f)
        if attrs is not None:
            self._attrs.put(attrs.ino, attrs)
        return attrs

    # ------------------------------------------------------------ xattrs

    async def xattrs(self, ino: Ino) -> dict[bytes, bytes]:
        """Every extended attribute of ``ino`` (full name -> value). Raises ``NotFound``."""
        return dict(await self._xattr_map(ino))

    async def _xattr_map(self, ino: Ino) -> dict[bytes, bytes]:
        values = self._xattrs.get(ino)
        if values is None:
            values = self._xattrs.put(ino, await self.meta.namespace.xattrs(ino))
        return values

    async def getxattr(self, ino: Ino, name: bytes) -> bytes:
        """An extended attribute's value. Raises ``NoAttribute`` (ENODATA),
        and for a bad name see ``check_xattr_name``.
        """
        check_xattr_name(name)
        try:
            return (await self._xattr_map(ino))[name]
        except KeyError:
            raise errors.NoAttribute(name.decode(errors="replace")) from None

    async def listxattr(self, ino: Ino, caller: Caller) -> list[bytes]:
        """The names of the inode's extended attributes that ``caller`` may
        see (as ext4: ``trusted.*`` only for the privileged).
        """
        names = sorted(n for n in await self._xattr_map(ino) if n not in XATTR_UNKEPT)
        if not caller.privileged:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    async def setxattr(self, ino: Ino, name: bytes, value: bytes) -> None:
        """Set an extended attribute; see ``check_xattr_name`` and
        ``Namespace.setxattr``.
        """
        check_xattr_name(name)
        self._xattrs.pop(ino)
        self._attrs.pop(ino)  # its ctime moves
        await self.meta.namespace.setxattr(ino, name, value)

    async def set_xattrs(self, ino: Ino, values: Mapping[bytes, bytes]) -> None:
        """Set several extended attributes at once (see ``check_xattr_name``
        and ``Namespace.set_xattrs``).
        """
        for name in values:
            check_xattr_name(name)
        self._xattrs.pop(ino)
        self._attrs.pop(ino)  # its ctime moves
        await self.meta.namespace.set_xattrs(ino, values)

    async def removexattr(self, ino: Ino, name: bytes) -> None:
        """Remove an extended attribute; see ``Namespace.removexattr``."""
        check_xattr_name(name)
        self._xattrs.pop(ino)
        self._attrs.pop(ino)  # its ctime moves
        await self.meta.namespace.removexattr(ino, name)

    # ----------------------------------------------------- directories

    async def parent_of(self, ino: Ino) -> Ino:
        """The directory holding directory ``ino`` (the root is its own). Raises ``NotFound``."""
        return await self.meta.namespace.parent_of(ino)

    async def readlink(self, ino: Ino) -> bytes:
        """A symlink's target."""
        return await self.meta.namespace.readlink(ino)

    async def walk(self, start: Ino, names: Sequence[bytes]) -> list[DirEntry]:
        """The entries ``names`` lead to from directory ``start``, in order
        (``names[k]`` in the one before), with their extended attributes;
        as many as exist, stopping at a missing name or a non-directory.
        One round trip; a path's lookups at once.
        """
        found = await self.meta.namespace.walk(start, names)
        for e in found:
            self._xattrs.put(e.attrs.ino, dict(e.xattrs))
        return [replace(e, attrs=self._overlay(e.attrs)) for e in found]

    async def readdir(self, ino: Ino, after: int, limit: int) -> list[DirEntry]:
        """Up to ``limit`` entries of directory ``ino`` with a cookie above
        ``after`` (0: from the start), in cookie order; ``.`` and ``..`` are
        not listed (``lookup`` answers them).
        The entries' extended attributes are cached on the way (the kernel
        asks a file for ``security.capability`` before each write to it).
        """
        page = await self.meta.namespace.readdir(ino, after, limit)
        for e in page:
            self._xattrs.put(e.attrs.ino, dict(e.xattrs))
        self.scans.listed(ino, page, first_page=after == 0)
        return [replace(e, attrs=self._overlay(e.attrs)) for e in page]

    async def statfs(self) -> StatFs:
        """Space (the live nodes' divided by the replica count) and inodes."""
        s = await self.meta.registry.statfs()
        return StatFs(
            block_size=STATFS_BLOCK,
            blocks=s.capacity_bytes // STATFS_BLOCK,
            blocks_free=s.free_bytes // STATFS_BLOCK,
            files=s.inodes + _FREE_INODES,
            files_free=_FREE_INODES,
            name_max=NAME_MAX,
        )

    async def close(self) -> None:
        """Commit what is still unflushed (best effort), free the spools and
        purge the inodes that lost their last name."""
        for f in list(self.files.files.values()):
            if f.dirty or f.pending:
                try:
                    await self._commit(f)
                except errors.ChunkfsError as exc:
                    log.error("inode %d: unflushed data lost at unmount: %s", f.ino, exc)
        self.files.close_all()
        # Closed: no user holds any of the inodes that lost their last name.
        self._to_purge |= self._unlinked
        await self._purge()


@asynccontextmanager
async def open_filesystem(
    dsn: str,
    cache_dir: str,
    *,
    attr_ttl: float = 1.0,
    entry_ttl: float = 1.0,
    cache_bytes: int = 0,
    node_timeout: float = 30.0,
    pg_timeout: float = 30.0,
    node_tls: ssl.SSLContext | None = None,
    async_commit: bool = True,
    on_commit: Callable[[Ino, int], None] = lambda ino, version: None,
) -> AsyncIterator[FileSystem]:
    """A ``FileSystem`` on the cluster whose metadata is at ``dsn``, with
    spools in ``cache_dir`` (which must exist) and a content cache of up to
    ``cache_bytes`` under it (0: none); timeouts in seconds; ``node_tls``
    checks ``https://`` nodes (default ``nodeclient.tls_context()``); see
    ``FileSystem`` for the rest. On exit what is unflushed is committed (best
    effort) and inodes that lost their last name are purged.

    With ``async_commit``, namespace and attribute changes commit
    asynchronously, as a local filesystem's journal does; close, fsync and a
    directory's fsync wait for the disk (see ``pg.open_database``). Without
    it every change is durable when its call returns. Raises ``MetadataUnavailable`` when
    PostgreSQL does not answer and ``ConfigError`` when it holds no chunkfs
    filesystem (or an older schema).
    """
    async with open_database(
        dsn, command_timeout=pg_timeout, async_commit=async_commit, client="chunkfs mount"
    ) as db:
        meta = Meta(db)
        settings = await meta.registry.settings()
        cache = ContentCache(os.path.join(cache_dir, "content"), cache_bytes)
        store = ChunkStore(
            meta,
            settings.cluster_token,
            settings.replicas,
            timeout=node_timeout,
            kept=cache,
            tls=node_tls,
        )
        try:
            await store.refresh(force=True)
            fs = FileSystem(
                meta,
                store,
                settings,
                cache_dir,
                attr_ttl=attr_ttl,
                entry_ttl=entry_ttl,
                cache=cache,
                on_commit=on_commit,
            )
            try:
                yield fs
            finally:
                with trio.CancelScope(shield=True):
                    await fs.close()
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
            cache.close()


def check_xattr_name(name: bytes) -> None:
    """Raise ``InvalidArgument`` for a namespace with no name in it and
    ``NotSupported`` outside the kept namespaces (``XATTR_NAMESPACES``) or
    for a name not kept (``XATTR_UNKEPT``).
    """
    if name in XATTR_NAMESPACES:
        raise errors.InvalidArgument("an xattr name needs more than its namespace")
    if not name.startswith(XATTR_NAMESPACES):
        raise errors.NotSupported("xattr namespace not supported")
    if name in XATTR_UNKEPT:
        raise errors.NotSupported(f"{name.decode()} is not kept (SELinux labels a mount by policy)")


def permitted(attrs: Attrs, want: int, caller: Caller) -> bool:
    """Whether ``caller`` may access the inode of ``attrs`` as ``want``
    (``os.R_OK | W_OK | X_OK``, or ``F_OK``) by its mode bits, as the kernel
    decides with default_permissions (root may read and write anything, and
    execute what someone may execute).
    """
    if want == os.F_OK:
        return True
    if caller.privileged:
        return not (want & os.X_OK) or bool(attrs.mode & 0o111) or attrs.is_dir
    if caller.uid == attrs.uid:
        bits = (attrs.mode >> 6) & 7
    elif caller.gid == attrs.gid:
        bits = (attrs.mode >> 3) & 7
    else:
        bits = attrs.mode & 7
    return want & bits == want


def privileged_bits(mode: int) -> int:
    """The setuid / setgid bits a write or truncate by an unprivileged
    caller clears (setgid only with group execute, as the kernel does).
    """
    bits = mode & stat.S_ISUID
    if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
        bits |= stat.S_ISGID
    return bits


def clamp_ns(ns: int) -> int:
    """A timestamp (ns) clamped to the 64-bit range chunkfs keeps (years
    1677 to 2262), as ext4 clamps beyond its own range.
    """
    return min(max(ns, _NS_MIN), _NS_MAX)
