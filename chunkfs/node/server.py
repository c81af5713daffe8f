"""A storage node process: Hypercorn (trio worker) serving the node app,
registration in PostgreSQL, heartbeats, and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any

import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
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
# pool's expiry, so the client always closes first and never reuses a
# connection the server is closing.
KEEP_ALIVE_S = 75.0
# Hypercorn reads a connection 64 KiB at a time and has no setting for it; a
# chunk body then costs a parser pass per 64 KiB. 1 MiB reads cut that cost
# (node CPU for a 256 MiB upload: 1.0-1.6 s -> 0.6-0.8 s).
hypercorn.trio.tcp_server.MAX_RECV = 1 << 20


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


def _base_url(host: str, sock: socket.socket) -> str:
    """The URL clients use: the host as given, the port as bound (port 0 picks one)."""
    port = sock.getsockname()[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _hypercorn_config(sock: socket.socket) -> Config:
    config = Config()
    # Hypercorn takes ownership of the descriptor (and closes it).
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("chunkfs.node.http")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    return config


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


async def serve_node(
    dsn: str,
    data_dir: str,
    host: str,
    port: int,
    *,
    heartbeat_interval: float = 3.0,
    capacity_bytes: int | None = None,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    reclaim_interval: float = 10.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a storage node until SIGTERM/SIGINT (or cancellation).

    Opens the data directory, connects to PostgreSQL at ``dsn``, listens on
    ``host:port``, registers the node (URL ``http://host:port``) and its
    vnodes, then serves and sends a heartbeat every ``heartbeat_interval``
    seconds, and gives back the space of chunks nothing needs every
    ``reclaim_interval`` seconds (0: never; ``chunkfs.node.reclaim``). On
    stop it drains requests and marks the node 'stopped'.
    ``task_status.started`` receives the node's base URL once it serves.

    Raises ``ChunkfsError`` with a one-line message when the data directory
    is unusable, the port is busy, PostgreSQL does not answer
    (``MetadataUnavailable``) or is not a chunkfs database (``ConfigError``).
    """
    disk = await ChunkDisk.open(data_dir, capacity_bytes=capacity_bytes)
    sock = listen_socket(host, port)
    base_url = _base_url(host, sock)
    try:
        # Nurseries (ours, trio-asyncio's) wrap errors in groups: surface
        # the ChunkfsError so the caller can print its one-line message.
        with errors.unwrapped():
            async with pg.open_database(dsn, min_size=1, max_size=2, client="chunkfs node") as db:
                meta = Meta(db)
                settings = await meta.registry.settings()
                app = create_app(disk, settings.cluster_token, max_chunk_size=max_chunk_size)
                config = _hypercorn_config(sock)
                await _run(
                    meta,
                    disk,
                    app,
                    config,
                    base_url,
                    heartbeat_interval,
                    reclaim_interval,
                    task_status,
                )
    finally:
        if sock.fileno() != -1:
            sock.close()


async def _run(
    meta: Meta,
    disk: ChunkDisk,
    app: Any,
    config: Config,
    base_url: str,
    heartbeat_interval: float,
    reclaim_interval: float,
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
            log.info("node %s serving %s at %s", disk.node_id, disk.root, base_url)
            nursery.start_soon(_heartbeats, meta, disk, heartbeat_interval)
            if reclaim_interval > 0:
                nursery.start_soon(reclaim_forever, meta, disk, reclaim_interval)
            task_status.started(base_url)
    finally:
        if registered:
            await _mark_stopped(meta, disk.node_id)


def run_node(
    dsn: str,
    data_dir: str,
    host: str,
    port: int,
    *,
    heartbeat_interval: float = 3.0,
    capacity_bytes: int | None = None,
    reclaim_interval: float = 10.0,
) -> None:
    """Run a storage node in this process until SIGTERM/SIGINT (blocking).

    Raises ``ChunkfsError`` for the reasons ``serve_node`` gives.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    try:
        trio.run(
            lambda: serve_node(
                dsn,
                data_dir,
                host,
                port,
                heartbeat_interval=heartbeat_interval,
                capacity_bytes=capacity_bytes,
                reclaim_interval=reclaim_interval,
            )
        )
    except KeyboardInterrupt:  # a SIGINT before the signal handler was installed
        log.info("interrupted")
