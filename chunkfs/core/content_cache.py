"""The local content cache: committed file contents kept on the mount's disk.

After a file's new version is committed, its spool holds exactly the bytes
of that version; instead of being thrown away it is linked into this cache
under the version's content digest (``layout.file_digest``). Reads of a
version whose digest is here are served from local disk, without a node
request. Blocks of large chunks that a reader fetched at random are kept
here too, under their SHA-256. A digest names its bytes, so an entry is
never stale, whichever mount committed what since.

One mount owns a cache directory at a time (an flock). Entries are trusted
only when the previous owner shut down cleanly: it flushes the directory's
filesystem (syncfs) and leaves a ``clean`` marker, removed again (durably)
before any new entry is made. After a crash the entries are deleted, since
the last pages written before it may never have reached the disk.
The oldest entries go when the cache is over its budget or its filesystem
is short of room (see ``short_of_room``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections import OrderedDict

from .. import metrics
from ..diskio import fsync_dir, link_open_file, syncfs

log = logging.getLogger(__name__)

# Keep this share of the cache's filesystem available (as JuiceFS does), but
# never more than RESERVE_MAX bytes: on a large disk a tenth is far more than
# the other users of the disk need, and statvfs can report a tenth short
# while many gigabytes are free.
MIN_FREE = 0.1
RESERVE_MAX = 1 << 30
_OPEN_FDS = 32
_MARKER = "clean"
_LOCK = ".lock"


class ContentCache:
    """Whole-file contents by SHA-256 in ``directory`` (made if missing),
    at most ``budget`` bytes of them. ``ContentCache.disabled()`` is one that
    keeps nothing (``budget`` 0, or a directory another mount owns).
    """

    def __init__(self, directory: str | None, budget: int) -> None:
        self.directory = directory
        self.budget = budget if directory else 0
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._used = 0
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._lock_fd = -1
        if not self.budget or directory is None:
            return
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("content cache %s is in use by another mount: not caching", directory)
            os.close(self._lock_fd)
            self._lock_fd, self.budget = -1, 0
            return
        self._load()

    @classmethod
    def disabled(cls) -> ContentCache:
        """A cache that keeps nothing."""
        return cls(None, 0)

    def _load(self) -> None:
        assert self.directory is not None
        marker = os.path.join(self.directory, _MARKER)
        clean = os.path.exists(marker)
        entries, dropped = [], 0
        for e in os.scandir(self.directory):
            digest = _digest_of(e.name)
            if digest is None:
                continue
            if not clean:
                os.unlink(e.path)
                dropped += 1
                continue
            st = e.stat()
            entries.append((st.st_mtime_ns, digest, st.st_size))
        if clean:
            os.unlink(marker)
            fsync_dir(self.directory)
        for _, digest, size in sorted(entries):
            self._sizes[digest] = size
            self._used += size
        log.info(
            "content cache %s: %d entries, %d bytes%s",
            self.directory,
            len(self._sizes),
            self._used,
            f" ({dropped} dropped after an unclean shutdown)" if dropped else "",
        )

    def _path(self, digest: bytes) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, digest.hex())

    def adopt(self, fd: int, digest: bytes, size: int) -> bool:
        """Link the open file ``fd`` (an O_TMPFILE spool holding exactly the
        ``size`` bytes whose SHA-256 is ``digest``) into the cache. The
        caller must not write to it afterwards. Returns whether it was kept.
        """
        if not self.fits(digest, size):
            return False
        try:
            link_open_file(fd, self._path(digest))
        except FileExistsError:
            pass
        except OSError as exc:
            log.debug("content cache: cannot keep %s: %s", digest.hex()[:16], exc)
            return False
        return self._admit(digest, size)

    def keep(self, digest: bytes, data: bytes | bytearray) -> bool:
        """Keep ``data``, bytes named by ``digest`` (a block's SHA-256), as
        an entry of its own. Returns whether it was kept.
        """
        if not self.fits(digest, len(data)):
            return False
        path = self._path(digest)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("content cache: cannot keep %s: %s", digest.hex()[:16], exc)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return False
        return self._admit(digest, len(data))

    def fits(self, digest: bytes, size: int) -> bool:
        """Whether a new entry of ``size`` bytes named ``digest`` may be made."""
        return bool(self.budget) and size <= self.budget and digest not in self._sizes

    def _admit(self, digest: bytes, size: int) -> bool:
        """Count the entry just written, evict what is over; whether it stays."""
        self._sizes[digest] = size
        self._used += size
        self._evict()
        return digest in self._sizes

    def holds(self, digest: bytes | None) -> bool:
        """Whether the content ``digest`` is cached."""
        return digest is not None and digest in self._sizes

    def pread(self, digest: bytes | None, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes at ``offset`` (both in bytes) of the cached
        content ``digest``, or None when it is not held. Raises OSError.
        """
        if digest is None or digest not in self._sizes:
            metrics.CACHE_LOOKUPS.labels("miss").inc()
            return None
        metrics.CACHE_LOOKUPS.labels("hit").inc()
        self._sizes.move_to_end(digest)
        fd = self._fds.get(digest)
        if fd is None:
            try:
                fd = os.open(self._path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._forget(digest)
                return None
            self._fds[digest] = fd
            if len(self._fds) > _OPEN_FDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(digest)
        return os.pread(fd, length, offset)

    def _evict(self) -> None:
        assert self.directory is not None
        while self._sizes and (self._used > self.budget or _low_on_space(self.directory)):
            digest = next(iter(self._sizes))
            self._forget(digest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(digest))

    def _forget(self, digest: bytes) -> None:
        self._used -= self._sizes.pop(digest, 0)
        fd = self._fds.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Flush the cache's filesystem and mark the entries trustworthy
        for the next mount; release the directory.
        """
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd < 0:
            return
        assert self.directory is not None
        try:
            # The entries' pages, written since the mount.
            if syncfs is not None:
                syncfs(self._lock_fd)
            else:
                os.sync()
            with open(os.path.join(self.directory, _MARKER), "wb") as f:
                os.fsync(f.fileno())
            fsync_dir(self.directory)
        except OSError as exc:
            log.warning("content cache %s not marked clean: %s", self.directory, exc)
        os.close(self._lock_fd)
        self._lock_fd = -1


def _digest_of(name: str) -> bytes | None:
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def short_of_room(available: int, total: int) -> bool:
    """Whether a filesystem of ``total`` bytes with ``available`` bytes an
    unprivileged writer can still use (statvfs's ``f_bavail``) has less
    than its reserve: ``MIN_FREE`` of it, at most ``RESERVE_MAX``.
    """
    return available < min(total * MIN_FREE, RESERVE_MAX)


def _low_on_space(directory: str) -> bool:
    st = os.statvfs(directory)
    return short_of_room(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
