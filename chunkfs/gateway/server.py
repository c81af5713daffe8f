"""The gateway process: the S3 app under Hypercorn (trio worker) over a
filesystem core of its own, until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

import trio

from .. import errors
from ..core import open_filesystem
from ..serving import (
    DEFAULT_MAX_CONNECTIONS,
    check_tls_files,
    hypercorn_config,
    listen_socket,
    serve_until,
    wait_for_signal,
)
from .app import GatewayApp

log = logging.getLogger(__name__)

# Staged uploads older than this (seconds) were left by a gateway that
# stopped mid-upload: removed when a gateway starts.
STALE_STAGED_S = 24 * 3600
# How long the attributes of a directory (its owner and mode, for the
# permission checks) are trusted, as a mount's attr_timeout: names are
# always looked up afresh, so what a mount makes is seen at once.
ATTR_TTL_S = 1.0


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway serves: ``host:port`` (port 0: any free one), TLS
    certificate and key files (PEM; None: plain HTTP), the region it
    answers for, the domain of virtual-hosted addressing (None: path-style
    only), how long a multipart upload lives past its last part (seconds),
    connections served at once, where uploads are spooled (None: the
    system's temporary directory) and the timeouts (seconds) of node and
    PostgreSQL requests.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    region: str = "us-east-1"
    domain: str | None = None
    upload_ttl_s: float = 24 * 3600
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    spool_dir: str | None = None
    node_timeout: float = 30.0
    pg_timeout: float = 30.0


async def serve_gateway(
    dsn: str, options: GatewayOptions, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve S3 over the filesystem at ``dsn`` until SIGTERM/SIGINT (or
    cancellation); ``task_status.started`` receives the URL it serves at.

    Every change is durable before its request is answered (the app
    waits for PostgreSQL's log to reach the disk once per request). Raises ``ChunkfsError`` with a one-line message
    when the port is busy, the TLS files are wrong, PostgreSQL does not
    answer (``MetadataUnavailable``) or holds no chunkfs filesystem
    (``ConfigError``).
    """
    o = options
    check_tls_files(o.tls_cert, o.tls_key)
    sock = listen_socket(o.host, o.port)
    spool = tempfile.mkdtemp(prefix="chunkfs-gateway-", dir=o.spool_dir)
    try:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        url = f"{'https' if o.tls_cert else 'http'}://{shown}:{port}"
        with errors.unwrapped():
            async with open_filesystem(
                dsn, spool, attr_ttl=ATTR_TTL_S, entry_ttl=0.0,
                node_timeout=o.node_timeout, pg_timeout=o.pg_timeout,
            ) as fs:  # fmt: skip
                app = GatewayApp(fs, region=o.region, domain=o.domain, upload_ttl_s=o.upload_ttl_s)
                removed = await app.buckets.clean_staging(STALE_STAGED_S)
                if removed:
                    log.info("removed %d uploads left behind by a stopped gateway", removed)
                config = hypercorn_config(
                    sock, o.tls_cert, o.tls_key, o.max_connections, "chunkfs.gateway.http"
                )
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_signal, stop)
                    nursery.start_soon(fs.run_purger)

                    await nursery.start(serve_until, app, config, stop, nursery.cancel_scope)
                    log.info("S3 gateway serving %s (region %s)", url, o.region)
                    task_status.started(url)
    finally:
        if sock.fileno() != -1:
            sock.close()
        shutil.rmtree(spool, ignore_errors=True)


def run_gateway(dsn: str, options: GatewayOptions) -> None:
    """Run the gateway in this process until SIGTERM/SIGINT (blocking).
    Raises ``ChunkfsError`` for the reasons ``serve_gateway`` gives.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per node request
    try:
        trio.run(lambda: serve_gateway(dsn, options))
    except KeyboardInterrupt:
        log.info("interrupted")
