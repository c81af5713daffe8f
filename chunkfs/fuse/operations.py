"""The FUSE adapter: each pyfuse3 request becomes one ``VFS`` call.

No SQL and no HTTP here. One decorator turns every ``ChunkfsError`` into
``FUSEError(errno)`` and anything unexpected into EIO (logged with its
traceback), so no exception ever escapes a handler and kills the mount.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from .. import errors
from ..meta import NAME_MAX, Attrs, Ino
from ..vfs import VFS
from .inodes import LookupCounts

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
BLOCK_SIZE = 4096
# The preferred I/O size a stat reports (st_blksize): one FUSE request's worth
# (max_write). cp, cat and stdio size their buffers by it, so a large file is
# copied in 1 MiB writes, each a request, instead of eight times as many.
IO_SIZE = 1 << 20
# readdir offsets 1 and 2 are "." and ".."; a dentry's offset is its cookie + 2.
_DOT_OFFSETS = 2
_READDIR_BATCH = 256
# The xattr namespaces kept, as ext4 keeps them. POSIX ACLs (system.*) are
# not supported, as on ext4 mounted noacl: cp -a then falls back to chmod.
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def fuse_errors(fn: F) -> F:
    """Map chunkfs errors to ``FUSEError(errno)`` and the unexpected to EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            cause = errors.leaf(exc)
            if isinstance(cause, errors.ChunkfsError):
                log.debug("%s: %s", fn.__name__, cause)
                raise pyfuse3.FUSEError(cause.errno) from None
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            log.debug("%s took %.2f ms", fn.__name__, (time.perf_counter() - start) * 1e3)

    return wrapper  # type: ignore[return-value]


class _DirHandle:
    """An open directory and the last page of entries read from PostgreSQL.

    The kernel asks for a few dozen entries per readdir (its buffer is
    small); the page fetched for one call serves the next ones too.
    """

    def __init__(self, ino: Ino) -> None:
        self.ino = ino
        self._page: list[tuple[bytes, Attrs, int]] = []
        self._last = False

    async def entries_after(
        self, vfs: VFS, after: int
    ) -> tuple[list[tuple[bytes, Attrs, int]], bool]:
        """Entries with a cookie above ``after`` (from the cached page when it
        holds ``after``, else from a fresh one), and whether they run to the
        end of the directory.
        """
        for i, (_, _, cookie) in enumerate(self._page):
            if cookie == after and i + 1 < len(self._page):
                return self._page[i + 1 :], self._last
        self._page = await vfs.readdir(self.ino, after, _READDIR_BATCH)
        self._last = len(self._page) < _READDIR_BATCH
        return self._page, self._last


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over a ``VFS``.

    ``entry_timeout`` and ``attr_timeout`` (seconds) say how long the kernel
    may cache names and attributes.
    """

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, *, entry_timeout: float = 1.0, attr_timeout: float = 1.0) -> None:
        super().__init__()
        self.vfs = vfs
        self.lookups = LookupCounts()
        self._dirs: dict[int, _DirHandle] = {}
        # Per inode, the content version and the mode last given to the
        # kernel: an open that finds a newer version drops the kernel's copy;
        # the mode says when a write must drop setuid / setgid (see write).
        self._given: dict[int, tuple[int, int]] = {}
        # Write-only handles of unprivileged callers, by fh: their inode.
        self._unprivileged_writers: dict[int, int] = {}
        self._dir_fh = itertools.count(1)
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

    # ----------------------------------------------------------- helpers

    def _entry(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        self._given[attrs.ino] = (attrs.version, attrs.mode)
        e = pyfuse3.EntryAttributes()
        e.st_ino = attrs.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = attrs.mode
        e.st_nlink = attrs.nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_rdev = attrs.rdev
        e.st_size = attrs.size
        e.st_blksize = IO_SIZE
        e.st_blocks = (attrs.size + 511) // 512 if stat.S_ISREG(attrs.mode) else 0
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        return e

    def _looked_up(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel now holds one more reference."""
        self.lookups.add(attrs.ino)
        return self._entry(attrs)

    # -------------------------------------------------------- attributes

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            attrs = await self.vfs.getattr(Ino(parent_inode))
        elif name == b"..":
            attrs = await self.vfs.getattr(await self.vfs.parent_of(Ino(parent_inode)))
        else:
            attrs = await self.vfs.lookup(Ino(parent_inode), name)
        return self._looked_up(attrs)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino in self.lookups.forget(inode_list):
                self._given.pop(ino, None)
                await self.vfs.forget(Ino(ino))
        except Exception:  # forget must never raise
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.getattr(Ino(inode)))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.vfs.setattr(
            Ino(inode),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=_clamp_ns(attr.st_atime_ns) if fields.update_atime else None,
            mtime_ns=_clamp_ns(attr.st_mtime_ns) if fields.update_mtime else None,
        )
        return self._entry(attrs)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        capacity, free, inodes = await self.vfs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = capacity // BLOCK_SIZE
        s.f_bfree = s.f_bavail = free // BLOCK_SIZE
        # Inodes are rows in PostgreSQL: report plenty free.
        s.f_files = inodes + (1 << 32)
        s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = NAME_MAX
        return s

    # --------------------------------------------------------- namespace

    async def _make(
        self,
        parent: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.vfs.create_node(
            Ino(parent), name, mode, ctx.uid, ctx.gid, rdev=rdev, target=target
        )
        return self._looked_up(attrs)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, mode, ctx, rdev=rdev)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.vfs.readlink(Ino(inode))

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(await self.vfs.link(Ino(inode), Ino(new_parent_inode), new_name))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.unlink(Ino(parent_inode), name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.unlink(Ino(parent_inode), name, is_dir=True)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise errors.InvalidArgument("unsupported rename flags")
        await self.vfs.rename(
            Ino(parent_inode_old),
            name_old,
            Ino(parent_inode_new),
            name_new,
            noreplace=bool(flags & RENAME_NOREPLACE),
            exchange=bool(flags & RENAME_EXCHANGE),
        )

    # ------------------------------------------------------- directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # The kernel sends opendir only for an inode it knows as a directory.
        fh = next(self._dir_fh)
        self._dirs[fh] = _DirHandle(Ino(inode))
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        # The kernel takes no attributes from the "." and ".." entries of a
        # readdirplus reply: only their inode numbers matter.
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", _dir_entry(d.ino), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = await self.vfs.parent_of(d.ino)
            if not pyfuse3.readdir_reply(token, b"..", _dir_entry(parent), 2):
                return
            start_id = 2
        after = start_id - _DOT_OFFSETS
        while True:
            page, last = await d.entries_after(self.vfs, after)
            for name, attrs, cookie in page:
                if not pyfuse3.readdir_reply(
                    token, name, self._entry(attrs), cookie + _DOT_OFFSETS
                ):
                    return
                self.lookups.add(attrs.ino)  # readdirplus: the kernel took a reference
                after = cookie
            if last:
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.vfs.sync()

    # ------------------------------------------------------------- files

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attrs = await self.vfs.create(Ino(parent_inode), name, mode, flags, ctx.uid, ctx.gid)
        return self._file_info(fh, attrs.ino, flags, ctx), self._looked_up(attrs)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # The kernel opens directories with opendir, never here.
        fh, keep_cache, version = await self.vfs.open(Ino(inode), flags)
        given = self._given.get(inode)
        if given is not None and given[0] != version:
            # Another mount committed a new version since the kernel cached
            # the size: make it ask again, or reads would stop at the old size
            # (close-to-open consistency).
            pyfuse3.invalidate_inode(inode, attr_only=True)
            self._given[inode] = (version, given[1])
        if flags & os.O_TRUNC and ctx.uid != 0:
            # The kernel leaves O_TRUNC to us: drop setuid/setgid as a
            # truncate by an unprivileged caller does on ext4.
            await self._drop_privileged_bits(inode)
        return self._file_info(fh, inode, flags, ctx, keep_cache=keep_cache)

    def _file_info(
        self,
        fh: int,
        inode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
        *,
        keep_cache: bool = False,
    ) -> pyfuse3.FileInfo:
        """The reply to an open or create. A write-only handle can neither
        read nor be mapped: its writes skip the kernel's page cache (direct
        I/O), which saves a copy and the memory; the kernel then leaves
        dropping setuid / setgid on a write to the filesystem (see write).
        """
        write_only = flags & os.O_ACCMODE == os.O_WRONLY
        if write_only and ctx.uid != 0:
            self._unprivileged_writers[fh] = inode
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=write_only)

    async def _drop_privileged_bits(self, inode: int) -> None:
        """Clear setuid / setgid as a write or truncate by an unprivileged
        caller does, and make the kernel forget the mode it holds.
        """
        attrs = await self.vfs.getattr(Ino(inode))
        bits = _privileged_bits(attrs.mode)
        if bits:
            attrs = await self.vfs.setattr(Ino(inode), mode=attrs.mode & ~bits)
            self._given[inode] = (attrs.version, attrs.mode)
            pyfuse3.invalidate_inode(inode, attr_only=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        inode = self._unprivileged_writers.get(fh)
        if inode is not None and _privileged_bits(self._given.get(inode, (0, 0))[1]):
            # What the kernel does for a write through its page cache, from
            # the mode it holds.
            await self._drop_privileged_bits(inode)
        return await self.vfs.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._unprivileged_writers.pop(fh, None)
        ino = await self.vfs.release(fh)
        if self.lookups[ino] == 0:
            await self.vfs.forget(ino)

    # ------------------------------------------------------------ xattrs

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        _check_xattr_name(name)
        await self.vfs.setxattr(Ino(inode), name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        _check_xattr_name(name)
        return await self.vfs.getxattr(Ino(inode), name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = await self.vfs.listxattr(Ino(inode))
        if ctx.uid != 0:  # as ext4: trusted.* names only for the privileged
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_xattr_name(name)
        await self.vfs.removexattr(Ino(inode), name)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions: check the mode bits here.
        attrs = await self.vfs.getattr(Ino(inode))
        return _may_access(attrs, mode, ctx)


def _dir_entry(ino: int) -> pyfuse3.EntryAttributes:
    """The entry of "." or ".." in a readdir reply: a directory's inode number."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = stat.S_IFDIR
    return e


def _privileged_bits(mode: int) -> int:
    """The setuid / setgid bits a write or truncate by an unprivileged
    caller clears (setgid only with group execute, as the kernel does).
    """
    bits = mode & stat.S_ISUID
    if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
        bits |= stat.S_ISGID
    return bits


_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1


def _clamp_ns(ns: int) -> int:
    """Timestamps are kept as 64-bit nanoseconds (years 1677 to 2262): clamp
    beyond, as ext4 clamps beyond its own range.
    """
    return min(max(ns, _NS_MIN), _NS_MAX)


def _check_xattr_name(name: bytes) -> None:
    if name in _XATTR_NAMESPACES:
        raise pyfuse3.FUSEError(errno.EINVAL)  # a namespace with no name in it
    if not name.startswith(_XATTR_NAMESPACES):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


def _may_access(attrs: Attrs, want: int, ctx: pyfuse3.RequestContext) -> bool:
    """access(2) by mode bits, as the kernel does with default_permissions."""
    if want == os.F_OK:
        return True
    if ctx.uid == 0:
        # root may read and write anything, and execute what someone may execute.
        return not (want & os.X_OK) or bool(attrs.mode & 0o111) or stat.S_ISDIR(attrs.mode)
    if ctx.uid == attrs.uid:
        bits = (attrs.mode >> 6) & 7
    elif ctx.gid == attrs.gid:
        bits = (attrs.mode >> 3) & 7
    else:
        bits = attrs.mode & 7
    return want & bits == want
