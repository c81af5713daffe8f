"""A storage node process: Hypercorn (trio worker) serving the node app
over HTTP or HTTPS, registration in PostgreSQL under the URL it advertises
and its zone, heartbeats, and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config

from .. import errors, pg
from ..errors import ChunkfsError
from ..meta import Meta
from ..serving import (
    DEFAULT_MAX_CONNECTIONS,
    check_tls_files,
    hypercorn_config,
    listen_socket,
    serve_until,
    wait_for_signal,
)
from .app import DEFAULT_MAX_CHUNK_SIZE, create_app
from .disk import ChunkDisk
from .reclaim import reclaim_forever

log = logging.getLogger(__name__)


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


async def _heartbeats(meta: Meta, disk: ChunkDisk, interval: float) -> None:
    """Every ``interval`` seconds, report space and chunk count; failures are
    logged. A heartbeat gives up after ``2 * interval`` seconds: one stuck on
    a PostgreSQL that vanished (a primary whose host was cut off) would keep
    the node silent long after a standby took over.
    """
    while True:
        await trio.sleep(interval)
        try:
            stats = await disk.stats()
            with trio.move_on_after(2 * interval) as scope:
                await meta.registry.heartbeat(
                    disk.node_id,
                    capacity_bytes=stats.capacity_bytes,
                    used_bytes=stats.used_bytes,
                    free_bytes=stats.free_bytes,
                    chunk_count=stats.chunk_count,
                )
            if scope.cancelled_caught:
                log.warning("heartbeat of node %s: no answer in %g s", disk.node_id, 2 * interval)
        except Exception as exc:  # noqa: BLE001 - keep serving: PostgreSQL may come back
            log.warning("heartbeat of node %s failed: %s", disk.node_id, exc)


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
    check_tls_files(o.tls_cert, o.tls_key)
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
                config = hypercorn_config(
                    sock, o.tls_cert, o.tls_key, o.max_connections, "chunkfs.node.http"
                )
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
            nursery.start_soon(wait_for_signal, stop)
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

            await nursery.start(serve_until, app, config, stop, nursery.cancel_scope)
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
