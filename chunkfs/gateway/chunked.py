"""The ``aws-chunked`` body of a streaming S3 upload, decoded and checked.

Each chunk is ``hex-size[;chunk-signature=SIG]\\r\\n<bytes>\\r\\n``; a chunk
of size 0 ends the data, and trailing headers (``x-amz-checksum-*``, then
``x-amz-trailer-signature``) may follow before a blank line. With a
``ChunkSigner`` every chunk's signature is verified (the bytes of a chunk
are handed on as they arrive and its signature checked at its end: nothing
is committed before the whole body checks out).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import S3Error
from .sigv4 import ChunkSigner

_HEADER_RE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;chunk-signature=([0-9a-f]{64}))?\Z")
_LINE_MAX = 4096


@dataclass
class ChunkedBody:
    """Decodes one ``aws-chunked`` body from ``source``; ``trailers`` holds
    the trailing headers once ``data()`` is exhausted (lower-case names).
    """

    source: AsyncIterator[bytes]
    signer: ChunkSigner | None
    trailers: dict[str, str] = field(default_factory=dict)
    _buffer: bytearray = field(default_factory=bytearray)

    async def _more(self) -> None:
        try:
            self._buffer += await anext(self.source)
        except StopAsyncIteration:
            raise S3Error("IncompleteBody") from None

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > _LINE_MAX:
                raise S3Error("InvalidRequest", "a malformed aws-chunked body")
            await self._more()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def data(self) -> AsyncIterator[bytes]:
        """The decoded bytes, in pieces. Raises ``S3Error``:
        ``SignatureDoesNotMatch`` for a chunk that fails its signature,
        ``IncompleteBody`` for a body cut short, ``InvalidRequest`` for a
        malformed one.
        """
        while True:
            m = _HEADER_RE.match(await self._line())
            if m is None or (self.signer is not None) != (m.group(2) is not None):
                raise S3Error("InvalidRequest", "a malformed aws-chunked chunk header")
            size = int(m.group(1), 16)
            digest = hashlib.sha256()
            left = size
            while left:
                if not self._buffer:
                    await self._more()
                piece = bytes(self._buffer[:left])
                del self._buffer[: len(piece)]
                left -= len(piece)
                digest.update(piece)
                yield piece
            if self.signer is not None:
                self.signer.check_chunk_digest(digest.hexdigest(), m.group(2).decode())
            if size == 0:
                break
            if await self._line() != b"":
                raise S3Error("InvalidRequest", "an aws-chunked chunk longer than its size")
        await self._read_trailers()

    async def _read_trailers(self) -> None:
        lines: list[bytes] = []
        while line := await self._line():
            lines.append(line)
        signed = b""
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise S3Error("InvalidRequest", "a malformed aws-chunked trailer")
            key = name.decode("latin-1").strip().lower()
            if key == "x-amz-trailer-signature":
                if self.signer is None:
                    raise S3Error("InvalidRequest", "a signed trailer on an unsigned body")
                self.signer.check_trailer(signed, value.decode("latin-1").strip())
            else:
                self.trailers[key] = value.decode("latin-1").strip()
                signed += name.strip().lower() + b":" + value.strip() + b"\n"
