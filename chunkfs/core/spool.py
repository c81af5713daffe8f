"""A spool file: the local, on-disk buffer of one open file's content.

Writes land here while a file is open, so memory stays bounded whatever the
file's size. The file is unlinked at creation; it lives as long as its
descriptor. Offsets and lengths are bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from ..layout import BLOCK_SIZE, Extent

# Size of the pieces the spool is read in when hashing or uploading.
PIECE = 1 << 20


class Spool:
    """A sparse temporary file in ``cache_dir``; holes read as zeros."""

    def __init__(self, cache_dir: str) -> None:
        self._fd = (
            os.open(cache_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
            if hasattr(os, "O_TMPFILE")
            else _unlinked_tempfile(cache_dir)
        )

    def fileno(self) -> int:
        """The spool's file descriptor."""
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short past the end)."""
        return os.pread(self._fd, length, offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset``; raises OSError (e.g. ENOSPC)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the spool to ``size`` bytes."""
        os.ftruncate(self._fd, size)

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """The bytes ``[offset, offset + length)`` in pieces of at most 1 MiB;
        zeros where the spool is shorter.
        """
        end = offset + length
        while offset < end:
            n = min(PIECE, end - offset)
            piece = await trio.to_thread.run_sync(self.pread, offset, n)
            piece = piece.ljust(n, b"\0")
            offset += n
            yield piece

    async def digests(
        self, extents: Sequence[Extent]
    ) -> tuple[list[bytes], list[bytes | None], bytes]:
        """The extents' ``extent_digests`` and the SHA-256 of the whole
        content, computed by three worker threads at once (hashlib releases
        the GIL): the whole content in one, each half of the extents in another.
        """
        half = len(extents) // 2
        size = extents[-1].end if extents else 0
        whole: list[bytes] = []
        head: list[Any] = []
        tail: list[Any] = []

        async def run(out: list[Any], fn: Callable[..., Any], *args: Any) -> None:
            out.append(await trio.to_thread.run_sync(fn, *args))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, whole, sha256_of, self.pread, size)
            nursery.start_soon(run, head, extent_digests, self.pread, extents[:half])
            nursery.start_soon(run, tail, extent_digests, self.pread, extents[half:])
        (head_ids, head_blocks), (tail_ids, tail_blocks) = head[0], tail[0]
        return head_ids + tail_ids, head_blocks + tail_blocks, whole[0]

    def close(self) -> None:
        """Release the spool's disk space."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def extent_digests(
    read: Callable[[int, int], bytes], extents: Sequence[Extent]
) -> tuple[list[bytes], list[bytes | None]]:
    """Over the bytes ``read(offset, length)`` returns (zeros where it returns
    short): the SHA-256 of each extent, and its block digests (the SHA-256 of
    each ``BLOCK_SIZE`` block, concatenated; None for an extent of one block
    or less).
    """
    ids: list[bytes] = []
    blocks: list[bytes | None] = []
    for ext in extents:
        h = hashlib.sha256()
        per_block = []
        for pos in range(ext.offset, ext.end, BLOCK_SIZE):
            n = min(BLOCK_SIZE, ext.end - pos)
            piece = read(pos, n).ljust(n, b"\0")
            h.update(piece)
            per_block.append(hashlib.sha256(piece).digest())
        ids.append(h.digest())
        blocks.append(b"".join(per_block) if len(per_block) > 1 else None)
    return ids, blocks


def sha256_of(read: Callable[[int, int], bytes], size: int) -> bytes:
    """The SHA-256 of the first ``size`` bytes ``read(offset, length)`` returns
    (zeros where it returns short), read in ``PIECE`` pieces.
    """
    h = hashlib.sha256()
    for pos in range(0, size, PIECE):
        n = min(PIECE, size - pos)
        h.update(read(pos, n).ljust(n, b"\0"))
    return h.digest()


def _unlinked_tempfile(cache_dir: str) -> int:
    fd, path = tempfile.mkstemp(dir=cache_dir, prefix="spool-")
    os.unlink(path)
    return fd
