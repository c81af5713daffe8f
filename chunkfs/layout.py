"""How a file's bytes are cut into its six chunks. Pure logic, no I/O.

A non-empty file of ``size`` bytes has exactly ``CHUNKS_PER_FILE`` contiguous
extents tiling ``[0, size)``, at multiples of a unit ``U``: the smallest
power of two, at least ``MIN_UNIT``, with ``6 * U >= size``. Chunk ``i``
covers ``[i * U, min((i + 1) * U, size))``; the chunks past the end are
empty (a 1-byte file has one chunk of 1 byte and five of 0 bytes). An empty
file has no chunks.

Why powers of two: the boundaries move only when the size crosses a power
of two (as a growing array's capacity does), so an append or a write in
place changes only the chunks it lands in and the others keep their ids
(they are not uploaded again); and every chunk of a file over 3 MiB starts
on the 1 MiB block grid. Files committed before this layout keep their
recorded extents (six near-equal ones): readers go by the recorded offsets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

CHUNKS_PER_FILE = 6
MIN_UNIT = 4096
# Chunks longer than one block also carry the SHA-256 of each BLOCK_SIZE
# block (the last one may be shorter), so that a range read can be verified
# without fetching the whole chunk.
BLOCK_SIZE = 1 << 20
DIGEST_SIZE = 32
# The id recorded for a hole: a non-empty extent of zeros only, which is
# never uploaded and reads as zeros (no SHA-256 output is all zeros).
HOLE = bytes(DIGEST_SIZE)


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


def unit(size: int) -> int:
    """The chunk unit (bytes) of a file of ``size`` bytes: the smallest power
    of two, at least ``MIN_UNIT``, of which ``CHUNKS_PER_FILE`` cover ``size``.
    """
    per_chunk = -(-size // CHUNKS_PER_FILE)  # ceil(size / 6)
    return max(MIN_UNIT, 1 << (per_chunk - 1).bit_length())


def extents(size: int) -> list[Extent]:
    """The six extents of a file of ``size`` bytes (none when ``size`` is 0).

    Raises ValueError for a negative size.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if size == 0:
        return []
    u = unit(size)
    out = []
    for index in range(CHUNKS_PER_FILE):
        start, end = min(index * u, size), min((index + 1) * u, size)
        out.append(Extent(index, start, end - start))
    return out


def overlapping(exts: list[Extent], start: int, end: int) -> list[Extent]:
    """The non-empty extents that share at least one byte with ``[start, end)``."""
    return [e for e in exts if e.length and e.offset < end and start < e.end]


def file_digest(size: int, chunk_ids: Sequence[bytes]) -> bytes:
    """A file version's content digest (32 bytes): the SHA-256 of its size
    (8 bytes, big-endian) followed by its chunk ids in index order, a hash
    list as Dropbox's content hash is. Equal digests mean equal bytes, and a
    commit gets it without reading the chunks it did not change.
    """
    h = hashlib.sha256(size.to_bytes(8, "big"))
    for chunk_id in chunk_ids:
        h.update(chunk_id)
    return h.digest()
