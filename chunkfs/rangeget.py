"""GETs of chunk bytes from a node straight into one buffer.

httpx's HTTP/1.1 layer copies every body byte four times in user space on
its way to the caller (h11 appends it to a buffer and slices it out twice,
httpcore copies it to bytes, the response joins the pieces); for cold reads
of large files those copies were a third of the mount's CPU. A read of
chunk bytes is always one GET with a ``Content-Length`` answer, so this
client sends the request and receives the body with ``recv_into`` into a
buffer of that length: one copy, the kernel's. Everything else a node is
asked goes through httpx.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from .errors import StorageError

# Longest status line plus headers a node answers with (bytes).
HEAD_MAX = 16 << 10
# Idle connections kept per node, and how long one may idle (seconds; under
# the node's keep-alive timeout, so that a request never meets a closing
# socket).
IDLE_MAX = 8
IDLE_S = 30.0


@dataclass(frozen=True)
class RangeAnswer:
    """A node's answer: HTTP status, lower-case header names, the body."""

    status: int
    headers: dict[str, str]
    body: bytearray


class _Closed(Exception):
    """The connection ended before a whole answer came."""


class RangeGetter:
    """GETs from the node at ``base_url`` (``http://host:port``).

    ``timeout`` (seconds) bounds connecting and each send or receive, as
    httpx's timeout does. Raises ``StorageError`` for connection failures,
    timeouts and malformed answers.
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

    async def get(self, path: str, headers: dict[str, str]) -> RangeAnswer:
        """GET ``path`` with ``headers``. A kept connection that turns out
        closed is replaced once by a new one (a GET can be sent again).
        """
        host = f"{self._host}:{self._port}"
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            conn, reused = self._take()
            try:
                if conn is None:
                    with trio.fail_after(self._timeout):
                        conn = await trio.open_tcp_stream(self._host, self._port)
                answer, keep = await self._exchange(conn, request)
            except _Closed:
                await _close(conn)
                if reused:
                    continue
                raise StorageError(f"node {self.base_url}: connection closed mid-answer") from None
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                await _close(conn)
                what = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                raise StorageError(f"node {self.base_url}: GET {path}: {what}") from exc
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

    async def _exchange(self, conn: trio.SocketStream, request: bytes) -> tuple[RangeAnswer, bool]:
        """Send ``request`` and read the answer: (answer, whether the
        connection can carry another request).
        """
        with trio.fail_after(self._timeout):
            await conn.send_all(request)
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
        return RangeAnswer(status, headers, body), keep and len(head) - end - 4 <= length

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
