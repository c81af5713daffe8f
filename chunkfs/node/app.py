"""The storage node's HTTP API, as an ASGI app (Starlette; runs on trio via anyio).

Routes (ids are 64 lowercase hex digits, the SHA-256 of the chunk's bytes):

- ``PUT /v1/chunks/{id}``: streamed body with Content-Length; 201 created,
  200 already present; 422 digest mismatch; 411 no Content-Length; 413 over
  the maximum chunk size or the declared length; 400 body shorter than
  declared; 507 no room.
- ``GET /v1/chunks/{id}``: 200 whole chunk, or 206 for ``Range: bytes=a-b``,
  ``bytes=a-`` or ``bytes=-n``; 416 for a range past the end; 400 malformed;
  404 missing, or quarantined when a whole read finds that its bytes no
  longer match the id.
- ``HEAD /v1/chunks/{id}``: 200 with Content-Length, or 404.
- ``DELETE /v1/chunks/{id}[?before_ns=N]``: 204; 404 missing; 409 refused by
  the guard (the chunk was re-used at or after ``before_ns``).
- ``GET /v1/chunks?after=ID&limit=N``: ``{"chunks": [...], "next": ID|null}``.
- ``POST /v1/chunks:batch``: body in the batch framing of ``chunkfs.wire``
  (repeated ``[64 hex id][8-byte big-endian length][bytes]``); 200
  ``{"created": [bool, ...]}`` once all are durable; 422 if any digest is
  wrong (none stored); 400 malformed.
- ``GET /v1/chunks:batch?ids=ID,ID,...``: several whole chunks (at most 64,
  adding up to the batch limit) in the batch framing above; 404 if any is
  missing, 400 malformed or too large.
- ``GET /v1/health``: JSON status and space; the only route without a token.
- ``GET /metrics``: Prometheus text.

A malformed id anywhere under ``/v1/chunks/`` is 400 (with no body for HEAD).
Every other request needs ``Authorization: Bearer <cluster token>`` (401).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import wire
from ..errors import ChunkMissing, DigestMismatch, InvalidArgument, NodeFull
from ..layout import BLOCK_SIZE, id_matches
from ..wire import RangeNotSatisfiable, parse_range
from .disk import ChunkDisk, DeleteRefused, LengthMismatch

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_CHUNK_SIZE = 2 << 30
DEFAULT_MAX_BATCH_BYTES = 64 << 20
LIST_DEFAULT_LIMIT = 1000
LIST_MAX_LIMIT = 10000
# Ranges this small are read in one piece and sent as a plain body.
_SMALL_READ = 1 << 20
_HEALTH_PATH = "/v1/health"
_LENGTH_RE = re.compile(r"\d{1,19}\Z")


class ChunkIdConvertor(Convertor[str]):
    """Path convertor ``{name:chunk_id}``: matches only a chunk id in wire form.

    Routes using it never see a malformed id: such paths fall through to the
    catch-all route under /v1/chunks/, which answers 400.
    """

    regex = wire.ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("chunk_id", ChunkIdConvertor())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Metrics:
    """The node's Prometheus metrics, in a registry of its own."""

    def __init__(self, disk: ChunkDisk) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chunkfs_node_requests",
            "HTTP requests served",
            ["method", "status"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "chunkfs_node_received_bytes", "Request body bytes received", registry=self.registry
        )
        self.bytes_out = Counter(
            "chunkfs_node_sent_bytes", "Response body bytes sent", registry=self.registry
        )
        chunks = Gauge("chunkfs_node_chunks", "Chunks stored", registry=self.registry)
        chunks.set_function(lambda: disk.chunk_count)
        used = Gauge("chunkfs_node_used_bytes", "Bytes of chunks stored", registry=self.registry)
        used.set_function(lambda: disk.used_bytes)


class _Gate:
    """ASGI middleware: checks the bearer token and counts requests and bytes."""

    def __init__(self, app: ASGIApp, token: str, metrics: _Metrics) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        metrics = self._metrics
        status = [500]

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                metrics.bytes_in.inc(len(message.get("body", b"")))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                metrics.bytes_out.inc(len(message.get("body", b"")))
                if not message.get("more_body", False):
                    await _send_last(send, message)
                    return
            await send(message)

        try:
            if scope["path"] == _HEALTH_PATH or self._authorized(scope):
                await self._app(scope, counting_receive, counting_send)
            else:
                response = _error(
                    401, "missing or wrong cluster token", {"WWW-Authenticate": "Bearer"}
                )
                await response(scope, counting_receive, counting_send)
        finally:
            metrics.requests.labels(scope["method"], str(status[0])).inc()


async def _send_last(send: Send, message: Message) -> None:
    """Send the last body message of a response, tolerating a client already gone.

    A client that has the whole response (Content-Length reached) may close
    the connection at once, e.g. after an early 401 or 413 whose request body
    it never sent. Hypercorn's trio worker then closes the socket while it
    still flushes the (empty) end of the message, which raises
    ``BusyResourceError`` although nothing was lost.
    """
    try:
        await send(message)
    except trio.BusyResourceError:
        log.debug("client closed the connection as the response ended")


class NodeApp:
    """The route handlers over one ``ChunkDisk``. Sizes are in bytes."""

    def __init__(self, disk: ChunkDisk, *, max_chunk_size: int, max_batch_bytes: int) -> None:
        self.disk = disk
        self.max_chunk_size = max_chunk_size
        self.max_batch_bytes = max_batch_bytes

    def routes(self) -> list[Route]:
        """The Starlette routes; HEAD comes before GET so it gets its own handler."""
        chunk = "/v1/chunks/{chunk_id:chunk_id}"
        return [
            Route(_HEALTH_PATH, self.health, methods=["GET"]),
            Route("/v1/chunks", self.list_chunks, methods=["GET"]),
            Route("/v1/chunks:batch", self.put_batch, methods=["POST"]),
            Route("/v1/chunks:batch", self.get_batch, methods=["GET"]),
            Route(chunk, self.head_chunk, methods=["HEAD"]),
            Route(chunk, self.get_chunk, methods=["GET"]),
            Route(chunk, self.put_chunk, methods=["PUT"]),
            Route(chunk, self.delete_chunk, methods=["DELETE"]),
            # Anything else under /v1/chunks/ (e.g. "../x", upper case) is a malformed id.
            Route(
                "/v1/chunks/{rest:path}",
                self.bad_id,
                methods=["GET", "HEAD", "PUT", "DELETE", "POST"],
            ),
        ]

    async def bad_id(self, request: Request) -> Response:
        """Any other path under /v1/chunks/: a malformed id (400; no body for HEAD)."""
        if request.method == "HEAD":
            return Response(status_code=400)
        return _error(400, "chunk id must be 64 lowercase hex digits")

    # ------------------------------------------------------------ handlers

    async def health(self, request: Request) -> Response:
        """GET /v1/health: status, node id, space in bytes, chunk count, clock (ns)."""
        stats = await self.disk.stats()
        return JSONResponse(
            {
                "status": "ok",
                "node_id": self.disk.node_id,
                "capacity_bytes": stats.capacity_bytes,
                "used_bytes": stats.used_bytes,
                "free_bytes": stats.free_bytes,
                "chunk_count": stats.chunk_count,
                "now_ns": time.time_ns(),
            }
        )

    async def put_chunk(self, request: Request) -> Response:
        """PUT /v1/chunks/{id}: store a streamed chunk (201 created, 200
        present); with ``?length=N&from=SOURCES[&base=ID]``, build it from
        its block sources (``chunkfs.wire``; ``ChunkDisk.derive``): the body
        holds only the blocks it does not name otherwise (404 without the base).
        """
        chunk_id = request.path_params["chunk_id"]
        length, problem = self._declared_length(request, self.max_chunk_size)
        if problem is not None:
            return problem
        query = request.query_params
        try:
            if "from" in query:
                chunk_length = int(query.get("length", ""))
                if not 0 <= chunk_length <= self.max_chunk_size:
                    raise ValueError("length out of range")
                blocks = -(-chunk_length // BLOCK_SIZE)
                sources = wire.decode_sources(query["from"], blocks)
                created = await self.disk.derive(
                    chunk_id, chunk_length, query.get("base"), sources, request.stream()
                )
            else:
                created = await self.disk.put(chunk_id, request.stream(), length)
        except ValueError as exc:
            return _error(400, f"malformed derive parameters: {exc}")
        except InvalidArgument as exc:
            return _error(400, str(exc))
        except ChunkMissing as exc:
            return _error(404, str(exc))
        except DigestMismatch as exc:
            return _error(422, str(exc))
        except NodeFull as exc:
            return _error(507, str(exc))
        except LengthMismatch as exc:
            return _error(413 if exc.received > exc.expected else 400, str(exc))
        except ClientDisconnect:
            return _error(400, "body shorter than its Content-Length")
        return Response(status_code=201 if created else 200)

    def _declared_length(self, request: Request, limit: int) -> tuple[int, Response | None]:
        """The Content-Length, or an error response (411 none, 400 bad, 413 too large)."""
        value = request.headers.get("content-length")
        if value is None:
            return 0, _error(411, "Content-Length required")
        if not _LENGTH_RE.match(value):
            return 0, _error(400, "malformed Content-Length")
        length = int(value)
        if length > limit:
            return 0, _error(
                413, f"body of {length} bytes exceeds the limit of {limit}", {"Connection": "close"}
            )
        return length, None

    async def get_chunk(self, request: Request) -> Response:
        """GET /v1/chunks/{id}: the whole chunk (200) or one byte range (206)."""
        chunk_id = request.path_params["chunk_id"]
        try:
            f = await self.disk.open_chunk(chunk_id)
        except ChunkMissing:
            return _error(404, "no such chunk")
        try:
            start, end, headers, status = self._plan_read(request.headers.get("range"), f.size)
        except ValueError as exc:
            f.close()
            return _error(400, str(exc))
        except RangeNotSatisfiable:
            f.close()
            return _error(416, "range not satisfiable", {"Content-Range": f"bytes */{f.size}"})
        if end - start <= _SMALL_READ:
            try:
                data = await f.read(start, end)
            finally:
                f.close()
            if status == 200 and not id_matches(bytes.fromhex(chunk_id), data):
                await self.disk.quarantine(chunk_id)
                return _error(404, "no such chunk (quarantined: its bytes did not match its id)")
            return Response(
                data, status_code=status, headers=headers, media_type="application/octet-stream"
            )
        return StreamingResponse(
            f.iter_range(start, end),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    @staticmethod
    def _plan_read(range_header: str | None, size: int) -> tuple[int, int, dict[str, str], int]:
        """Start, end (exclusive), headers and status for a GET."""
        headers = {"Accept-Ranges": "bytes"}
        if range_header is None:
            headers["Content-Length"] = str(size)
            return 0, size, headers, 200
        start, end = parse_range(range_header, size)
        headers["Content-Length"] = str(end - start)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return start, end, headers, 206

    async def head_chunk(self, request: Request) -> Response:
        """HEAD /v1/chunks/{id}: 200 with the length in Content-Length, or 404."""
        chunk_id = request.path_params["chunk_id"]
        size = await self.disk.size(chunk_id)
        if size is None:
            return Response(status_code=404)
        return Response(
            status_code=200, headers={"Content-Length": str(size), "Accept-Ranges": "bytes"}
        )

    async def delete_chunk(self, request: Request) -> Response:
        """DELETE /v1/chunks/{id}[?before_ns=N]: 204, 404 missing, 409 guard refused."""
        chunk_id = request.path_params["chunk_id"]
        raw = request.query_params.get("before_ns")
        before_ns = None
        if raw is not None:
            if not _LENGTH_RE.match(raw):
                return _error(400, "before_ns must be a non-negative integer")
            before_ns = int(raw)
        try:
            await self.disk.delete(chunk_id, before_ns)
        except ChunkMissing:
            return _error(404, "no such chunk")
        except DeleteRefused as exc:
            return _error(409, str(exc))
        return Response(status_code=204)

    async def list_chunks(self, request: Request) -> Response:
        """GET /v1/chunks?after=ID&limit=N: ids in ascending order, and the next ``after``."""
        after = request.query_params.get("after") or None
        if after is not None and not wire.is_valid_id(after):
            return _error(400, "after must be a chunk id")
        raw = request.query_params.get("limit", str(LIST_DEFAULT_LIMIT))
        if not _LENGTH_RE.match(raw) or int(raw) < 1:
            return _error(400, "limit must be a positive integer")
        limit = min(int(raw), LIST_MAX_LIMIT)
        ids = await self.disk.list_ids(after, limit)
        return JSONResponse({"chunks": ids, "next": ids[-1] if len(ids) == limit else None})

    async def put_batch(self, request: Request) -> Response:
        """POST /v1/chunks:batch: store several small chunks; all or (on 422) none."""
        length, problem = self._declared_length(request, self.max_batch_bytes)
        if problem is not None:
            return problem
        try:
            body = await _read_exactly(request.stream(), length)
        except LengthMismatch as exc:
            return _error(413 if exc.received > exc.expected else 400, str(exc))
        except ClientDisconnect:
            return _error(400, "body shorter than its Content-Length")
        try:
            entries = wire.decode_batch(body)
        except wire.MalformedBatch as exc:
            return _error(400, str(exc))
        try:
            created = await self.disk.put_many(entries)
        except DigestMismatch as exc:
            return _error(422, str(exc))
        except NodeFull as exc:
            return _error(507, str(exc))
        except InvalidArgument as exc:
            return _error(400, str(exc))
        return JSONResponse({"created": created})

    async def get_batch(self, request: Request) -> Response:
        """GET /v1/chunks:batch?ids=...: several whole chunks in one answer."""
        ids = [i for i in request.query_params.get("ids", "").split(",") if i]
        if not ids or len(ids) > wire.BATCH_GET_MAX:
            return _error(400, f"ids must name 1 to {wire.BATCH_GET_MAX} chunks")
        try:
            chunks = await self.disk.read_many(ids, self.max_batch_bytes)
        except ChunkMissing as exc:
            return _error(404, str(exc))
        except InvalidArgument as exc:
            return _error(400, str(exc))
        # A quarantined chunk is left out: the reader tries another replica.
        body = wire.encode_batch(
            wire.BatchEntry(c, data)
            for c, data in zip(ids, chunks, strict=False)
            if data is not None
        )
        return Response(body, media_type="application/octet-stream")


async def _read_exactly(stream: AsyncIterator[bytes], length: int) -> bytes:
    buf = bytearray()
    async for data in stream:
        buf += data
        if len(buf) > length:
            raise LengthMismatch(length, len(buf))
    if len(buf) != length:
        raise LengthMismatch(length, len(buf))
    return bytes(buf)


def create_app(
    disk: ChunkDisk,
    token: str,
    *,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> ASGIApp:
    """The node's ASGI app over ``disk``; requests but health need ``token``.

    ``max_chunk_size`` bounds a PUT body and ``max_batch_bytes`` a batch
    body (bytes); larger ones get 413 before any byte is read.
    """
    handlers = NodeApp(disk, max_chunk_size=max_chunk_size, max_batch_bytes=max_batch_bytes)
    metrics = _Metrics(disk)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [*handlers.routes(), Route("/metrics", metrics_endpoint, methods=["GET"])]
    return _Gate(Starlette(routes=routes), token, metrics)
