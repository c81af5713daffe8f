"""An HTTP client for one storage node: httpx (which runs on trio), and
``Http11`` for the requests on the hot path (see "the hot path" below).

Chunk ids are 32-byte SHA-256 digests here and lowercase hex on the wire.
HTTP failures become chunkfs errors: 404 ``ChunkMissing``, 422
``DigestMismatch``, 507 ``NodeFull``, anything else (other statuses,
connection errors, timeouts) ``StorageError``; each message names the node.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from . import wire
from .errors import (
    ChunkMissing,
    ConfigError,
    DigestMismatch,
    NodeFull,
    NodeUnreachable,
    StorageError,
)

# httpcore reads a connection 64 KiB at a time and has no setting for it; a
# 1 MiB chunk window then costs sixteen socket reads, each a trip through the
# event loop. Reads of up to 1 MiB cut that (as the node does for Hypercorn).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

log = logging.getLogger(__name__)

# One pool per node. Idle connections are dropped before the server's own
# keep-alive timeout (75 s), so a request never lands on a closing socket.
DEFAULT_LIMITS = httpx.Limits(
    max_connections=32, max_keepalive_connections=16, keepalive_expiry=30.0
)
# A node that does not take a connection within this many seconds (or the
# request timeout, when shorter) is unreachable: a host that is cut off
# costs this, not the whole request timeout.
CONNECT_TIMEOUT_S = 3.0
# Where mounts and tools find the CA that signed https:// nodes' certificates
# when none is given (`-o node_ca=`); without either, the system's store.
NODE_CA_ENV = "CHUNKFS_NODE_CA"
_STATUS_ERRORS: dict[int, type[StorageError]] = {
    404: ChunkMissing,
    422: DigestMismatch,
    507: NodeFull,
}


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Client TLS settings for ``https://`` nodes: a node's certificate must
    be signed by the CA in ``ca_file`` (PEM; default ``$CHUNKFS_NODE_CA``,
    else the system's store) and name the host of the node's URL.

    Raises ``ConfigError`` when the CA file cannot be read.
    """
    ca_file = ca_file or os.environ.get(NODE_CA_ENV) or None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use node CA file {ca_file}: {exc}") from None


def http_client(
    timeout: float, tls: ssl.SSLContext | None = None, limits: httpx.Limits = DEFAULT_LIMITS
) -> httpx.AsyncClient:
    """An HTTP/1.1 client with keep-alive for nodes: ``timeout`` seconds
    bound each read or write, ``CONNECT_TIMEOUT_S`` (at most) a connect;
    ``https://`` nodes are checked with ``tls`` (default: ``tls_context()``).
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
        limits=limits,
        verify=tls or tls_context(),
        http1=True,
        http2=False,
    )


@dataclass(frozen=True)
class ChunkPage:
    """One page of a node's chunk ids, ascending, and the ``after`` of the
    next page (None when this was the last one).
    """

    ids: list[bytes]
    after: bytes | None


class NodeClient:
    """Talks to the node at ``base_url`` with the cluster ``token``.

    ``timeout`` (seconds) bounds connecting and each read or write on the
    socket, not a whole transfer. Pass ``client`` to share an
    ``httpx.AsyncClient``; otherwise one is made (HTTP/1.1, keep-alive) and
    closed by ``aclose``. Chunk reads and batches go through ``Http11`` (for
    an ``http://`` node), everything else through httpx.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._owns_client = client is None
        self._http = Http11(self.base_url, timeout) if self.base_url.startswith("http://") else None
        self._client = client or http_client(timeout)

    def __repr__(self) -> str:
        return f"NodeClient({self.base_url!r})"

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections of chunk reads, and the pool if this client made it."""
        if self._http is not None:
            await self._http.aclose()
        if self._owns_client:
            await self._client.aclose()

    # ------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _fail(self, what: str, response: httpx.Response) -> NoReturn:
        try:
            body = response.content
        except httpx.ResponseNotRead:  # a streamed answer
            body = b""
        self._fail_status(what, response.status_code, _error_text(body))

    def _fail_status(self, what: str, status: int, detail: str) -> NoReturn:
        cls = _STATUS_ERRORS.get(status, StorageError)
        raise cls(f"node {self.base_url}: {what}: HTTP {status}{detail}")

    def _transport_error(self, what: str, exc: httpx.HTTPError) -> StorageError:
        """The chunkfs error for an httpx failure: ``NodeUnreachable`` when
        the connection failed or timed out.
        """
        cls = NodeUnreachable if isinstance(exc, httpx.TransportError) else StorageError
        why = f"{type(exc).__name__}: {exc}"
        # httpx's message may be empty: name the OS or TLS error beneath it
        # (e.g. the certificate check that broke the stream).
        cause = exc.__cause__ or exc.__context__
        for _ in range(8):
            if cause is None or (isinstance(cause, OSError) and str(cause)):
                break
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            why += f" ({type(cause).__name__}: {cause})"
        return cls(f"node {self.base_url}: {what}: {why}")

    def _json(self, what: str, body: bytes | bytearray) -> Any:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise StorageError(f"node {self.base_url}: {what}: malformed JSON answer") from exc

    async def _request(self, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._auth, **kwargs.pop("headers", {})}
        try:
            return await self._client.request(method, self._url(path), headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(what, exc) from exc

    async def _send(
        self, what: str, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes | bytearray]:
        """An idempotent request with a body held in memory: (status, body)."""
        if self._http is None:
            response = await self._request(
                what, method, path, content=body or None, headers=headers
            )
            return response.status_code, response.content
        answer = await self._http.request(method, path, {**self._auth, **headers}, body)
        return answer.status, answer.body

    # ---------------------------------------------------------------- API

    async def put(
        self, chunk_id: bytes, content: bytes | AsyncIterable[bytes], length: int
    ) -> bool:
        """Store a chunk of ``length`` bytes; True if created, False if it was there.

        ``content`` is the bytes or an async iterable of pieces (streamed).
        Raises ``DigestMismatch`` (the bytes are not ``chunk_id``'s),
        ``NodeFull``, ``StorageError``.
        """
        cid = wire.id_to_hex(chunk_id)
        what = f"PUT chunk {cid}"
        headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        response = await self._request(
            what, "PUT", f"/v1/chunks/{cid}", content=content, headers=headers
        )
        if response.status_code in (200, 201):
            return response.status_code == 201
        self._fail(what, response)

    async def derive(
        self,
        chunk_id: bytes,
        length: int,
        base_id: bytes | None,
        sources: Sequence[wire.Source],
        content: bytes | AsyncIterable[bytes],
        content_length: int,
    ) -> bool:
        """Store a chunk of ``length`` bytes built by the node from its block
        ``sources`` (``chunkfs.wire``: blocks of ``base_id``, zeros, or the
        next block of ``content``, which holds ``content_length`` bytes);
        True if created, False if it was there. Raises ``ChunkMissing`` (the
        node lacks the base), ``DigestMismatch``, ``NodeFull``, ``StorageError``.
        """
        cid = wire.id_to_hex(chunk_id)
        what = f"derive chunk {cid}"
        params = {"length": str(length), "from": wire.encode_sources(sources)}
        if base_id is not None:
            params["base"] = wire.id_to_hex(base_id)
        headers = {
            "Content-Length": str(content_length),
            "Content-Type": "application/octet-stream",
        }
        response = await self._request(
            what, "PUT", f"/v1/chunks/{cid}", params=params, content=content, headers=headers
        )
        if response.status_code in (200, 201):
            return response.status_code == 201
        self._fail(what, response)

    async def put_batch(self, chunks: Mapping[bytes, bytes]) -> dict[bytes, bool]:
        """Store several small chunks (``{chunk_id: bytes}``) in one request.

        All are durable when this returns; returns, per chunk, True if it was
        created (False: it was there). Raises ``DigestMismatch`` if any is
        wrong (then none was stored), ``NodeFull``, ``StorageError``.
        """
        if not chunks:
            return {}
        body = wire.encode_batch(wire.BatchEntry(wire.id_to_hex(c), d) for c, d in chunks.items())
        what = f"batch PUT of {len(chunks)} chunks"
        status, answer = await self._send(
            what, "POST", "/v1/chunks:batch", {"Content-Type": "application/octet-stream"}, body
        )
        if status != 200:
            self._fail_status(what, status, _error_text(answer))
        try:
            created = self._json(what, answer)["created"]
        except (KeyError, TypeError) as exc:
            raise StorageError(f"node {self.base_url}: {what}: malformed JSON answer") from exc
        return {c: bool(new) for c, new in zip(chunks, created, strict=True)}

    async def get(
        self, chunk_id: bytes, start: int = 0, end: int | None = None
    ) -> bytes | bytearray:
        """Bytes ``[start, end)`` of a chunk (``end`` None: to its end; exclusive).

        An ``end`` past the chunk's end is clipped by the node. Raises
        ``ChunkMissing``, ``StorageError`` (also for a range starting past
        the end).
        """
        cid = wire.id_to_hex(chunk_id)
        if end is not None and end <= start:
            return b""
        what = f"GET chunk {cid} [{start}, {'' if end is None else end})"
        headers = _range_header(start, end)
        status, body = await self._send(what, "GET", f"/v1/chunks/{cid}", headers)
        if status == 206 or (status == 200 and not headers):
            return body
        if status == 200:  # the node ignored the range
            return body[start:end]
        self._fail_status(what, status, _error_text(body))

    @asynccontextmanager
    async def stream(
        self, chunk_id: bytes, start: int = 0, end: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Like ``get``, but yields an async iterator over the bytes as they arrive.

        Use as ``async with client.stream(cid) as pieces: async for b in pieces``.
        Errors are raised on entry (status) or while iterating (connection).
        """
        cid = wire.id_to_hex(chunk_id)
        what = f"GET chunk {cid}"
        headers = {**self._auth, **_range_header(start, end)}
        try:
            async with self._client.stream(
                "GET", self._url(f"/v1/chunks/{cid}"), headers=headers
            ) as response:
                if response.status_code not in (200, 206) or (
                    response.status_code == 200 and (start or end is not None)
                ):
                    await response.aread()
                    self._fail(what, response)
                yield self._pieces(what, response)
        except httpx.HTTPError as exc:
            raise self._transport_error(what, exc) from exc

    async def _pieces(self, what: str, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for data in response.aiter_bytes():
                yield data
        except httpx.HTTPError as exc:
            raise self._transport_error(what, exc) from exc

    async def get_batch(self, chunk_ids: list[bytes]) -> dict[bytes, bytes]:
        """Several whole chunks in one request: ``{chunk_id: bytes}``.

        A chunk the node found rotten (and quarantined) is left out. Raises
        ``ChunkMissing`` if the node lacks any of them, ``StorageError``
        otherwise (also for an answer that breaks the batch framing). The
        caller checks the digests.
        """
        what = f"batch GET of {len(chunk_ids)} chunks"
        ids = ",".join(map(wire.id_to_hex, chunk_ids))
        status, body = await self._send(what, "GET", f"/v1/chunks:batch?ids={ids}", {})
        if status != 200:
            self._fail_status(what, status, _error_text(body))
        try:
            entries = wire.decode_batch(body)
        except wire.MalformedBatch as exc:
            raise StorageError(f"node {self.base_url}: {what}: malformed answer: {exc}") from exc
        return {wire.id_from_hex(e.chunk_id): e.data for e in entries}

    async def delete(self, chunk_id: bytes, before_ns: int | None = None) -> bool:
        """Delete a chunk; with ``before_ns`` (node clock, ns) only if unused since.

        Returns True when the node no longer holds the chunk (deleted now, or
        already absent), False when the guard refused because a writer used
        the chunk at or after ``before_ns`` (it is kept). Raises ``StorageError``.
        """
        cid = wire.id_to_hex(chunk_id)
        what = f"DELETE chunk {cid}"
        params = {} if before_ns is None else {"before_ns": str(before_ns)}
        response = await self._request(what, "DELETE", f"/v1/chunks/{cid}", params=params)
        if response.status_code in (204, 404):
            return True
        if response.status_code == 409:
            return False
        self._fail(what, response)

    async def list(self, after: bytes | None = None, limit: int = 1000) -> ChunkPage:
        """Up to ``limit`` chunk ids greater than ``after``, ascending."""
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = wire.id_to_hex(after)
        what = "list chunks"
        response = await self._request(what, "GET", "/v1/chunks", params=params)
        if response.status_code != 200:
            self._fail(what, response)
        payload = self._json(what, response.content)
        nxt = payload.get("next")
        ids = [wire.id_from_hex(c) for c in payload["chunks"]]
        return ChunkPage(ids, wire.id_from_hex(nxt) if nxt else None)

    async def clock_ns(self) -> int:
        """The node's clock (ns since the epoch), from its health. Raises ``StorageError``."""
        return int((await self.health())["now_ns"])

    async def health(self) -> dict[str, Any]:
        """The node's health: status, node_id, capacity/used/free bytes, chunk_count, now_ns."""
        what = "health"
        response = await self._request(what, "GET", "/v1/health")
        if response.status_code != 200:
            self._fail(what, response)
        return dict(self._json(what, response.content))


def _range_header(start: int, end: int | None) -> dict[str, str]:
    if start == 0 and end is None:
        return {}
    return {"Range": f"bytes={start}-{'' if end is None else end - 1}"}


def _error_text(body: bytes | bytearray) -> str:
    """`` (message)`` from a node's JSON error body, or nothing."""
    try:
        message = json.loads(body).get("error")
    except Exception:  # noqa: BLE001 - not JSON (or not an object)
        message = None
    return f" ({message})" if message else ""


# ------------------------------------------------------ the hot path

# Requests with bodies held in memory (chunk reads, batches of small
# chunks), sent and answered on a plain socket.
#
# httpx's HTTP/1.1 layer copies every body byte four times in user space on
# its way to the caller (h11 appends it to a buffer and slices it out twice,
# httpcore copies it to bytes, the response joins the pieces), and costs
# about 1 ms of CPU per request (measured: a 4 KiB batch PUT, 0.6-1.3 ms
# of client CPU with httpx against 0.2 ms here). For cold reads of large files
# those copies were a third of the mount's CPU; for small files the
# per-request cost was a fifth of it. A node answers these requests with a
# ``Content-Length``, so this client sends the request in one piece and
# receives the body with ``recv_into`` into a buffer of that length: one
# copy, the kernel's. Streamed uploads and the maintenance calls go through
# httpx.

# Longest status line plus headers a node answers with (bytes).
HEAD_MAX = 16 << 10
# Idle connections kept per node, and how long one may idle (seconds; under
# the node's keep-alive timeout, so that a request never meets a closing
# socket).
IDLE_MAX = 8
IDLE_S = 30.0
# Bodies up to this size (bytes) are sent in one piece with the head.
_JOIN_MAX = 64 << 10


@dataclass(frozen=True)
class Answer:
    """A node's answer: HTTP status, lower-case header names, the body."""

    status: int
    headers: dict[str, str]
    body: bytearray


class _Closed(Exception):
    """The connection ended before a whole answer came."""


class Http11:
    """HTTP/1.1 requests to the node at ``base_url`` (``http://host:port``)
    whose bodies, both ways, are held in memory.

    ``timeout`` (seconds) bounds connecting and each send or receive, as
    httpx's timeout does. Raises ``StorageError`` for connection failures,
    timeouts and malformed answers. Only idempotent requests may be sent:
    one that meets a kept connection closed by the node is sent again once
    on a new connection.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"not an http:// URL: {base_url}")
        self.base_url = base_url
        self._host = url.hostname
        self._port = url.port or 80
        self._timeout = timeout
        self._idle: list[tuple[float, trio.SocketStream]] = []  # (since, connection)

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Answer:
        """Send ``method path`` with ``headers`` and ``body``; the answer."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        parts = [head + body] if len(body) <= _JOIN_MAX else [head, body]
        while True:
            conn, reused = self._take()
            try:
                if conn is None:
                    with trio.fail_after(min(self._timeout, CONNECT_TIMEOUT_S)):
                        conn = await trio.open_tcp_stream(self._host, self._port)
                answer, keep = await self._exchange(conn, parts)
            except (_Closed, trio.BrokenResourceError, ConnectionError) as exc:
                await _close(conn)
                if reused:  # the node closed it while it was idle
                    continue
                if isinstance(exc, _Closed):
                    raise NodeUnreachable(
                        f"node {self.base_url}: connection closed mid-answer"
                    ) from None
                raise NodeUnreachable(f"node {self.base_url}: {method} {path}: {exc}") from exc
            except (OSError, trio.TooSlowError) as exc:
                await _close(conn)
                what = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                raise NodeUnreachable(f"node {self.base_url}: {method} {path}: {what}") from exc
            except BaseException:
                await _close(conn)
                raise
            if keep:
                self._give_back(conn)
            else:
                await _close(conn)
            return answer

    async def aclose(self) -> None:
        """Close the kept connections."""
        idle, self._idle = self._idle, []
        for _, conn in idle:
            await _close(conn)

    def _take(self) -> tuple[trio.SocketStream | None, bool]:
        now = time.monotonic()
        while self._idle:
            since, conn = self._idle.pop()
            if now - since < IDLE_S:
                return conn, True
            conn.socket.close()
        return None, False

    def _give_back(self, conn: trio.SocketStream) -> None:
        if len(self._idle) < IDLE_MAX:
            self._idle.append((time.monotonic(), conn))
        else:
            conn.socket.close()

    async def _exchange(self, conn: trio.SocketStream, parts: list[bytes]) -> tuple[Answer, bool]:
        """Send the request's ``parts`` and read the answer: (answer, whether
        the connection can carry another request).
        """
        for part in parts:
            with trio.fail_after(self._timeout):
                await conn.send_all(part)
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0 and len(head) <= HEAD_MAX:
            with trio.fail_after(self._timeout):
                got = await conn.receive_some(65536)
            if not got:
                raise _Closed
            head += got
        if not 0 <= end <= HEAD_MAX:
            raise StorageError(f"node {self.base_url}: answer head over {HEAD_MAX} bytes")
        status, headers, keep = self._parse_head(bytes(head[:end]))
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            raise StorageError(f"node {self.base_url}: answer without a Content-Length") from None
        body = bytearray(length)
        view = memoryview(body)
        early = head[end + 4 : end + 4 + length]
        view[: len(early)] = early
        done = len(early)
        while done < length:
            with trio.fail_after(self._timeout):
                n = await conn.socket.recv_into(view[done:], length - done)
            if not n:
                raise _Closed
            done += n
        return Answer(status, headers, body), keep and len(head) - end - 4 <= length

    def _parse_head(self, head: bytes) -> tuple[int, dict[str, str], bool]:
        """Status, headers (lower-case names) and whether the connection
        stays open, from an answer's head.
        """
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise StorageError(f"node {self.base_url}: malformed status line {status_line!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise StorageError(f"node {self.base_url}: malformed header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        keep = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return int(parts[1]), headers, keep


async def _close(conn: trio.SocketStream | None) -> None:
    if conn is not None:
        with trio.CancelScope(shield=True):
            await conn.aclose()
