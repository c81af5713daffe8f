"""Reports for operators: cluster status and one file's chunk map."""

from __future__ import annotations

import os
from typing import Any

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
