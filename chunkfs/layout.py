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

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

CHUNKS_PER_FILE = 6
MIN_UNIT = 4096
# Chunks longer than one block also carry the SHA-256 of each BLOCK_SIZE
# block (the last one may be shorter), so that a range read can be verified
# without fetching the whole chunk; their id is the SHA-256 of those digests
# (``chunk_id_of``), so a commit names a chunk it changed in one block from
# the old digests and that block's new one.
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


def chunk_id_of(block_digests: Sequence[bytes]) -> bytes:
    """The id of a chunk whose ``BLOCK_SIZE`` blocks have these SHA-256
    digests, in order (a chunk of one block or less, the empty one included,
    has one): that digest for one block, else the SHA-256 of the digests
    concatenated, a hash list. Chunks committed by chunkfs before hash lists
    are named by the SHA-256 of their bytes; ``id_matches`` accepts both.
    """
    if len(block_digests) == 1:
        return block_digests[0]
    return hashlib.sha256(b"".join(block_digests)).digest()


class BlockHasher:
    """The block digests of a chunk's bytes, fed in order in pieces of any size."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._block = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash the next bytes."""
        view = memoryview(data)
        while view:
            n = min(len(view), BLOCK_SIZE - self._filled)
            self._block.update(view[:n])
            self._filled += n
            view = view[n:]
            if self._filled == BLOCK_SIZE:
                self._digests.append(self._block.digest())
                self._block, self._filled = hashlib.sha256(), 0

    def add(self, digest: bytes) -> None:
        """Take the digest of the next block (whole, or the last, shorter
        one), known without its bytes. Raises ValueError off a block boundary.
        """
        if self._filled:
            raise ValueError("a known digest must start on a block boundary")
        self._digests.append(digest)

    def digests(self) -> list[bytes]:
        """The digests of every block fed so far (the last may be short;
        one digest, of nothing, when nothing was fed).
        """
        if self._filled or not self._digests:
            return [*self._digests, self._block.digest()]
        return list(self._digests)


def block_digests(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The SHA-256 of each ``BLOCK_SIZE`` block of ``data`` (one for none)."""
    hasher = BlockHasher()
    hasher.update(data)
    return hasher.digests()


def id_matches(chunk_id: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` are the bytes ``chunk_id`` names: as a hash list of
    block digests, or (chunks committed before hash lists) as the SHA-256 of
    the bytes.
    """
    digests = block_digests(data)
    if chunk_id_of(digests) == chunk_id:
        return True
    return len(digests) > 1 and hashlib.sha256(data).digest() == chunk_id


@functools.lru_cache(maxsize=8)
def zero_digest(n: int) -> bytes:
    """The SHA-256 of ``n`` zero bytes (the digest of a block of zeros)."""
    return hashlib.sha256(bytes(n)).digest()
