"""The chunkfs exception tree. Each class carries the errno a caller sees.

The FUSE layer turns any ``ChunkfsError`` into ``FUSEError(exc.errno)``; the
command line prints ``str(exc)`` on one line and exits non-zero.
"""

import errno as _errno
from collections.abc import Iterator
from contextlib import contextmanager


class ChunkfsError(Exception):
    """Base class; ``errno`` is what a filesystem call returns for it."""

    errno = _errno.EIO


class NotFound(ChunkfsError):
    errno = _errno.ENOENT


class Exists(ChunkfsError):
    errno = _errno.EEXIST


class NotEmpty(ChunkfsError):
    errno = _errno.ENOTEMPTY


class NotADirectory(ChunkfsError):
    errno = _errno.ENOTDIR


class IsADirectory(ChunkfsError):
    errno = _errno.EISDIR


class NameTooLong(ChunkfsError):
    errno = _errno.ENAMETOOLONG


class FileTooLarge(ChunkfsError):
    errno = _errno.EFBIG


class NoSpace(ChunkfsError):
    errno = _errno.ENOSPC


class InvalidArgument(ChunkfsError):
    errno = _errno.EINVAL


class NoAttribute(ChunkfsError):
    errno = _errno.ENODATA


class TooManyLinks(ChunkfsError):
    errno = _errno.EMLINK


class NotPermitted(ChunkfsError):
    errno = _errno.EPERM


class NotSupported(ChunkfsError):
    """An operation or a name (an xattr namespace) chunkfs does not support."""

    errno = _errno.EOPNOTSUPP


class BadDescriptor(ChunkfsError):
    """An unknown file handle, or one not open for what is asked of it."""

    errno = _errno.EBADF


class MetadataUnavailable(ChunkfsError):
    """PostgreSQL did not answer (down, unreachable, or timed out)."""

    errno = _errno.EIO


class StorageError(ChunkfsError):
    """A storage node failed, or no replica could serve or take a chunk."""

    errno = _errno.EIO


class NodeUnreachable(StorageError):
    """A storage node could not be reached, or did not answer in time:
    the connection failed or timed out (not an answer of the node's).
    """


class ChunkMissing(StorageError):
    """The node does not hold the chunk (HTTP 404)."""


class DigestMismatch(StorageError):
    """Bytes do not match their SHA-256 (HTTP 422 from a node, or on read)."""


class UploadLost(StorageError):
    """The upload session a commit names is no longer live: it expired, or
    a PostgreSQL failover or crash lost it (sessions commit asynchronously).
    Reclamation may have taken the chunks it protected, so they are pushed
    again under a new session before the commit is tried again.
    """


class NodeFull(StorageError):
    """The node has no room for the chunk (HTTP 507)."""

    errno = _errno.ENOSPC


class ConfigError(ChunkfsError):
    """Bad command-line input or settings: a one-line message for the user."""

    errno = _errno.EINVAL


def leaf(exc: BaseException) -> BaseException:
    """The first ``ChunkfsError`` inside (possibly nested) exception groups,
    which trio's nurseries wrap errors in; else the first leaf; else ``exc``.
    """
    if isinstance(exc, BaseExceptionGroup):
        match, _ = exc.split(ChunkfsError)
        found: BaseException = match if match is not None else exc
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        return found
    return exc


@contextmanager
def unwrapped() -> Iterator[None]:
    """Around code that runs a nursery: an exception group holding a
    ``ChunkfsError`` is raised as that error (its one-line message and
    errno are what callers show); other groups pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        cause = leaf(group)
        if isinstance(cause, ChunkfsError):
            raise cause from None
        raise
