"""The additional checksums of S3 uploads (``x-amz-checksum-ALGORITHM``, as
a header or, for an aws-chunked body, a trailer named in ``x-amz-trailer``):
the body's CRC32, SHA-1 or SHA-256, base64, checked against what arrived.
SDKs send CRC32 by default. CRC32C and CRC64NVME are refused: nothing in
the standard library computes them, and an unchecked checksum would be a
promise not kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Mapping

from .errors import S3Error

_PREFIX = "x-amz-checksum-"
_KNOWN = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
SUPPORTED = ("crc32", "sha1", "sha256")


class Checksum:
    """One checksum of a body being received: ``algorithm`` (a name of
    ``SUPPORTED``), fed with ``update``, checked with ``check``.
    """

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = None if algorithm == "crc32" else hashlib.new(algorithm)

    def update(self, data: bytes) -> None:
        """Take the next bytes of the body."""
        if self._hash is None:
            self._crc = zlib.crc32(data, self._crc)
        else:
            self._hash.update(data)

    def check(self, value: str | None) -> None:
        """Raise ``BadDigest`` unless ``value`` (base64) is the checksum of
        the bytes fed, ``InvalidRequest`` when it is missing or malformed.
        """
        if value is None:
            raise S3Error("InvalidRequest", f"the {_PREFIX}{self.algorithm} trailer is missing")
        try:
            given = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise S3Error("InvalidRequest", f"{_PREFIX}{self.algorithm} is not base64") from None
        mine = self._crc.to_bytes(4, "big") if self._hash is None else self._hash.digest()
        if given != mine:
            raise S3Error(
                "BadDigest",
                f"The {self.algorithm.upper()} you specified did not match the calculated checksum.",
            )


def requested(headers: Mapping[str, str]) -> tuple[Checksum, str | None] | None:
    """The checksum a request asks for (``headers``: lower-case names) and
    its value when it is a header (None: a trailer brings it), or None for
    none. Raises ``InvalidRequest`` for an algorithm not supported and for
    more than one.
    """
    names = [
        n[len(_PREFIX) :] for n in headers if n.startswith(_PREFIX) and n[len(_PREFIX) :] in _KNOWN
    ]
    trailer = headers.get("x-amz-trailer", "").strip().lower()
    if trailer.startswith(_PREFIX):
        names.append(trailer[len(_PREFIX) :])
    if not names:
        return None
    if len(set(names)) > 1:
        raise S3Error("InvalidRequest", "a request may carry one checksum")
    if names[0] not in SUPPORTED:
        raise S3Error(
            "InvalidRequest",
            f"checksum algorithm {names[0].upper()} is not supported: use CRC32, SHA1 or SHA256",
        )
    return Checksum(names[0]), headers.get(_PREFIX + names[0])
