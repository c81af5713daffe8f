"""Serving HTTP with Hypercorn (trio worker), shared by storage nodes and
the S3 gateway: a listening socket, TLS files checked up front, Hypercorn's
settings, bounds on connections (how many, how slow a request may arrive)
and a stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import ssl
import threading
from typing import Any

import h11
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.trio import serve

from . import errors
from .errors import ChunkfsError

log = logging.getLogger(__name__)

# Seconds a stop waits for requests in flight before cutting them off.
GRACEFUL_TIMEOUT_S = 5.0
# Seconds an idle keep-alive connection stays open; longer than the client
# pools' expiry (30 s), so the client always closes first and never reuses a
# connection the server is closing.
KEEP_ALIVE_S = 45.0
# Seconds a request's head may take to arrive, from its first byte.
HEAD_TIMEOUT_S = 10.0
# A request body must arrive at this average rate (bytes per second) after
# a grace of BODY_GRACE_S: a trickling client is cut off, a slow link is not.
BODY_MIN_RATE = 64 << 10
BODY_GRACE_S = 30.0
# Connections served at once; more are closed as they arrive.
DEFAULT_MAX_CONNECTIONS = 512
# Hypercorn reads a connection 64 KiB at a time and has no setting for it; a
# chunk body then costs a parser pass per 64 KiB. 1 MiB reads cut that cost
# (node CPU for a 256 MiB upload: 1.0-1.6 s -> 0.6-0.8 s).
hypercorn.trio.tcp_server.MAX_RECV = 1 << 20


class BoundedConfig(Config):
    """Hypercorn's settings, and the server's bound on connections at once."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    open_connections = 0


class _BoundedConnection(hypercorn.trio.tcp_server.TCPServer):
    """Hypercorn's connection with chunkfs's bounds: at most
    ``max_connections`` at once, a request head whole within
    ``HEAD_TIMEOUT_S`` of its first byte, a body at ``BODY_MIN_RATE`` on
    average after ``BODY_GRACE_S``. Idle connections go after ``KEEP_ALIVE_S``
    (Hypercorn's keep-alive timeout).
    """

    config: BoundedConfig

    async def run(self) -> None:
        if self.config.open_connections >= self.config.max_connections:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        self.config.open_connections += 1
        try:
            await super().run()
        finally:
            self.config.open_connections -= 1

    def _their_state(self) -> type[h11._state.Sentinel] | None:
        connection = getattr(getattr(self, "protocol", None), "protocol", None)
        return getattr(getattr(connection, "connection", None), "their_state", None)

    async def _read_data(self) -> None:
        head_since: float | None = None  # when the head being read began
        body_since, body_bytes = 0.0, 0
        while True:
            state, now = self._their_state(), trio.current_time()
            if state is h11.IDLE and head_since is not None:
                deadline = head_since + HEAD_TIMEOUT_S
            elif state is h11.SEND_BODY:
                deadline = body_since + BODY_GRACE_S + body_bytes / BODY_MIN_RATE
            else:  # between requests (keep-alive bounds it) or answering
                deadline = math.inf
            try:
                with trio.fail_at(deadline):
                    data = await self.stream.receive_some(hypercorn.trio.tcp_server.MAX_RECV)
            except (trio.TooSlowError, trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if state is h11.IDLE and head_since is None:
                head_since = now
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
            after = self._their_state()
            if after is not h11.IDLE:
                head_since = None
            if after is h11.SEND_BODY:
                if state is not h11.SEND_BODY:
                    body_since, body_bytes = trio.current_time(), 0
                body_bytes += len(data)
        # The client is gone or too slow: the keep-alive timer must not hold
        # the connection (and its place among max_connections) until it fires.
        await self.idle_task.stop()
        await self.protocol.handle(Closed())


# Hypercorn's trio worker builds its connections from this name.
hypercorn.trio.run.TCPServer = _BoundedConnection  # type: ignore[misc]


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises ``ChunkfsError`` with a one-line message when the address is busy
    or cannot be used.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Lets a restarted node take its port back while old connections
        # sit in TIME_WAIT; a port with a live listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ChunkfsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def hypercorn_config(
    sock: socket.socket,
    tls_cert: str | None,
    tls_key: str | None,
    max_connections: int,
    log_name: str,
) -> BoundedConfig:
    """Hypercorn's settings for a server on the listening ``sock``: HTTPS
    with the certificate and key files when given, at most
    ``max_connections`` at once, errors logged to the logger ``log_name``.
    """
    config = BoundedConfig()
    config.max_connections = max_connections
    # Hypercorn takes ownership of the descriptor (and closes it).
    config.bind = [f"fd://{sock.detach()}"]
    if tls_cert:
        config.certfile, config.keyfile = tls_cert, tls_key
        config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger(log_name)
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    return config


def check_tls_files(tls_cert: str | None, tls_key: str | None) -> None:
    """Raise ``ConfigError`` unless both or neither are given and they load."""
    if not tls_cert and not tls_key:
        return
    if not (tls_cert and tls_key):
        raise errors.ConfigError("--tls-cert and --tls-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot use {tls_cert} / {tls_key}: {exc}") from None


async def wait_for_signal(stop: trio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            stop.set()
            return


async def serve_until(
    app: Any,
    config: Config,
    stop: trio.Event,
    done: trio.CancelScope,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` with Hypercorn until ``stop`` is set (started
    once it listens: run it with ``nursery.start``), then cancel ``done``,
    the scope of the tasks that live only as long as the server.
    """
    await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
    done.cancel()
