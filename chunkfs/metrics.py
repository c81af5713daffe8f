"""What a mount measures, as Prometheus metrics (prometheus-client).

The instruments live in ``REGISTRY``, one per process; the modules that do
the work record into them, and a mount serves them with ``-o
metrics=HOST:PORT`` (``serve``), where ``chunkfs stats`` reads them. Times
are seconds, sizes bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import ConfigError
from .wire import parse_host_port

REGISTRY = CollectorRegistry()
_LATENCY = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)

FUSE_SECONDS = Histogram(
    "chunkfs_fuse_request_seconds",
    "FUSE requests by operation, and how long each took (seconds)",
    ["op"],
    registry=REGISTRY,
    buckets=_LATENCY,
)
FUSE_ERRORS = Counter(
    "chunkfs_fuse_errors",
    "FUSE requests answered with an error, by operation and errno name",
    ["op", "errno"],
    registry=REGISTRY,
)
PG_ROUND_TRIPS = Counter(
    "chunkfs_pg_round_trips",
    "Round trips to PostgreSQL (a statement, or a transaction's statements sent together)",
    registry=REGISTRY,
)
NODE_REQUESTS = Counter(
    "chunkfs_node_requests",
    "Requests to storage nodes by node id and outcome (ok, or the error's class)",
    ["node", "outcome"],
    registry=REGISTRY,
)
NODE_BYTES = Counter(
    "chunkfs_node_bytes",
    "Chunk bytes sent to the nodes (up) and received from them (down)",
    ["direction"],
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "chunkfs_commit_seconds",
    "Commits of written files (close, fsync): chunks to R nodes, then the metadata (seconds)",
    registry=REGISTRY,
    buckets=_LATENCY,
)
CACHE_LOOKUPS = Counter(
    "chunkfs_content_cache_lookups",
    "Lookups in the local content cache by result (hit, miss)",
    ["result"],
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "chunkfs_spool_bytes",
    "Bytes the spools of open files hold on local disk",
    registry=REGISTRY,
)


def parse_address(address: str) -> tuple[str, int]:
    """The metrics address ``HOST:PORT`` as (host, port). Raises ``ConfigError``."""
    try:
        return parse_host_port(address, "metrics address")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def address_file(mountpoint: str) -> Path:
    """Where the mount at ``mountpoint`` records its metrics address, for
    ``chunkfs stats``: a file named by the mount point in the user's runtime
    directory (``/run/chunkfs`` for root).
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/chunkfs-{os.getuid()}"
    if os.getuid() == 0:
        base = "/run"
    name = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return Path(base, "chunkfs", f"{name}.metrics")


def serve(address: str, mountpoint: str) -> Path:
    """Serve ``REGISTRY`` as Prometheus text at ``http://HOST:PORT/metrics``
    from a thread of its own, and record the address for the mount at
    ``mountpoint`` (``address_file``, returned: the caller removes it).
    Raises ``ConfigError`` when it cannot listen.
    """
    host, port = parse_address(address)
    try:
        start_http_server(port, host, registry=REGISTRY)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    path = address_file(mountpoint)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(address + "\n")
    return path


def mount_address(mountpoint: str) -> str:
    """The metrics address the mount at ``mountpoint`` recorded. Raises
    ``ConfigError`` when it serves none.
    """
    try:
        return address_file(mountpoint).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"no metrics for a mount at {mountpoint}: mount it with -o metrics=HOST:PORT"
        ) from None
