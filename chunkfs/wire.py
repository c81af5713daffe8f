"""The storage-node protocol's shared parts, used by the client and the node.

Chunk ids: a chunk is named by the SHA-256 of its bytes. The client handles
the 32-byte digest; URLs, JSON and batch bodies carry it as exactly 64
lowercase hex digits, and the node names its chunk files so. Nothing else is
accepted as an id, so no id can name a path outside the node's data directory.

Batch framing (``POST /v1/chunks:batch`` bodies, ``GET /v1/chunks:batch``
answers): entries back to back, each ``[64 hex id][8-byte big-endian
length][length bytes]``, nothing before, between or after them.

Block sources (the ``from=`` of a derived PUT): where each 1 MiB block of a
new chunk comes from, as comma-separated runs: ``-`` the next block of the
body, ``z`` a block of zeros, ``K`` block K of the base chunk; ``X*N`` is a
run of N (base blocks K, K+1, ..., K+N-1 for ``K*N``).

Addresses: a node listens at ``HOST:PORT`` (``[::1]:PORT`` for IPv6), as a
mount serves its metrics.

Byte ranges: the one ``Range: bytes=...`` form nodes and the S3 gateway take.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DIGEST_SIZE = 32
# Also the pattern of the node's {chunk_id} route.
ID_PATTERN = "[0-9a-f]{64}"
_ID_RE = re.compile(ID_PATTERN + r"\Z")
_ENTRY_HEADER = struct.Struct(">64sQ")
# The most chunks one batch GET (``/v1/chunks:batch?ids=...``) may name.
BATCH_GET_MAX = 64


class MalformedBatch(ValueError):
    """A batch body that does not follow the framing."""


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One chunk in a batch: its id (64 lowercase hex digits) and its bytes."""

    chunk_id: str
    data: bytes


# A block source: a base block number, BODY or ZERO.
Source = int | str | None
BODY: Source = None
ZERO: Source = "z"


def encode_sources(sources: Sequence[Source]) -> str:
    """The ``from=`` text of block ``sources`` (see the module doc)."""
    runs: list[str] = []
    i = 0
    while i < len(sources):
        src, n = sources[i], 1
        while i + n < len(sources) and sources[i + n] == (src + n if isinstance(src, int) else src):
            n += 1
        token = "-" if src is BODY else str(src)
        runs.append(token if n == 1 else f"{token}*{n}")
        i += n
    return ",".join(runs)


def decode_sources(text: str, limit: int) -> list[Source]:
    """The block sources ``text`` names, at most ``limit`` of them. Raises
    ``ValueError`` for anything else.
    """
    out: list[Source] = []
    for run in text.split(","):
        token, star, count = run.partition("*")
        n = int(count) if star else 1
        if n < 1 or len(out) + n > limit or (star and not count.isdigit()):
            raise ValueError(f"bad run {run!r}")
        if token == "-":
            out += [BODY] * n
        elif token == ZERO:
            out += [ZERO] * n
        elif token.isdigit():
            out += range(int(token), int(token) + n)
        else:
            raise ValueError(f"bad block source {token!r}")
    return out


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port). Raises
    ``ValueError`` naming ``what`` (e.g. ``--listen``) when it is not one.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} needs HOST:PORT, not {text!r}")
    return host, int(port)


def is_valid_id(text: str) -> bool:
    """True when ``text`` is a chunk id as the wire carries it: 64 lowercase hex digits."""
    return isinstance(text, str) and _ID_RE.match(text) is not None


def id_to_hex(digest: bytes) -> str:
    """The wire form of a chunk id given as its 32-byte SHA-256 digest.

    Raises ``ValueError`` when ``digest`` is not 32 bytes long.
    """
    if len(digest) != DIGEST_SIZE:
        raise ValueError("chunk id must be a 32-byte SHA-256 digest")
    return digest.hex()


def id_from_hex(text: str) -> bytes:
    """The 32-byte digest of a chunk id in wire form (64 lowercase hex digits).

    Raises ``ValueError`` for anything else (upper case, other lengths, non-hex).
    """
    if not is_valid_id(text):
        raise ValueError(f"chunk id must be 64 lowercase hex digits, not {text[:80]!r}")
    return bytes.fromhex(text)


def encode_batch(entries: Iterable[BatchEntry]) -> bytes:
    """The batch body carrying ``entries`` in order (empty for none).

    Raises ``ValueError`` for an entry whose id is not in wire form.
    """
    parts = []
    for entry in entries:
        if not is_valid_id(entry.chunk_id):
            raise ValueError(f"bad chunk id {entry.chunk_id[:80]!r} in batch")
        parts.append(_ENTRY_HEADER.pack(entry.chunk_id.encode("ascii"), len(entry.data)))
        parts.append(entry.data)
    return b"".join(parts)


def decode_batch(body: bytes | bytearray) -> list[BatchEntry]:
    """The entries of a batch body, in order; an empty body has none.

    Raises ``MalformedBatch`` (a ``ValueError``) when an entry header is cut
    short, an id is not 64 lowercase hex digits, or a length runs past the
    end of the body.
    """
    entries = []
    view = memoryview(body)
    pos = 0
    while pos < len(body):
        if len(body) - pos < _ENTRY_HEADER.size:
            raise MalformedBatch(f"truncated batch entry header at byte {pos}")
        raw_id, size = _ENTRY_HEADER.unpack_from(body, pos)
        chunk_id = raw_id.decode("ascii", "replace")
        if not is_valid_id(chunk_id):
            raise MalformedBatch(f"bad chunk id in batch at byte {pos}")
        pos += _ENTRY_HEADER.size
        if size > len(body) - pos:
            raise MalformedBatch(f"batch entry {chunk_id} runs past the end of the body")
        entries.append(BatchEntry(chunk_id, bytes(view[pos : pos + size])))
        pos += size
    return entries


_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})\Z")


class RangeNotSatisfiable(Exception):
    """The range starts at or past the end of the chunk (416)."""


def parse_range(header: str, size: int) -> tuple[int, int]:
    """Parse a single HTTP byte range against a body (a chunk, an object) of ``size`` bytes.

    Returns ``(start, end)`` with ``end`` exclusive, clipped to the size.
    Raises ``ValueError`` when malformed (400) and ``RangeNotSatisfiable``
    when it starts past the end (416). Multiple ranges are not supported.
    """
    m = _RANGE_RE.match(header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        raise ValueError(f"malformed Range header {header!r}")
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - n), size
    start = int(first)
    if last != "" and int(last) < start:
        raise ValueError(f"malformed Range header {header!r}")
    if start >= size:
        raise RangeNotSatisfiable()
    end = size if last == "" else min(size, int(last) + 1)
    return start, end
