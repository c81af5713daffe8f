"""A spool: the local buffer of one open file's content.

Writes land here while a file is open, so memory stays bounded whatever the
file's size: in a temporary file, unlinked at creation, that lives as long
as its descriptor. A spool made with ``memory_max`` keeps the content in
memory while it fits in that many bytes and moves it to the file when it
grows past them: a small file then costs no file of its own. Offsets and
lengths are bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import trio

from ..layout import BLOCK_SIZE, HOLE, Extent, chunk_id_of, zero_digest

_ZEROS = bytes(BLOCK_SIZE)


class Spool:
    """A sparse temporary file in ``cache_dir``, holes reading as zeros; or,
    with ``memory_max``, a buffer in memory until the content grows past
    ``memory_max`` bytes. Raises OSError (e.g. ENOSPC) where a file is made
    or written.
    """

    def __init__(self, cache_dir: str, memory_max: int = 0) -> None:
        self._dir = cache_dir
        self._memory_max = memory_max
        self._memory: bytearray | None = bytearray() if memory_max else None
        self._fd = -1 if memory_max else _open_file(cache_dir)

    def fileno(self) -> int:
        """The spool file's descriptor (the content moves to the file first)."""
        self._to_file()
        return self._fd

    def disk_bytes(self) -> int:
        """Bytes the spool takes on local disk (the file's allocated blocks)."""
        return 0 if self._memory is not None else os.fstat(self._fd).st_blocks * 512

    def _to_file(self) -> None:
        """Move the content from memory to a new spool file."""
        if self._memory is None:
            return
        fd = _open_file(self._dir)
        try:
            _pwrite_all(fd, 0, self._memory)
            os.ftruncate(fd, len(self._memory))
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._memory = fd, None

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short past the end)."""
        memory = self._memory  # once: a worker thread may read as the content moves
        if memory is not None:
            return bytes(memory[offset : offset + length])
        return os.pread(self._fd, length, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``; raises OSError (e.g. ENOSPC)."""
        if not data:
            return
        end = offset + len(data)
        memory = self._memory
        if memory is not None and end <= self._memory_max:
            memory.extend(bytes(max(0, offset - len(memory))))
            memory[offset:end] = data
            return
        self._to_file()
        _pwrite_all(self._fd, offset, data)

    def has_data(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` may hold a non-zero byte:
        False only where the spool file has a hole (SEEK_DATA finds none)
        or past the content in memory.
        """
        memory = self._memory
        if memory is not None:
            return length > 0 and offset < len(memory)
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) < offset + length
        except OSError:  # ENXIO: no data at or past offset
            return False

    def hole_blocks(self, start: int, end: int) -> list[int]:
        """The offsets of the ``BLOCK_SIZE`` blocks of ``[start, end)`` (from
        ``start``; the last may end at ``end``) that lie in a hole of the
        spool file, found with SEEK_DATA / SEEK_HOLE, without reading (none
        for content in memory).
        """
        if self._memory is not None:
            return []
        found: list[int] = []
        pos = start
        while pos < end:
            try:
                data = min(os.lseek(self._fd, pos, os.SEEK_DATA), end)
            except OSError:  # ENXIO: only a hole from here on
                data = end
            first = start + -(-(pos - start) // BLOCK_SIZE) * BLOCK_SIZE
            found.extend(
                lo for lo in range(first, data, BLOCK_SIZE) if min(lo + BLOCK_SIZE, end) <= data
            )
            if data >= end:
                break
            pos = os.lseek(self._fd, data, os.SEEK_HOLE)
        return found

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the spool to ``size`` bytes."""
        memory = self._memory
        if memory is not None and size <= self._memory_max:
            del memory[size:]
            memory.extend(bytes(size - len(memory)))
            return
        self._to_file()
        os.ftruncate(self._fd, size)

    async def digests(
        self, extents: Sequence[Extent], known: Mapping[int, bytes] | None = None
    ) -> tuple[list[bytes], list[bytes | None]]:
        """The extents' ``extent_digests`` (``known`` as there), computed by
        worker threads (hashlib releases the GIL) that share the bytes out
        evenly; an extent the spool holds no data in is a hole, found
        without reading it.
        """
        known = dict(known or {})
        ids: dict[int, bytes] = {}
        blocks: dict[int, bytes | None] = {}
        todo = []
        for e in extents:
            base_blocks = any(p in known for p in range(e.offset, e.end, BLOCK_SIZE))
            if not e.length or base_blocks or self.has_data(e.offset, e.length):
                todo.append(e)
                for lo in self.hole_blocks(e.offset, e.end):
                    known.setdefault(lo, zero_digest(min(BLOCK_SIZE, e.end - lo)))
            else:
                ids[e.index], blocks[e.index] = HOLE, None
        # Two shares of about equal bytes: largest first, to the lighter one.
        shares: list[list[Extent]] = [[], []]
        for e in sorted(todo, key=lambda e: -e.length):
            min(shares, key=lambda share: sum(x.length for x in share)).append(e)

        async def run(share: list[Extent]) -> None:
            got = await trio.to_thread.run_sync(extent_digests, self.pread, share, known)
            for e, i, b in zip(share, *got, strict=True):
                ids[e.index], blocks[e.index] = i, b

        async with trio.open_nursery() as nursery:
            for share in shares:
                if share:
                    nursery.start_soon(run, share)
        return [ids[e.index] for e in extents], [blocks[e.index] for e in extents]

    def close(self) -> None:
        """Release the spool's memory or disk space."""
        self._memory = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def extent_digests(
    read: Callable[[int, int], bytes],
    extents: Sequence[Extent],
    known: Mapping[int, bytes] | None = None,
) -> tuple[list[bytes], list[bytes | None]]:
    """Over the bytes ``read(offset, length)`` returns (zeros where it returns
    short): the id of each extent (``layout.chunk_id_of``), and its block digests (the SHA-256 of
    each ``BLOCK_SIZE`` block, concatenated; None for an extent of one block
    or less). A non-empty extent of zeros only is a hole: ``HOLE``, no blocks.
    The blocks in ``known`` (file offset -> digest) are not read.
    """
    known = known or {}
    ids: list[bytes] = []
    blocks: list[bytes | None] = []
    for ext in extents:
        per_block = []
        zeros = ext.length > 0
        for pos in range(ext.offset, ext.end, BLOCK_SIZE):
            n = min(BLOCK_SIZE, ext.end - pos)
            if pos in known:
                per_block.append(known[pos])
                zeros = zeros and known[pos] == zero_digest(n)
                continue
            piece = read(pos, n).ljust(n, b"\0")
            zeros = zeros and piece == (_ZEROS if n == BLOCK_SIZE else bytes(n))
            per_block.append(hashlib.sha256(piece).digest())
        if not per_block:  # an empty extent
            per_block.append(hashlib.sha256(b"").digest())
        ids.append(HOLE if zeros else chunk_id_of(per_block))
        blocks.append(b"".join(per_block) if len(per_block) > 1 and not zeros else None)
    return ids, blocks


def _open_file(cache_dir: str) -> int:
    """A new spool file in ``cache_dir``, already unlinked: its descriptor."""
    if hasattr(os, "O_TMPFILE"):
        return os.open(cache_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    return _unlinked_tempfile(cache_dir)


def _pwrite_all(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unlinked_tempfile(cache_dir: str) -> int:
    fd, path = tempfile.mkstemp(dir=cache_dir, prefix="spool-")
    os.unlink(path)
    return fd
