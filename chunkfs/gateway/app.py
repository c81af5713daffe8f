"""The S3 gateway's HTTP API, as an ASGI app (Starlette): S3's REST
operations translated into calls on ``Buckets`` and ``Multipart``.

Addressing is path-style (``/bucket/key``), and virtual-hosted
(``bucket.DOMAIN/key``) when a domain is given. Every request but the
gateway's own (``/-/health``, ``/-/metrics``; no bucket name starts with
``-``) is authenticated with AWS Signature Version 4 and acts as its
access key's uid/gid. Errors are S3's XML error bodies.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import trio
from cachetools import TTLCache
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import errors, metrics, wire
from ..core import Caller, FileSystem
from ..meta import AccessKey, MultipartUpload
from . import checksums, sigv4, xml
from .buckets import STORED_HEADERS, Buckets, Listed, ObjectInfo
from .chunked import ChunkedBody
from .errors import S3Error, from_chunkfs
from .multipart import Multipart, part_etag

log = logging.getLogger(__name__)

# How long an access key, once read, is trusted (s): a removed key stops
# working within this.
KEY_TTL_S = 5.0
LIST_MAX = 1000
_RESPONSE_OVERRIDES = {
    "response-content-type": "content-type",
    "response-content-language": "content-language",
    "response-expires": "expires",
    "response-cache-control": "cache-control",
    "response-content-disposition": "content-disposition",
    "response-content-encoding": "content-encoding",
}
_BUCKET_SUBRESOURCES_OK = {"location", "uploads", "delete", "list-type", "versioning"}
_UNSUPPORTED = {
    "acl", "policy", "cors", "lifecycle", "tagging", "website", "logging", "notification",
    "replication", "encryption", "object-lock", "retention", "legal-hold", "torrent",
    "versions", "accelerate", "requestPayment", "ownershipControls", "publicAccessBlock",
    "inventory", "analytics", "metrics", "intelligent-tiering", "restore", "select",
    "attributes",
}  # fmt: skip


class GatewayMetrics:
    """The gateway's Prometheus metrics (requests by operation and status,
    bytes in and out, latency in seconds), in a registry of its own.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chunkfs_s3_requests", "S3 requests by operation and HTTP status",
            ["operation", "status"], registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "chunkfs_s3_request_seconds", "S3 request latency by operation (seconds)",
            ["operation"], registry=self.registry,
        )  # fmt: skip
        self.bytes_in = Counter(
            "chunkfs_s3_received_bytes", "Object bytes received", registry=self.registry
        )
        self.bytes_out = Counter(
            "chunkfs_s3_sent_bytes", "Object bytes sent", registry=self.registry
        )


@dataclass
class _Call:
    """One S3 request, parsed: its operation's name (for metrics), bucket,
    key, query (decoded pairs) and the caller once authenticated.
    """

    request: Request
    bucket: str
    key: str
    query: list[tuple[str, str]]
    operation: str = "Unknown"
    caller: Caller | None = None
    signed: sigv4.Signed | None = None
    signing_key: bytes = b""

    @property
    def who(self) -> Caller:
        """The authenticated caller."""
        assert self.caller is not None  # set by authentication
        return self.caller

    @functools.cached_property
    def params(self) -> dict[str, str]:
        """The query as a mapping (a name given twice: its last value)."""
        return dict(self.query)

    @functools.cached_property
    def headers(self) -> dict[str, str]:
        """The request's headers by lower-case name."""
        return {k.lower(): v for k, v in self.request.headers.items()}

    def header(self, name: str) -> str | None:
        """A request header's value (any case of its name), or None."""
        return self.request.headers.get(name)


Handler = Callable[[_Call], Awaitable[Response]]


def parse_query(raw: str) -> list[tuple[str, str]]:
    """The name/value pairs of a query string, percent-decoded (``+`` is
    kept: S3 clients encode a space as ``%20``), blank values kept.
    """
    pairs = []
    for item in raw.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


class GatewayApp:
    """The ASGI app over ``fs``: ``region`` is the one it answers for,
    ``domain`` (or None) enables virtual-hosted addressing, multipart
    uploads live ``upload_ttl_s`` seconds past their last part.
    """

    def __init__(
        self,
        fs: FileSystem,
        *,
        region: str = "us-east-1",
        domain: str | None = None,
        upload_ttl_s: float = 24 * 3600,
    ) -> None:
        self.fs = fs
        self.buckets = Buckets(fs)
        self.multipart = Multipart(self.buckets, upload_ttl_s)
        self.region = region
        self.domain = domain.lower().strip(".") if domain else None
        self.metrics = GatewayMetrics()
        self._keys: TTLCache[str, AccessKey | None] = TTLCache(maxsize=1024, ttl=KEY_TTL_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        if request.url.path in ("/-/health", "/-/metrics"):
            response = await self._own(request)
        else:
            response = await self._s3(request)
        await response(scope, receive, send)

    async def _own(self, request: Request) -> Response:
        if request.url.path == "/-/health":
            return Response(b'{"status": "ok"}\n', media_type="application/json")
        body = generate_latest(self.metrics.registry) + generate_latest(metrics.REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------- framing

    def _address(self, request: Request) -> tuple[str, str]:
        """The bucket and key a request names."""
        path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        path = unquote(path.partition("?")[0], errors="strict")
        host = (request.headers.get("host") or "").lower().rsplit(":", 1)[0]
        if self.domain and host.endswith("." + self.domain):
            return host[: -len(self.domain) - 1], path[1:]
        bucket, _, key = path[1:].partition("/")
        return bucket, key

    async def _s3(self, request: Request) -> Response:
        request_id = secrets.token_hex(8).upper()
        t0 = time.perf_counter()
        call: _Call | None = None
        try:
            bucket, key = self._address(request)
            query = parse_query(request.scope.get("query_string", b"").decode("latin-1"))
            call = _Call(request, bucket, key, query)
            handler = self._route(call)
            await self._authenticate(call)
            response = await handler(call)
            if request.method in ("PUT", "POST", "DELETE"):
                await self.fs.sync()  # what the request changed is durable before it is answered
        except S3Error as exc:
            response = self._error(exc, request, request_id)
        except errors.ChunkfsError as exc:
            response = self._error(from_chunkfs(exc), request, request_id)
        except ClientDisconnect:
            response = self._error(S3Error("IncompleteBody"), request, request_id)
        except UnicodeDecodeError:
            response = self._error(
                S3Error("InvalidArgument", "the path is not UTF-8"), request, request_id
            )
        operation = call.operation if call else "Unknown"
        response.headers["x-amz-request-id"] = request_id
        self.metrics.requests.labels(operation, str(response.status_code)).inc()
        self.metrics.seconds.labels(operation).observe(time.perf_counter() - t0)
        return response

    def _error(self, exc: S3Error, request: Request, request_id: str) -> Response:
        if exc.status >= 500 and exc.code != "NotImplemented":  # a fault here, not a request's
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
        body = b"" if request.method == "HEAD" else xml.error(exc, request.url.path, request_id)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return Response(body, status_code=exc.status, media_type="application/xml", headers=headers)

    def _route(self, call: _Call) -> Handler:
        """The handler of a request, by method, address and subresource."""
        method, p = call.request.method, call.params
        unsupported = _UNSUPPORTED.intersection(p)
        if unsupported:
            raise S3Error("NotImplemented", f"?{sorted(unsupported)[0]} is not supported")
        copy = call.header("x-amz-copy-source") is not None
        routes: dict[str, tuple[str, Handler]]
        if not call.bucket:
            routes = {"GET": ("ListBuckets", self.list_buckets)}
        elif not call.key:
            routes = {
                "PUT": ("CreateBucket", self.create_bucket),
                "HEAD": ("HeadBucket", self.head_bucket),
                "DELETE": ("DeleteBucket", self.delete_bucket),
                "POST": ("DeleteObjects", self.delete_objects),
                "GET": self._bucket_get(p),
            }
            if method == "POST" and "delete" not in p:
                raise S3Error("MethodNotAllowed")
        elif "uploadId" in p:
            routes = {
                "PUT": ("UploadPartCopy", self.upload_part)
                if copy
                else ("UploadPart", self.upload_part),
                "GET": ("ListParts", self.list_parts),
                "POST": ("CompleteMultipartUpload", self.complete_upload),
                "DELETE": ("AbortMultipartUpload", self.abort_upload),
            }
        else:
            routes = {
                "PUT": ("CopyObject", self.copy_object) if copy else ("PutObject", self.put_object),
                "GET": ("GetObject", self.get_object),
                "HEAD": ("HeadObject", self.get_object),
                "DELETE": ("DeleteObject", self.delete_object),
            }
            if "uploads" in p:
                routes["POST"] = ("CreateMultipartUpload", self.create_upload)
        try:
            call.operation, handler = routes[method]
        except KeyError:
            raise S3Error("MethodNotAllowed") from None
        return handler

    def _bucket_get(
        self, p: Mapping[str, str]
    ) -> tuple[str, Callable[[_Call], Awaitable[Response]]]:
        if "location" in p:
            return "GetBucketLocation", self.bucket_location
        if "versioning" in p:
            return "GetBucketVersioning", self.bucket_versioning
        if "uploads" in p:
            return "ListMultipartUploads", self.list_uploads
        if p.get("list-type") == "2":
            return "ListObjectsV2", self.list_objects
        return "ListObjects", self.list_objects

    # ----------------------------------------------------- authentication

    async def _key(self, key_id: str) -> AccessKey | None:
        if key_id in self._keys:
            return self._keys[key_id]
        key = await self.fs.meta.objects.key(key_id)
        self._keys[key_id] = key
        return key

    async def _authenticate(self, call: _Call) -> None:
        """Check the request's signature and time; set its caller. Raises
        ``AccessDenied`` for an anonymous request, ``InvalidAccessKeyId``,
        ``SignatureDoesNotMatch``, ``RequestTimeTooSkewed``.
        """
        signed = sigv4.parse(call.headers, call.query)
        if signed is None:
            raise S3Error("AccessDenied", "anonymous requests are not allowed")
        key = await self._key(signed.scope.access_key_id)
        if key is None:
            raise S3Error("InvalidAccessKeyId")
        if signed.scope.service != "s3":
            raise S3Error("AuthorizationHeaderMalformed", "the credential's service must be s3")
        sigv4.check_time(signed, time.time())
        signing_key = sigv4.signing_key(key.secret, signed.scope)
        raw_path = call.request.scope.get("raw_path", b"").decode("latin-1").partition("?")[0]
        sigv4.check_request(
            signing_key, signed, call.request.method, raw_path or "/", call.query, call.headers
        )
        call.caller, call.signed, call.signing_key = Caller(key.uid, key.gid), signed, signing_key

    # -------------------------------------------------------------- bodies

    def _declared_length(self, call: _Call) -> int | None:
        """The body's length in bytes as the request declares it (decoded,
        for an aws-chunked body); None for a body sent with
        ``Transfer-Encoding: chunked`` and no length. Raises
        ``MissingContentLength``, ``InvalidArgument``, ``EntityTooLarge``
        (over the maximum file size).
        """
        name = "x-amz-decoded-content-length" if self._streaming(call) else "content-length"
        value = call.header(name)
        if value is None:
            if name == "content-length" and "chunked" in (call.header("transfer-encoding") or ""):
                return None
            raise S3Error("MissingContentLength")
        if not value.isdigit():
            raise S3Error("InvalidArgument", f"{name} must be a number")
        length = int(value)
        if length > self.fs.settings.max_file_size:
            raise S3Error("EntityTooLarge")
        return length

    def _streaming(self, call: _Call) -> bool:
        return call.signed is not None and call.signed.streaming

    async def _body(self, call: _Call) -> AsyncIterator[bytes]:
        """The request body, decoded and checked as it arrives: its length
        against the declared one (``IncompleteBody``), its SHA-256 against
        a signed payload hash (``XAmzContentSHA256Mismatch``), the chunk
        signatures of an aws-chunked body, and the ``x-amz-checksum-*``
        sent as a header or trailer (``BadDigest``; ``chunkfs.gateway.checksums``).
        """
        signed = call.signed
        assert signed is not None
        length = self._declared_length(call)
        checksum = checksums.requested(call.headers)
        source: AsyncIterator[bytes] = call.request.stream()
        chunked: ChunkedBody | None = None
        if signed.streaming:
            signer = None
            if signed.payload_hash != sigv4.STREAMING_UNSIGNED_TRAILER:
                signer = sigv4.ChunkSigner(call.signing_key, signed, signed.signature)
            chunked = ChunkedBody(source, signer)
            source = chunked.data()
        digest = hashlib.sha256() if _is_hex_digest(signed.payload_hash) else None
        got = 0
        async for piece in source:
            if not piece:
                continue
            got += len(piece)
            if length is None and got > self.fs.settings.max_file_size:
                raise S3Error("EntityTooLarge")
            if length is not None and got > length:
                raise S3Error("InvalidRequest", "the body is longer than its declared length")
            if digest is not None:
                digest.update(piece)
            if checksum is not None:
                checksum[0].update(piece)
            self.metrics.bytes_in.inc(len(piece))
            yield piece
        if length is not None and got < length:
            raise S3Error("IncompleteBody")
        if digest is not None and digest.hexdigest() != signed.payload_hash:
            raise S3Error("XAmzContentSHA256Mismatch")
        if checksum is not None:
            wanted, value = checksum
            if value is None and chunked is not None:
                value = chunked.trailers.get(f"x-amz-checksum-{wanted.algorithm}")
            wanted.check(value)

    async def _small_body(self, call: _Call) -> bytes:
        """A request document (XML), at most ``xml.BODY_MAX`` bytes, checked
        as ``_body`` checks and against Content-MD5 when sent.
        """
        if (self._declared_length(call) or 0) > xml.BODY_MAX:
            raise S3Error("MalformedXML", "the request document is too large")
        data = b"".join([p async for p in self._body(call)])
        want = _content_md5(call)
        if want is not None and hashlib.md5(data, usedforsecurity=False).digest() != want:
            raise S3Error("BadDigest")
        return data

    # ------------------------------------------------------------ buckets

    async def list_buckets(self, call: _Call) -> Response:
        """ListBuckets: the buckets, by name."""
        found = await self.buckets.list_buckets(call.who)
        doc = xml.document(
            "ListAllMyBucketsResult",
            [
                ("Owner", _owner(call.who.uid)),
                ("Buckets", [
                    ("Bucket", [("Name", name), ("CreationDate", xml.timestamp(attrs.ctime_ns / 1e9))])
                    for name, attrs in found
                ]),
            ],
        )  # fmt: skip
        return _xml(doc)

    async def create_bucket(self, call: _Call) -> Response:
        """CreateBucket (in this gateway's region only)."""
        wanted = xml.location_constraint(await self._small_body(call))
        if wanted and wanted != self.region:
            raise S3Error("InvalidArgument", f"this gateway serves the region {self.region}")
        await self.buckets.create_bucket(call.who, call.bucket)
        return Response(headers={"Location": f"/{call.bucket}"})

    async def head_bucket(self, call: _Call) -> Response:
        """HeadBucket: 200 when the bucket exists and the caller may search it."""
        await self.buckets.bucket(call.who, call.bucket)
        return Response(headers={"x-amz-bucket-region": self.region})

    async def delete_bucket(self, call: _Call) -> Response:
        """DeleteBucket (empty only)."""
        await self.buckets.delete_bucket(call.who, call.bucket)
        return Response(status_code=204)

    async def bucket_location(self, call: _Call) -> Response:
        """GetBucketLocation: this gateway's region (empty for us-east-1, as S3 answers)."""
        await self.buckets.bucket(call.who, call.bucket)
        region = "" if self.region == "us-east-1" else self.region
        return _xml(xml.document("LocationConstraint", [], text=region))

    async def bucket_versioning(self, call: _Call) -> Response:
        """GetBucketVersioning: never enabled."""
        await self.buckets.bucket(call.who, call.bucket)
        return _xml(xml.document("VersioningConfiguration", []))

    # ------------------------------------------------------------ listing

    async def list_objects(self, call: _Call) -> Response:
        """ListObjectsV2 and ListObjects (v1)."""
        p = call.params
        v2 = p.get("list-type") == "2"
        limit = _int_param(p, "max-keys", LIST_MAX, 0, None)
        encoding = p.get("encoding-type")
        if encoding not in (None, "url"):
            raise S3Error("InvalidArgument", "encoding-type must be url")
        prefix, delimiter = p.get("prefix", ""), p.get("delimiter", "")
        if p.get("allow-unordered") == "true" and delimiter:
            raise S3Error("InvalidArgument", "allow-unordered cannot be used with a delimiter")
        if v2:
            token = p.get("continuation-token")
            after = _decode_token(token) if token is not None else p.get("start-after", "")
        else:
            after = p.get("marker", "")
        items, more = await self.buckets.list_objects(
            call.who, call.bucket, prefix=prefix, delimiter=delimiter, after=after,
            limit=min(limit, LIST_MAX),
        )  # fmt: skip

        def enc(text: str) -> str:
            return quote(text, safe="/") if encoding == "url" else text

        owner = v2 is False or p.get("fetch-owner") == "true"
        nodes: list[xml.Node] = [
            ("Name", call.bucket),
            # ListObjects (v1) sends its Prefix as given even with encoding-type=url.
            ("Prefix", enc(prefix) if v2 else prefix),
            ("Delimiter", enc(delimiter) if delimiter else None),
            ("MaxKeys", limit),
            ("EncodingType", encoding),
            ("IsTruncated", more and limit > 0),
        ]
        last = items[-1].key if items else None
        if v2:
            nodes += [
                ("KeyCount", len(items)),
                ("ContinuationToken", p.get("continuation-token")),
                ("NextContinuationToken", _encode_token(last) if more and last else None),
                ("StartAfter", enc(p["start-after"]) if "start-after" in p else None),
            ]
        else:
            nodes += [
                ("Marker", enc(after)),
                ("NextMarker", enc(last) if more and delimiter and last else None),
            ]
        nodes += [_listed(i, enc, owner) for i in items]
        return _xml(xml.document("ListBucketResult", nodes))

    # ------------------------------------------------------------ objects

    def _object_headers(self, call: _Call) -> dict[str, str]:
        """The headers a PUT asks to store with the object."""
        kept = {}
        for name, value in call.request.headers.items():
            name = name.lower()
            if name == "content-type" or name in STORED_HEADERS or name.startswith("x-amz-meta-"):
                kept[name] = value
        if "content-encoding" in kept:
            # aws-chunked is the transfer's encoding, not the object's.
            rest = [e for e in kept["content-encoding"].split(",") if e.strip() != "aws-chunked"]
            if rest:
                kept["content-encoding"] = ",".join(rest).strip()
            else:
                del kept["content-encoding"]
        return kept

    async def put_object(self, call: _Call) -> Response:
        """PutObject."""
        info = await self.buckets.put(
            call.who, call.bucket, call.key, self._body(call), self._object_headers(call),
            content_md5=_content_md5(call),
        )  # fmt: skip
        return Response(headers={"ETag": info.etag})

    async def _source(self, call: _Call, header: str) -> tuple[ObjectInfo, int]:
        """The object a copy reads (opened; the caller releases it), after
        the ``x-amz-copy-source-if-*`` conditions. Raises ``InvalidArgument``
        for a malformed source, ``NoSuchKey``, ``PreconditionFailed``.
        """
        value = unquote(header.partition("?")[0]).lstrip("/")
        bucket, _, key = value.partition("/")
        if not bucket or not key:
            raise S3Error("InvalidArgument", "x-amz-copy-source must be bucket/key")
        info, fh = await self.buckets.open(call.who, bucket, key)
        try:
            verdict = _preconditions(call, info, "x-amz-copy-source-if-")
            if verdict is not None:
                raise S3Error("PreconditionFailed")
        except BaseException:
            await self.fs.release(fh)
            raise
        return info, fh

    async def copy_object(self, call: _Call) -> Response:
        """CopyObject: the copy shares the source's chunks."""
        source, fh = await self._source(call, call.header("x-amz-copy-source") or "")
        try:
            directive = (call.header("x-amz-metadata-directive") or "COPY").upper()
            if directive not in ("COPY", "REPLACE"):
                raise S3Error("InvalidArgument", "x-amz-metadata-directive must be COPY or REPLACE")
            src_path = unquote((call.header("x-amz-copy-source") or "").partition("?")[0]).lstrip(
                "/"
            )
            if directive == "COPY" and src_path == f"{call.bucket}/{call.key}":
                raise S3Error(
                    "InvalidRequest",
                    "This copy request is illegal because it is trying to copy an object to "
                    "itself without changing the object's metadata.",
                )
            headers = dict(source.headers) if directive == "COPY" else self._object_headers(call)
            info = await self.buckets.copy(call.who, source, fh, call.bucket, call.key, headers)
        finally:
            await self.fs.release(fh)
        doc = xml.document(
            "CopyObjectResult",
            [("LastModified", xml.timestamp(info.attrs.mtime_ns / 1e9)), ("ETag", info.etag)],
        )
        return _xml(doc)

    async def get_object(self, call: _Call) -> Response:
        """GetObject and HeadObject, with ranges, conditions and response-* overrides."""
        fh: int | None = None
        if call.request.method == "HEAD":
            info = await self.buckets.head(call.who, call.bucket, call.key)
        else:
            info, fh = await self.buckets.open(call.who, call.bucket, call.key)
        try:
            headers = _object_response_headers(info)
            verdict = _preconditions(call, info, "if-")
            if verdict is not None:
                if verdict == 304:
                    keep = ("ETag", "Last-Modified")
                    return Response(status_code=304, headers={k: headers[k] for k in keep})
                raise S3Error("PreconditionFailed")
            for param, header in _RESPONSE_OVERRIDES.items():
                if param in call.params:
                    headers[header] = call.params[param]
            size = info.attrs.size
            start, end, status = 0, size, 200
            requested = call.header("range")
            if requested is not None:
                try:
                    start, end = wire.parse_range(requested, size)
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
                except wire.RangeNotSatisfiable:
                    raise S3Error("InvalidRange", ActualObjectSize=str(size)) from None
                except ValueError:
                    pass  # S3 ignores a malformed range and sends the whole object
            headers["Content-Length"] = str(end - start)
        except BaseException:
            if fh is not None:
                await self.fs.release(fh)
            raise
        if fh is None:
            return Response(status_code=status, headers=headers)
        return _ObjectResponse(self, fh, start, end, status_code=status, headers=headers)

    async def delete_object(self, call: _Call) -> Response:
        """DeleteObject (204 also when there was none)."""
        await self.buckets.delete(call.who, call.bucket, call.key)
        return Response(status_code=204)

    async def delete_objects(self, call: _Call) -> Response:
        """DeleteObjects: each key's outcome in one document."""
        wanted = xml.delete_request(await self._small_body(call))
        nodes: list[xml.Node] = []
        for key in wanted.keys:
            try:
                await self.buckets.delete(call.who, call.bucket, key)
            except (S3Error, errors.ChunkfsError) as exc:
                failure = exc if isinstance(exc, S3Error) else from_chunkfs(exc)
                if failure.code == "NoSuchBucket":
                    raise
                nodes.append(
                    ("Error", [("Key", key), ("Code", failure.code), ("Message", failure.message)])
                )
                continue
            if not wanted.quiet:
                nodes.append(("Deleted", [("Key", key)]))
        return _xml(xml.document("DeleteResult", nodes))

    # ---------------------------------------------------------- multipart

    async def _upload(self, call: _Call) -> MultipartUpload:
        return await self.multipart.upload(call.who, call.bucket, call.key, call.params["uploadId"])

    async def create_upload(self, call: _Call) -> Response:
        """CreateMultipartUpload."""
        upload = await self.multipart.create(
            call.who, call.bucket, call.key, self._object_headers(call)
        )
        doc = xml.document(
            "InitiateMultipartUploadResult",
            [("Bucket", call.bucket), ("Key", call.key), ("UploadId", upload.upload_id)],
        )
        return _xml(doc)

    async def upload_part(self, call: _Call) -> Response:
        """UploadPart, and UploadPartCopy with x-amz-copy-source[-range]."""
        number = _int_param(call.params, "partNumber", None, 1, 10000)
        upload = await self._upload(call)
        source = call.header("x-amz-copy-source")
        if source is None:
            etag = await self.multipart.put_part(
                upload, number, self._body(call), content_md5=_content_md5(call)
            )
            return Response(headers={"ETag": etag})
        info, fh = await self._source(call, source)
        try:
            start, end = 0, info.attrs.size
            wanted = call.header("x-amz-copy-source-range")
            if wanted is not None:
                start, end = _copy_range(wanted, info.attrs.size)
            etag = await self.multipart.put_part(upload, number, self.buckets.read(fh, start, end))
        finally:
            await self.fs.release(fh)
        doc = xml.document(
            "CopyPartResult", [("LastModified", xml.timestamp(time.time())), ("ETag", etag)]
        )
        return _xml(doc)

    async def complete_upload(self, call: _Call) -> Response:
        """CompleteMultipartUpload (sent again after success: the same answer)."""
        wanted = xml.completed_parts(await self._small_body(call))
        try:
            upload = await self._upload(call)
        except S3Error as exc:
            # Sent again after it succeeded: the same answer, if the key still holds it.
            again = exc.code == "NoSuchUpload"
            done = (
                await self.multipart.completed(call.who, call.bucket, call.key, wanted)
                if again
                else None
            )
            if done is None:
                raise
            info = done
        else:
            info = await self.multipart.complete(call.who, upload, wanted)
        doc = xml.document(
            "CompleteMultipartUploadResult",
            [
                ("Location", f"/{call.bucket}/{quote(call.key)}"),
                ("Bucket", call.bucket),
                ("Key", call.key),
                ("ETag", info.etag),
            ],
        )
        return _xml(doc)

    async def abort_upload(self, call: _Call) -> Response:
        """AbortMultipartUpload."""
        await self.multipart.abort(await self._upload(call))
        return Response(status_code=204)

    async def list_parts(self, call: _Call) -> Response:
        """ListParts."""
        upload = await self._upload(call)
        limit = _int_param(call.params, "max-parts", 1000, 0, None)
        after = _int_param(call.params, "part-number-marker", 0, 0, None)
        parts = [p for p in await self.multipart.parts(upload) if p.number > after]
        shown, more = parts[: min(limit, 1000)], len(parts) > min(limit, 1000)
        nodes: list[xml.Node] = [
            ("Bucket", call.bucket), ("Key", call.key), ("UploadId", upload.upload_id),
            ("Initiator", _owner(upload.uid)), ("Owner", _owner(upload.uid)),
            ("StorageClass", "STANDARD"), ("PartNumberMarker", after),
            ("NextPartNumberMarker", shown[-1].number if shown else after),
            ("MaxParts", limit), ("IsTruncated", more),
        ]  # fmt: skip
        nodes += [
            ("Part", [
                ("PartNumber", p.number), ("LastModified", xml.timestamp(p.modified_s)),
                ("ETag", part_etag(p)), ("Size", p.size),
            ])
            for p in shown
        ]  # fmt: skip
        return _xml(xml.document("ListPartsResult", nodes))

    async def list_uploads(self, call: _Call) -> Response:
        """ListMultipartUploads."""
        p = call.params
        prefix = p.get("prefix", "")
        uploads = [
            u for u in await self.multipart.uploads(call.who, call.bucket)
            if u.key.startswith(prefix)
            and (u.key, u.upload_id) > (p.get("key-marker", ""), p.get("upload-id-marker", ""))
        ]  # fmt: skip
        limit = min(_int_param(p, "max-uploads", 1000, 0, None), 1000)
        shown, more = uploads[:limit], len(uploads) > limit
        nodes: list[xml.Node] = [
            ("Bucket", call.bucket), ("KeyMarker", p.get("key-marker", "")),
            ("UploadIdMarker", p.get("upload-id-marker", "")),
            ("NextKeyMarker", shown[-1].key if more else None),
            ("NextUploadIdMarker", shown[-1].upload_id if more else None),
            ("Prefix", prefix), ("MaxUploads", limit), ("IsTruncated", more),
        ]  # fmt: skip
        nodes += [
            ("Upload", [
                ("Key", u.key), ("UploadId", u.upload_id), ("Initiator", _owner(u.uid)),
                ("Owner", _owner(u.uid)), ("StorageClass", "STANDARD"),
                ("Initiated", xml.timestamp(u.created_s)),
            ])
            for u in shown
        ]  # fmt: skip
        return _xml(xml.document("ListMultipartUploadsResult", nodes))


# ---------------------------------------------------------------- helpers


class _ObjectResponse(Response):
    """An object's bytes ``[start, end)`` from the open handle ``fh``, read
    a piece ahead of the one being sent (reading from the nodes and sending
    to the client overlap); the handle is released at the end, however the
    response ends.
    """

    def __init__(self, app: GatewayApp, fh: int, start: int, end: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app, self.fh, self.start, self.end = app, fh, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pieces_out, pieces_in = trio.open_memory_channel[bytes](1)

        async def produce() -> None:
            async with pieces_out:
                async for piece in self.app.buckets.read(self.fh, self.start, self.end):
                    await pieces_out.send(piece)

        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with pieces_in:
                    async for piece in pieces_in:
                        self.app.metrics.bytes_out.inc(len(piece))
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with trio.CancelScope(shield=True):
                await self.app.fs.release(self.fh)


def _xml(doc: bytes, status: int = 200) -> Response:
    return Response(doc, status_code=status, media_type="application/xml")


def _owner(uid: int) -> list[xml.Node]:
    return [("ID", str(uid)), ("DisplayName", str(uid))]


def _listed(item: Listed, enc: Callable[[str], str], owner: bool) -> xml.Node:
    if item.info is None:
        return ("CommonPrefixes", [("Prefix", enc(item.key))])
    a = item.info.attrs
    return (
        "Contents",
        [
            ("Key", enc(item.key)),
            ("LastModified", xml.timestamp(a.mtime_ns / 1e9)),
            ("ETag", item.info.etag),
            ("Size", a.size),
            ("Owner", _owner(a.uid) if owner else None),
            ("StorageClass", "STANDARD"),
        ],
    )


def _is_hex_digest(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _int_param(
    params: Mapping[str, str], name: str, default: int | None, low: int, high: int | None
) -> int:
    """An integer query parameter within ``[low, high]``. Raises ``InvalidArgument``."""
    value = params.get(name)
    if value is None:
        if default is None:
            raise S3Error("InvalidArgument", f"{name} is required")
        return default
    try:
        n = int(value)
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer") from None
    if n < low or (high is not None and n > high):
        raise S3Error("InvalidArgument", f"{name} is out of range")
    return n


def _content_md5(call: _Call) -> bytes | None:
    """The Content-MD5 a request sends (16 bytes), or None. Raises ``InvalidDigest``."""
    value = call.header("content-md5")
    if value is None:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise S3Error("InvalidDigest") from None
    if len(digest) != 16:
        raise S3Error("InvalidDigest")
    return digest


def _copy_range(header: str, size: int) -> tuple[int, int]:
    """``x-amz-copy-source-range``'s ``bytes=FIRST-LAST`` as ``(start,
    end)``, end exclusive. Raises ``InvalidArgument`` when malformed and
    ``InvalidRange`` when it is not within the source's ``size`` bytes.
    """
    m = re.fullmatch(r"bytes=(\d{1,19})-(\d{1,19})", header.strip())
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise S3Error("InvalidArgument", "x-amz-copy-source-range must be bytes=FIRST-LAST")
    first, last = int(m.group(1)), int(m.group(2))
    if last >= size:
        raise S3Error("InvalidRange", ActualObjectSize=str(size))
    return first, last + 1


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None


def _http_date(ns: int) -> str:
    return email.utils.formatdate(ns / 1e9, usegmt=True)


def _object_response_headers(info: ObjectInfo) -> dict[str, str]:
    headers = {
        "ETag": info.etag,
        "Last-Modified": _http_date(info.attrs.mtime_ns),
        "Accept-Ranges": "bytes",
    }
    headers.update(info.headers)
    return headers


def _preconditions(call: _Call, info: ObjectInfo, prefix: str) -> int | None:
    """304 or 412 when the request's conditional headers (``If-Match``,
    ``If-None-Match``, ``If-Modified-Since``, ``If-Unmodified-Since``, under
    ``prefix``) rule the object out, as RFC 7232 orders them; else None.
    """
    modified_s = info.attrs.mtime_ns // 1_000_000_000

    def since(name: str) -> int | None:
        value = call.header(prefix + name)
        if value is None:
            return None
        try:
            return int(email.utils.parsedate_to_datetime(value).timestamp())
        except (TypeError, ValueError):
            return None

    def matches(value: str) -> bool:
        return any(
            t.strip() in ("*", info.etag) or f'"{t.strip()}"' == info.etag for t in value.split(",")
        )

    if_match, if_none = call.header(prefix + "match"), call.header(prefix + "none-match")
    if if_match is not None:
        if not matches(if_match):
            return 412
    else:
        unmodified = since("unmodified-since")
        if unmodified is not None and modified_s > unmodified:
            return 412
    if if_none is not None:
        if matches(if_none):
            return 304 if prefix == "if-" and call.request.method in ("GET", "HEAD") else 412
    else:
        modified = since("modified-since")
        if modified is not None and modified_s <= modified:
            return 304 if prefix == "if-" else 412
    return None
