"""Local-disk durability helpers shared by the mount's content cache and the
storage node: fsync of a directory, syncfs(2), and giving an O_TMPFILE file
a name (linkat(2)). The Linux calls go through libc.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(fd: int) -> None:
    assert _libc is not None
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


# syncfs(fd): write back everything dirty on fd's filesystem (raises
# OSError); None where libc has no syncfs.
syncfs: Callable[[int], None] | None = (
    _syncfs if _libc is not None and hasattr(_libc, "syncfs") else None
)


def link_open_file(fd: int, path: str) -> None:
    """Give the O_TMPFILE file open as ``fd`` the name ``path``: linkat(2)
    with AT_EMPTY_PATH, else through /proc/self/fd. Raises OSError
    (FileExistsError when ``path`` exists).
    """
    if _libc is not None:
        if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), path)
    os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
