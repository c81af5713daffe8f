"""Reports for operators: cluster status and one file's chunk map."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .. import errors
from ..meta import Ino, Meta


async def cluster_status(meta: Meta) -> dict[str, Any]:
    """``{"settings", "files", "bytes", "nodes": [{"id", "url", "zone", "status",
    "heartbeat_age_s", "used_bytes", "free_bytes", "capacity_bytes", "chunks",
    "replicas"}]}``. ``chunks`` is what the node reports holding; ``replicas``
    is how many replicas the metadata records on it.
    """
    settings = await meta.registry.settings()
    recorded = await meta.maintenance.chunk_counts()
    totals = await meta.maintenance.file_totals()
    return {
        "settings": {"replicas": settings.replicas, "max_file_size": settings.max_file_size},
        "files": totals.files,
        "bytes": totals.bytes,
        "nodes": [
            {
                "id": n.node_id,
                "url": n.base_url,
                "zone": n.zone,
                "status": n.status if n.live or n.status != "active" else "stale",
                "draining": n.draining,
                "heartbeat_age_s": round(n.heartbeat_age_s, 3),
                "used_bytes": n.used_bytes,
                "free_bytes": n.free_bytes,
                "capacity_bytes": n.capacity_bytes,
                "chunks": n.chunk_count,
                "replicas": recorded.get(n.node_id, 0),
            }
            for n in await meta.registry.nodes()
        ],
    }


async def file_info(meta: Meta, ino: int) -> dict[str, Any]:
    """``{"ino", "size", "version", "digest", "chunks": [{"index", "offset",
    "length", "sha256", "hole", "nodes"}]}`` for the committed version of
    ``ino``: ``digest`` is the version's content digest (hex; for files
    committed by this version of chunkfs, ``layout.file_digest``), a chunk's
    ``sha256`` its id (None for a hole). Raises ``NotFound``.
    """
    cmap = await meta.content.chunk_map(Ino(ino))
    return {
        "ino": cmap.ino,
        "size": cmap.size,
        "version": cmap.version,
        "digest": cmap.sha256.hex() if cmap.sha256 else None,
        "chunks": [
            {
                "index": c.index,
                "offset": c.offset,
                "length": c.length,
                "sha256": None if c.hole else c.chunk_id.hex(),
                "hole": c.hole,
                "nodes": list(c.nodes),
            }
            for c in cmap.chunks
        ],
    }


def mount_dsn(path: str) -> str:
    """The DSN of the chunkfs mount holding ``path``, from /proc/mounts (as
    the mount shows it: without a password, which then comes from PGPASSFILE
    or the environment). Raises ``ConfigError`` when no chunkfs mount holds it.
    """
    real = os.path.realpath(path)
    best = None
    with open("/proc/mounts") as mounts:
        for line in mounts:
            source, target, fstype = line.split()[:3]
            target = target.replace("\\040", " ")
            if fstype != "fuse.chunkfs":
                continue
            inside = real == target or real.startswith(target.rstrip("/") + "/")
            if inside and (best is None or len(target) > len(best[1])):
                best = (source, target)
    if best is None:
        raise errors.ConfigError(f"{path} is not on a chunkfs mount (give --dsn)")
    return best[0]


@dataclass(frozen=True)
class MountSample:
    """A mount's counters at one moment (``chunkfs.metrics``): FUSE requests
    by operation and their total seconds, errors, PostgreSQL round trips,
    node requests and failures, bytes up and down, commits and their total
    seconds, content-cache hits and misses, spool bytes now.
    """

    at: float
    fuse: dict[str, float]
    fuse_seconds: float
    fuse_errors: float
    pg_round_trips: float
    node_requests: float
    node_failures: float
    bytes_up: float
    bytes_down: float
    commits: float
    commit_seconds: float
    cache_hits: float
    cache_misses: float
    spool_bytes: float


def sample_mount(address: str, timeout: float = 5.0) -> MountSample:
    """Read the metrics a mount serves at ``address`` (HOST:PORT). Raises
    ``ConfigError`` when they cannot be read.
    """
    try:
        text = httpx.get(f"http://{address}/metrics", timeout=timeout).text
    except httpx.HTTPError as exc:
        raise errors.ConfigError(f"cannot read the mount's metrics at {address}: {exc}") from None
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def total(name: str, **match: str) -> float:
        return sum(
            v
            for (n, labels), v in values.items()
            if n == name and all(dict(labels).get(k) == want for k, want in match.items())
        )

    fuse = {
        dict(labels)["op"]: v
        for (n, labels), v in values.items()
        if n == "chunkfs_fuse_request_seconds_count"
    }
    return MountSample(
        at=time.monotonic(),
        fuse=fuse,
        fuse_seconds=total("chunkfs_fuse_request_seconds_sum"),
        fuse_errors=total("chunkfs_fuse_errors_total"),
        pg_round_trips=total("chunkfs_pg_round_trips_total"),
        node_requests=total("chunkfs_node_requests_total"),
        node_failures=total("chunkfs_node_requests_total")
        - total("chunkfs_node_requests_total", outcome="ok"),
        bytes_up=total("chunkfs_node_bytes_total", direction="up"),
        bytes_down=total("chunkfs_node_bytes_total", direction="down"),
        commits=total("chunkfs_commit_seconds_count"),
        commit_seconds=total("chunkfs_commit_seconds_sum"),
        cache_hits=total("chunkfs_content_cache_lookups_total", result="hit"),
        cache_misses=total("chunkfs_content_cache_lookups_total", result="miss"),
        spool_bytes=total("chunkfs_spool_bytes"),
    )


def mount_rates(before: MountSample, after: MountSample) -> dict[str, Any]:
    """What the mount did between two samples, per second (sizes in MiB/s,
    latencies in ms, the cache hit ratio in %), and the busiest FUSE
    operations (``top``: op -> requests per second).
    """
    dt = max(after.at - before.at, 1e-9)
    requests = sum(after.fuse.values()) - sum(before.fuse.values())
    commits = after.commits - before.commits
    lookups = (after.cache_hits + after.cache_misses) - (before.cache_hits + before.cache_misses)
    per_op = {op: (n - before.fuse.get(op, 0.0)) / dt for op, n in after.fuse.items()}
    busiest = sorted((rate, op) for op, rate in per_op.items() if rate > 0)[::-1][:5]
    return {
        "fuse_per_s": round(requests / dt, 1),
        "fuse_ms": round((after.fuse_seconds - before.fuse_seconds) / requests * 1e3, 3)
        if requests
        else 0.0,
        "errors_per_s": round((after.fuse_errors - before.fuse_errors) / dt, 1),
        "pg_per_s": round((after.pg_round_trips - before.pg_round_trips) / dt, 1),
        "node_per_s": round((after.node_requests - before.node_requests) / dt, 1),
        "node_failures_per_s": round((after.node_failures - before.node_failures) / dt, 1),
        "up_mib_s": round((after.bytes_up - before.bytes_up) / dt / (1 << 20), 2),
        "down_mib_s": round((after.bytes_down - before.bytes_down) / dt / (1 << 20), 2),
        "commits_per_s": round(commits / dt, 1),
        "commit_ms": round((after.commit_seconds - before.commit_seconds) / commits * 1e3, 2)
        if commits
        else 0.0,
        "cache_hit_pct": round(100 * (after.cache_hits - before.cache_hits) / lookups, 1)
        if lookups
        else None,
        "spool_mib": round(after.spool_bytes / (1 << 20), 1),
        "top": {op: round(rate, 1) for rate, op in busiest},
    }
