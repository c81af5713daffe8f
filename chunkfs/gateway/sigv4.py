"""AWS Signature Version 4 as S3 checks it: the Authorization header,
presigned URLs, and the signed chunks of an ``aws-chunked`` upload.

The algorithm is AWS's ("Authenticating Requests (AWS Signature Version 4)"
in the Amazon S3 API reference): a canonical request is hashed into a string
to sign, which an HMAC-SHA256 key derived from the secret, the date, the
region and the service signs. Pure logic, no I/O; every failure raises
``S3Error``. Times are seconds since the epoch.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from .errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# How far a request's time may be from ours, and the longest a presigned
# URL may live (seconds), as S3 allows.
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*\Z"
)
_DATE_RE = re.compile(r"\d{8}T\d{6}Z\Z")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Scope:
    """The credential scope: access key id, date (YYYYMMDD), region, service."""

    access_key_id: str
    date: str
    region: str
    service: str

    @property
    def text(self) -> str:
        """The scope as signed: ``date/region/service/aws4_request``."""
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True)
class Signed:
    """What a request claims: its scope, time (``YYYYMMDDTHHMMSSZ``), the
    headers it signed (lower-case, sorted), its signature (hex), the payload
    hash it signed (hex, or one of the ``UNSIGNED``/``STREAMING*`` markers),
    and for a presigned URL how long it lives (seconds; None otherwise).
    """

    scope: Scope
    amz_date: str
    signed_headers: tuple[str, ...]
    signature: str
    payload_hash: str
    expires_s: int | None = None

    @property
    def streaming(self) -> bool:
        """Whether the body comes in ``aws-chunked`` encoding."""
        return self.payload_hash.startswith("STREAMING-")


def parse(headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> Signed | None:
    """The signature a request carries in its ``Authorization`` header
    (``headers``: lower-case names) or its query (a presigned URL); None
    for an anonymous request. Raises ``S3Error`` when it is malformed.
    """
    auth = headers.get("authorization")
    params = dict(query)
    if auth is not None:
        if not auth.startswith(ALGORITHM):
            raise S3Error("InvalidRequest", "only AWS Signature Version 4 is supported")
        m = _AUTH_RE.match(auth)
        if m is None:
            raise S3Error("AuthorizationHeaderMalformed")
        payload = headers.get("x-amz-content-sha256")
        if payload is None:
            raise S3Error("InvalidRequest", "missing the x-amz-content-sha256 header")
        return Signed(
            _scope(m.group(1), "AuthorizationHeaderMalformed"),
            _amz_date(headers.get("x-amz-date") or "", "AuthorizationHeaderMalformed"),
            _signed_headers(m.group(2), "AuthorizationHeaderMalformed"),
            m.group(3),
            payload,
        )
    if "AWSAccessKeyId" in params:
        raise S3Error(
            "InvalidRequest",
            "only AWS Signature Version 4 is supported: presign with signature version s3v4",
        )
    if "X-Amz-Signature" not in params and "X-Amz-Credential" not in params:
        return None
    bad = "AuthorizationQueryParametersError"
    try:
        if params["X-Amz-Algorithm"] != ALGORITHM:
            raise S3Error(bad, "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        expires = int(params["X-Amz-Expires"])
        signature = params["X-Amz-Signature"]
        credential, date, names = (
            params["X-Amz-Credential"], params["X-Amz-Date"], params["X-Amz-SignedHeaders"],
        )  # fmt: skip
    except (KeyError, ValueError):
        raise S3Error(bad) from None
    if not 1 <= expires <= MAX_EXPIRES_S:
        raise S3Error(bad, "X-Amz-Expires must be between 1 second and 7 days")
    if not re.fullmatch(r"[0-9a-f]{64}", signature):
        raise S3Error(bad, "X-Amz-Signature is malformed")
    return Signed(
        _scope(credential, bad),
        _amz_date(date, bad),
        _signed_headers(names, bad),
        signature,
        headers.get("x-amz-content-sha256", UNSIGNED),
        expires,
    )


def _scope(credential: str, code: str) -> Scope:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
        raise S3Error(code, f"the credential {credential!r} is malformed")
    return Scope(*parts[:4])


def _amz_date(value: str, code: str) -> str:
    if not _DATE_RE.match(value):
        raise S3Error(code, "the request's X-Amz-Date is missing or malformed")
    return value


def _signed_headers(value: str, code: str) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    if "host" not in names or any(not n or n != n.lower() for n in names):
        raise S3Error(code, "SignedHeaders must list lower-case names, host among them")
    return names


def epoch_of(amz_date: str) -> int:
    """Seconds since the epoch of a ``YYYYMMDDTHHMMSSZ`` time."""
    return calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))


def check_time(signed: Signed, now: float) -> None:
    """Raise ``RequestTimeTooSkewed`` for a request dated more than
    ``MAX_SKEW_S`` from ``now`` (a presigned URL may be older), and
    ``AccessDenied`` for a presigned URL past its expiry or one whose scope
    is not of its date.
    """
    t = epoch_of(signed.amz_date)
    if signed.scope.date != signed.amz_date[:8]:
        raise S3Error("AccessDenied", "the credential's date is not the request's")
    if signed.expires_s is not None:
        if now > t + signed.expires_s:
            raise S3Error("AccessDenied", "Request has expired")
        if t - now > MAX_SKEW_S:
            raise S3Error("AccessDenied", "Request is not valid yet")
    elif abs(now - t) > MAX_SKEW_S:
        raise S3Error("RequestTimeTooSkewed")


def uri_encode(text: str, *, slash: bool) -> str:
    """``text`` percent-encoded as SigV4 canonicalizes: every byte but
    ``A-Z a-z 0-9 - _ . ~`` (and ``/`` when ``slash``) as ``%XX``.
    """
    return quote(text, safe="/~" if slash else "~")


def canonical_request(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    signed: Signed,
) -> str:
    """The canonical request (``path``: percent-encoded; ``query``: decoded
    name/value pairs, ``X-Amz-Signature`` left out here).
    """
    pairs = sorted(
        (uri_encode(k, slash=False), uri_encode(v, slash=False))
        for k, v in query
        if k != "X-Amz-Signature"
    )
    lines = [method, path, "&".join(f"{k}={v}" for k, v in pairs)]
    lines += [f"{n}:{_SPACES.sub(' ', headers.get(n, '').strip())}" for n in signed.signed_headers]
    lines += ["", ";".join(signed.signed_headers), signed.payload_hash]
    return "\n".join(lines)


def signing_key(secret: str, scope: Scope) -> bytes:
    """The HMAC key of ``scope`` for ``secret``."""
    key = f"AWS4{secret}".encode()
    for part in (scope.date, scope.region, scope.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(key: bytes, string_to_sign: str) -> str:
    """The signature (hex) of a string to sign."""
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def request_signature(key: bytes, signed: Signed, canonical: str) -> str:
    """The signature a request with this canonical form must carry."""
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return sign(key, f"{ALGORITHM}\n{signed.amz_date}\n{signed.scope.text}\n{digest}")


def check_request(
    key: bytes,
    signed: Signed,
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
) -> None:
    """Raise ``SignatureDoesNotMatch`` unless ``signed.signature`` signs
    the request. S3 clients sign the path as they sent it (``raw_path``,
    percent-encoded); one that encodes some character the canonical form
    leaves alone (``~``, say) may have signed the canonical form instead,
    so that is tried as well.
    """
    canonical_path = uri_encode(unquote(raw_path), slash=True)
    for path in dict.fromkeys([raw_path, canonical_path]):
        canonical = canonical_request(method, path, query, headers, signed)
        if hmac.compare_digest(request_signature(key, signed, canonical), signed.signature):
            return
    raise S3Error("SignatureDoesNotMatch")


def verify(expected: str, given: str) -> None:
    """Raise ``SignatureDoesNotMatch`` unless the signatures are equal
    (compared in constant time).
    """
    if not hmac.compare_digest(expected, given):
        raise S3Error("SignatureDoesNotMatch")


@dataclass
class ChunkSigner:
    """The signature chain of an ``aws-chunked`` body: each chunk's
    signature covers its bytes and the previous signature, starting from
    the request's (the seed); the trailer's covers the trailing headers.
    """

    key: bytes
    signed: Signed
    previous: str

    def check_chunk_digest(self, sha256_hex: str, signature: str) -> None:
        """Verify the signature of the next chunk, whose bytes have this
        SHA-256 (hex), and move the chain on.
        """
        text = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                self.signed.amz_date,
                self.signed.scope.text,
                self.previous,
                EMPTY_SHA256,
                sha256_hex,
            ]
        )
        verify(sign(self.key, text), signature)
        self.previous = signature

    def check_trailer(self, trailer: bytes, signature: str) -> None:
        """Verify the trailer's signature (``trailer``: its header lines,
        each ending in a newline).
        """
        text = "\n".join(
            [
                "AWS4-HMAC-SHA256-TRAILER",
                self.signed.amz_date,
                self.signed.scope.text,
                self.previous,
                hashlib.sha256(trailer).hexdigest(),
            ]
        )
        verify(sign(self.key, text), signature)
