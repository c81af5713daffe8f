"""How a file's bytes are cut into its six chunks. Pure logic, no I/O.

A non-empty file of ``size`` bytes has exactly ``CHUNKS_PER_FILE`` contiguous
extents tiling ``[0, size)``; the first ``size % 6`` extents are one byte
longer than the rest, so lengths differ by at most one byte. A file of 1 byte
has one extent of 1 byte and five of 0 bytes. An empty file has no chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNKS_PER_FILE = 6
# Chunks longer than one block also carry the SHA-256 of each BLOCK_SIZE
# block (the last one may be shorter), so that a range read can be verified
# without fetching the whole chunk.
BLOCK_SIZE = 1 << 20
DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class Extent:
    """One chunk's place in a file: ``index`` 0..5, ``offset`` and ``length`` in bytes."""

    index: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        """The offset just past the extent (bytes)."""
        return self.offset + self.length


def extents(size: int) -> list[Extent]:
    """The six extents of a file of ``size`` bytes (none when ``size`` is 0).

    Raises ValueError for a negative size.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if size == 0:
        return []
    base, extra = divmod(size, CHUNKS_PER_FILE)
    out = []
    offset = 0
    for index in range(CHUNKS_PER_FILE):
        length = base + (1 if index < extra else 0)
        out.append(Extent(index, offset, length))
        offset += length
    return out


def overlapping(exts: list[Extent], start: int, end: int) -> list[Extent]:
    """The non-empty extents that share at least one byte with ``[start, end)``."""
    return [e for e in exts if e.length and e.offset < end and start < e.end]
