"""The FUSE adapter: each pyfuse3 request becomes one ``FileSystem`` call.

Translation only, and bookkeeping of what the kernel holds (lookup counts,
cached attributes and pages: ``chunkfs.fuse.inodes``); the rules of each
operation live in ``chunkfs.core``. One decorator turns every
``ChunkfsError`` into ``FUSEError(errno)`` and anything unexpected into EIO
(logged with its traceback), so no exception ever escapes a handler and
kills the mount.
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

from .. import errors, metrics
from ..core import Caller, FileSystem
from ..core.fs import privileged_bits
from ..meta import Attrs, DirEntry, Ino
from ..store import Blob
from .inodes import KernelCache, LookupCounts

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
# The preferred I/O size a stat reports (st_blksize): one FUSE request's worth
# (max_write). cp, cat and stdio size their buffers by it, so a large file is
# copied in 1 MiB writes, each a request, instead of eight times as many.
IO_SIZE = 1 << 20
# readdir offsets 1 and 2 are "." and ".."; a dentry's offset is its cookie + 2.
_DOT_OFFSETS = 2
_READDIR_BATCH = 256


def fuse_errors(fn: F) -> F:
    """Map chunkfs errors to ``FUSEError(errno)`` and the unexpected to EIO."""

    op = fn.__name__
    seconds = metrics.FUSE_SECONDS.labels(op)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            metrics.FUSE_ERRORS.labels(op, errno.errorcode.get(exc.errno, str(exc.errno))).inc()
            raise
        except Exception as exc:
            cause = errors.leaf(exc)
            code = cause.errno if isinstance(cause, errors.ChunkfsError) else errno.EIO
            metrics.FUSE_ERRORS.labels(op, errno.errorcode.get(code, str(code))).inc()
            if isinstance(cause, errors.ChunkfsError):
                log.debug("%s: %s", op, cause)
                raise pyfuse3.FUSEError(code) from None
            log.exception("unexpected error in %s", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            took = time.perf_counter() - start
            seconds.observe(took)
            log.debug("%s took %.2f ms", op, took * 1e3)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps fn's signature


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid)


class _DirHandle:
    """An open directory and the last page of entries read from PostgreSQL.

    The kernel asks for a few dozen entries per readdir (its buffer is
    small); the page fetched for one call serves the next ones too.
    """

    def __init__(self, ino: Ino) -> None:
        self.ino = ino
        self._page: list[DirEntry] = []
        # Once a page ran to the end: the cookie after which nothing was left.
        self._end: int | None = None

    def rewind(self) -> None:
        """From the start again (rewinddir): names given since are listed."""
        self._page, self._end = [], None

    async def entries_after(self, fs: FileSystem, after: int) -> tuple[list[DirEntry], bool]:
        """Entries with a cookie above ``after`` (from the cached page when it
        holds ``after``, else from a fresh one), and whether they run to the
        end of the directory. Once the end was reached, the kernel's call
        past it is answered without a query.
        """
        if self._end is not None and after >= self._end:
            return [], True
        for i, e in enumerate(self._page):
            if e.cookie == after and i + 1 < len(self._page):
                return self._page[i + 1 :], self._end is not None
        self._page = await fs.readdir(self.ino, after, _READDIR_BATCH)
        if len(self._page) < _READDIR_BATCH:
            self._end = self._page[-1].cookie if self._page else after
        return self._page, self._end is not None


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over a ``FileSystem``.

    ``kernel`` is where what the kernel caches is tracked (the same object
    the ``FileSystem`` reports its commits to); ``entry_timeout`` and
    ``attr_timeout`` (seconds) say how long the kernel may cache names and
    attributes.
    """

    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        fs: FileSystem,
        kernel: KernelCache,
        *,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.fs = fs
        self.kernel = kernel
        self.lookups = LookupCounts()
        self._dirs: dict[int, _DirHandle] = {}
        # Write-only handles of unprivileged callers, by fh: their inode and caller.
        self._unprivileged_writers: dict[int, tuple[int, Caller]] = {}
        self._dir_fh = itertools.count(1)
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

    # ----------------------------------------------------------- helpers

    def _entry(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        self.kernel.gave_attrs(attrs.ino, attrs.version, attrs.mode)
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
        e.st_blocks = (attrs.size + 511) // 512 if attrs.is_reg else 0
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        return e

    def _looked_up(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel now holds one more reference."""
        self.lookups.add(attrs.ino)
        return self._entry(attrs)

    def _mode_changed(self, attrs: Attrs) -> None:
        """The mode changed under the kernel's cached attributes: drop them."""
        self.kernel.gave_attrs(attrs.ino, attrs.version, attrs.mode)
        pyfuse3.invalidate_inode(attrs.ino, attr_only=True)

    # -------------------------------------------------------- attributes

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(await self.fs.lookup(Ino(parent_inode), name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino in self.lookups.forget(inode_list):
                self.kernel.forget(ino)
                await self.fs.forget(Ino(ino))
        except Exception:
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(Ino(inode)))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.fs.setattr(
            Ino(inode),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(attrs)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.block_size
        s.f_blocks = st.blocks
        s.f_bfree = s.f_bavail = st.blocks_free
        s.f_files = st.files
        s.f_ffree = s.f_favail = st.files_free
        s.f_namemax = st.name_max
        return s

    # --------------------------------------------------------- namespace

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(await self.fs.mkdir(Ino(parent_inode), name, mode, _caller(ctx)))

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.fs.create_node(Ino(parent_inode), name, mode, _caller(ctx), rdev=rdev)
        return self._looked_up(attrs)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.fs.symlink(Ino(parent_inode), name, target, _caller(ctx))
        return self._looked_up(attrs)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(Ino(inode))

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(await self.fs.link(Ino(inode), Ino(new_parent_inode), new_name))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(Ino(parent_inode), name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(Ino(parent_inode), name, is_dir=True)

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
        await self.fs.rename(
            Ino(parent_inode_old), name_old, Ino(parent_inode_new), name_new, flags
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
        if start_id == 0:
            d.rewind()
        # The kernel takes no attributes from the "." and ".." entries of a
        # readdirplus reply: only their inode numbers matter.
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", _dir_entry(d.ino), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = await self.fs.parent_of(d.ino)
            if not pyfuse3.readdir_reply(token, b"..", _dir_entry(parent), 2):
                return
            start_id = 2
        after = start_id - _DOT_OFFSETS
        while True:
            page, last = await d.entries_after(self.fs, after)
            for e in page:
                entry = self._entry(e.attrs)
                if not pyfuse3.readdir_reply(token, e.name, entry, e.cookie + _DOT_OFFSETS):
                    return
                self.lookups.add(e.attrs.ino)  # readdirplus: the kernel took a reference
                after = e.cookie
            if last:
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.sync()

    # ------------------------------------------------------------- files

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        made = await self.fs.create(Ino(parent_inode), name, mode, flags, _caller(ctx))
        return self._file_info(made.fh, made.attrs.ino, flags, ctx), self._looked_up(made.attrs)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # The kernel opens directories with opendir, never here.
        opened = await self.fs.open(Ino(inode), flags, _caller(ctx))
        given = self.kernel.get(inode)
        keep_cache = given.pages_version == opened.version and not opened.dirty
        self.kernel.gave_pages(inode, opened.version)
        if given.attrs_version not in (-1, opened.version):
            # Another mount committed a new version since the kernel cached
            # the size: make it ask again, or reads would stop at the old size
            # (close-to-open consistency).
            pyfuse3.invalidate_inode(inode, attr_only=True)
            self.kernel.gave_attrs(inode, opened.version, given.mode)
        if opened.mode_changed:
            self._mode_changed(await self.fs.getattr(Ino(inode)))
        return self._file_info(opened.fh, inode, flags, ctx, keep_cache=keep_cache)

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
            self._unprivileged_writers[fh] = (inode, _caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=write_only)

    @fuse_errors
    # pyfuse3 replies with any contiguous buffer (its stub says bytes): a
    # window's view goes to the kernel without a copy.
    async def read(self, fh: int, off: int, size: int) -> Blob:  # type: ignore[override]
        return await self.fs.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        writer = self._unprivileged_writers.get(fh)
        if writer is not None and privileged_bits(self.kernel.get(writer[0]).mode):
            # What the kernel does for a write through its page cache, from
            # the mode it holds.
            attrs = await self.fs.drop_privileged_bits(Ino(writer[0]), writer[1])
            if attrs is not None:
                self._mode_changed(attrs)
        return await self.fs.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._unprivileged_writers.pop(fh, None)
        ino = await self.fs.release(fh)
        if self.lookups[ino] == 0:
            await self.fs.forget(ino)

    # ------------------------------------------------------------ xattrs

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.setxattr(Ino(inode), name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.getxattr(Ino(inode), name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.fs.listxattr(Ino(inode), _caller(ctx))

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(Ino(inode), name)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions.
        return await self.fs.access(Ino(inode), mode, _caller(ctx))


def _dir_entry(ino: int) -> pyfuse3.EntryAttributes:
    """The entry of "." or ".." in a readdir reply: a directory's inode number."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = stat.S_IFDIR
    return e
