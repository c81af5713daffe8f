"""A storage node process: Hypercorn (trio worker) serving the node app
over HTTP or HTTPS, registration in PostgreSQL under the URL it advertises
and its zone, heartbeats, and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.trio import serve

from .. import errors, pg
from ..errors import ChunkfsError
from ..meta import Meta
from .app import DEFAULT_MAX_CHUNK_SIZE, create_app
from .disk import ChunkDisk
from .reclaim import reclaim_forever

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


class NodeConfig(Config):
    """Hypercorn's settings, and the node's bound on connections at once."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    open_connections = 0


class _BoundedConnection(hypercorn.trio.tcp_server.TCPServer):
    """Hypercorn's connection with the node's bounds: at most
    ``max_connections`` at once, a request head whole within
    ``HEAD_TIMEOUT_S`` of its first byte, a body at ``BODY_MIN_RATE`` on
    average after ``BODY_GRACE_S``. Idle connections go after ``KEEP_ALIVE_S``
    (Hypercorn's keep-alive timeout).
    """

    config: NodeConfig

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
            except trio.TooSlowError:
                await self.idle_task.stop()  # else the keep-alive timer holds the connection
                break
            except (trio.ClosedResourceError, trio.BrokenResourceError):
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


def advertised_url(host: str, port: int, advertise: str | None, tls: bool) -> str:
    """The URL other hosts reach the node at: ``advertise`` when given
    (``http://`` or ``https://``, a host, a port; no path), else the listen
    address as bound (``port``; ``https`` with ``tls``).

    Raises ``ConfigError`` for a listen address on every interface (0.0.0.0,
    ::) without ``advertise``, an advertised URL that is malformed, or one
    whose scheme does not match ``tls``.
    """
    scheme = "https" if tls else "http"
    shown = f"[{host}]" if ":" in host else host
    if advertise is None:
        if host in ("", "0.0.0.0", "::"):
            raise errors.ConfigError(
                f"--listen {shown}:{port} is every interface: say which URL other hosts "
                f"reach this node at with --advertise {scheme}://HOST:PORT"
            )
        return f"{scheme}://{shown}:{port}"
    url = urlsplit(advertise)
    try:
        url.port  # noqa: B018 - raises for a port that is not a number in range
        port_ok = not url.netloc.endswith(":")
    except ValueError:
        port_ok = False
    if (
        not port_ok
        or url.scheme not in ("http", "https")
        or not url.hostname
        or url.path not in ("", "/")
        or url.query
        or url.fragment
        or url.username is not None
    ):
        raise errors.ConfigError(f"--advertise needs http(s)://HOST:PORT, not {advertise!r}")
    if url.scheme != scheme:
        raise errors.ConfigError(
            f"--advertise {advertise}: a node "
            + ("with" if tls else "without")
            + f" --tls-cert serves {scheme}://"
        )
    return f"{url.scheme}://{url.netloc}"


def _hypercorn_config(
    sock: socket.socket, tls_cert: str | None, tls_key: str | None, max_connections: int
) -> NodeConfig:
    config = NodeConfig()
    config.max_connections = max_connections
    # Hypercorn takes ownership of the descriptor (and closes it).
    config.bind = [f"fd://{sock.detach()}"]
    if tls_cert:
        config.certfile, config.keyfile = tls_cert, tls_key
        config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger("chunkfs.node.http")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    return config


def _check_tls_files(tls_cert: str | None, tls_key: str | None) -> None:
    """Raise ``ConfigError`` unless both or neither are given and they load."""
    if not tls_cert and not tls_key:
        return
    if not (tls_cert and tls_key):
        raise errors.ConfigError("--tls-cert and --tls-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot use {tls_cert} / {tls_key}: {exc}") from None


async def _heartbeats(meta: Meta, disk: ChunkDisk, interval: float) -> None:
    """Every ``interval`` seconds, report space and chunk count; failures are logged."""
    while True:
        await trio.sleep(interval)
        try:
            stats = await disk.stats()
            await meta.registry.heartbeat(
                disk.node_id,
                capacity_bytes=stats.capacity_bytes,
                used_bytes=stats.used_bytes,
                free_bytes=stats.free_bytes,
                chunk_count=stats.chunk_count,
            )
        except Exception as exc:  # noqa: BLE001 - keep serving: PostgreSQL may come back
            log.warning("heartbeat of node %s failed: %s", disk.node_id, exc)


async def _wait_for_signal(stop: trio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            stop.set()
            return


async def _mark_stopped(meta: Meta, node_id: str) -> None:
    with trio.move_on_after(10) as scope:
        scope.shield = True
        try:
            await meta.registry.node_stopped(node_id)
            log.info("node %s marked stopped", node_id)
        except ChunkfsError as exc:
            log.warning("could not mark node %s stopped: %s", node_id, exc)


@dataclass(frozen=True)
class NodeOptions:
    """How a node serves: ``host:port`` to listen on (port 0: any free one),
    the URL to ``advertise`` (None: the listen address), its ``zone``
    (failure domain; None: this host's name), the TLS certificate and key
    files (PEM; None: plain HTTP), its capacity in bytes (None: the disk's),
    the largest chunk it takes (bytes), seconds between heartbeats and
    between passes that reclaim unneeded chunks (0: never), and how many
    connections it serves at once.
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    zone: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    capacity_bytes: int | None = None
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    heartbeat_interval: float = 3.0
    reclaim_interval: float = 10.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS


async def serve_node(
    dsn: str,
    data_dir: str,
    options: NodeOptions,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a storage node until SIGTERM/SIGINT (or cancellation).

    Opens and locks the data directory, connects to PostgreSQL at ``dsn``,
    checks that the directory belongs to this cluster (or claims it),
    listens, registers the node (its advertised URL, zone and vnodes), then
    serves and sends a heartbeat every ``heartbeat_interval`` seconds, and
    gives back the space of chunks nothing needs every ``reclaim_interval``
    seconds (``chunkfs.node.reclaim``). On stop it drains requests, marks
    the node 'stopped' and unlocks the directory. ``task_status.started``
    receives the node's advertised URL once it serves.

    Raises ``ChunkfsError`` with a one-line message when the data directory
    is unusable, in use or another cluster's, the port is busy, the address
    or TLS files are wrong, another live node holds the URL, PostgreSQL does
    not answer (``MetadataUnavailable``) or is not a chunkfs database
    (``ConfigError``).
    """
    o = options
    _check_tls_files(o.tls_cert, o.tls_key)
    advertised_url(o.host, o.port, o.advertise, bool(o.tls_cert))  # fails before binding
    zone = o.zone if o.zone is not None else socket.gethostname()
    if not zone or len(zone) > 255 or not zone.isprintable():
        raise errors.ConfigError(f"--zone needs a printable name, not {zone!r}")
    disk = await ChunkDisk.open(data_dir, capacity_bytes=o.capacity_bytes)
    sock: socket.socket | None = None
    try:
        sock = listen_socket(o.host, o.port)
        base_url = advertised_url(o.host, sock.getsockname()[1], o.advertise, bool(o.tls_cert))
        # Nurseries (ours, trio-asyncio's) wrap errors in groups: surface
        # the ChunkfsError so the caller can print its one-line message.
        with errors.unwrapped():
            async with pg.open_database(dsn, min_size=1, max_size=2, client="chunkfs node") as db:
                meta = Meta(db)
                settings = await meta.registry.settings()
                await disk.claim(settings.cluster_id)
                app = create_app(disk, settings.cluster_token, max_chunk_size=o.max_chunk_size)
                config = _hypercorn_config(sock, o.tls_cert, o.tls_key, o.max_connections)
                await _run(meta, disk, app, config, base_url, zone, o, task_status)
    finally:
        if sock is not None and sock.fileno() != -1:
            sock.close()
        disk.close()


async def _run(
    meta: Meta,
    disk: ChunkDisk,
    app: Any,
    config: Config,
    base_url: str,
    zone: str,
    options: NodeOptions,
    task_status: Any,
) -> None:
    stop = trio.Event()
    registered = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_for_signal, stop)
            # The socket already listens: a client that finds the node in the
            # registry before the server runs waits in the accept queue. And
            # a node that answers health is always registered.
            stats = await disk.stats()
            await meta.registry.register_node(
                disk.node_id,
                base_url,
                zone=zone,
                capacity_bytes=stats.capacity_bytes,
                used_bytes=stats.used_bytes,
                free_bytes=stats.free_bytes,
                chunk_count=stats.chunk_count,
            )
            registered = True

            async def http_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # server done: stop the other tasks

            await nursery.start(http_server)
            log.info("node %s (zone %s) serving %s at %s", disk.node_id, zone, disk.root, base_url)
            nursery.start_soon(_heartbeats, meta, disk, options.heartbeat_interval)
            if options.reclaim_interval > 0:
                nursery.start_soon(reclaim_forever, meta, disk, options.reclaim_interval)
            task_status.started(base_url)
    finally:
        if registered:
            await _mark_stopped(meta, disk.node_id)


def run_node(dsn: str, data_dir: str, options: NodeOptions) -> None:
    """Run a storage node in this process until SIGTERM/SIGINT (blocking).

    Raises ``ChunkfsError`` for the reasons ``serve_node`` gives.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    try:
        trio.run(lambda: serve_node(dsn, data_dir, options))
    except KeyboardInterrupt:  # a SIGINT before the signal handler was installed
        log.info("interrupted")
