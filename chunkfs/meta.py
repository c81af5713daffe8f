"""All SQL of chunkfs: one transactional method per filesystem operation.

``Meta`` knows nothing of FUSE or HTTP. Inode numbers are ``Ino`` ints, chunk
ids are 32-byte SHA-256 digests, times are nanoseconds since the epoch. Every
method raises ``MetadataUnavailable`` (EIO) when PostgreSQL does not answer,
and the ``ChunkfsError`` named in its docstring for bad input; a method that
raises has changed nothing.
"""

from __future__ import annotations

import logging
import secrets
import stat
import time
from dataclasses import dataclass
from importlib import resources
from typing import NewType, Sequence

from . import errors, ring
from .pg import Connection, Database, Record

log = logging.getLogger(__name__)

Ino = NewType("Ino", int)
ROOT_INO = Ino(1)
NAME_MAX = 255
SYMLINK_MAX = 4095
SCHEMA_VERSION = 1
# A node is live while its last heartbeat is younger than this (seconds).
HEARTBEAT_TIMEOUT_S = 15.0


def now_ns() -> int:
    """The wall clock in nanoseconds since the epoch."""
    return time.time_ns()


@dataclass(frozen=True)
class Settings:
    """Cluster-wide settings fixed at mkfs."""

    replicas: int
    max_file_size: int
    cluster_token: str
    upload_ttl_s: int


@dataclass(frozen=True)
class NodeInfo:
    """A storage node as registered: ids, URL, space in bytes, heartbeat age in seconds."""

    node_id: str
    base_url: str
    status: str
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    chunk_count: int
    heartbeat_age_s: float

    @property
    def live(self) -> bool:
        """True while the node runs and its heartbeat is fresh."""
        return self.status == "active" and self.heartbeat_age_s < HEARTBEAT_TIMEOUT_S


class Meta:
    """The metadata engine over one ``Database``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ----------------------------------------------------------- cluster

    async def mkfs(
        self, *, replicas: int, max_file_size: int, uid: int, gid: int
    ) -> bool:
        """Apply schema.sql and create the settings row and the root inode.

        Safe to run twice: an existing filesystem keeps its settings. Returns
        True when a new filesystem was made. Raises ``InvalidArgument`` for
        settings out of range.
        """
        if not 1 <= replicas <= 16:
            raise errors.InvalidArgument("replicas must be between 1 and 16")
        if max_file_size <= 0:
            raise errors.InvalidArgument("max file size must be positive")
        ddl = resources.files("chunkfs").joinpath("schema.sql").read_text()

        async def body(conn: Connection) -> bool:
            # Serialize concurrent mkfs runs on the same database.
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await conn.execute(ddl)
            made = await conn.fetchval(
                "INSERT INTO settings (replicas, max_file_size, cluster_token) "
                "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
                replicas, max_file_size, secrets.token_hex(32),
            )
            t = now_ns()
            await conn.execute(
                "INSERT INTO inodes (ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                "VALUES ($1, $2, $3, $4, 2, $5, $5, $5) ON CONFLICT DO NOTHING",
                ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, t,
            )
            return bool(made)

        return await self.db.transaction(body)

    async def settings(self) -> Settings:
        """The cluster settings. Raises ``ConfigError`` when mkfs never ran."""
        try:
            row = await self.db.fetchrow(
                "SELECT replicas, max_file_size, cluster_token, upload_ttl_s FROM settings"
            )
        except Exception as exc:  # undefined table: not a chunkfs database
            if isinstance(exc, errors.ChunkfsError):
                raise
            row = None
        if row is None:
            raise errors.ConfigError("not a chunkfs filesystem (run `chunkfs mkfs` first)")
        return Settings(**dict(row))

    # ----------------------------------------------------- storage nodes

    async def register_node(
        self,
        node_id: str,
        base_url: str,
        *,
        capacity_bytes: int,
        used_bytes: int,
        free_bytes: int,
        chunk_count: int,
    ) -> None:
        """Register (or re-register) a node as active, with its 150 vnodes."""
        vnodes = [
            (ring.to_signed(p), node_id, i)
            for i, p in enumerate(ring.vnode_positions(node_id))
        ]

        async def body(conn: Connection) -> None:
            await conn.execute(
                """INSERT INTO storage_nodes (node_id, base_url, status, capacity_bytes,
                       used_bytes, free_bytes, chunk_count, last_heartbeat)
                   VALUES ($1, $2, 'active', $3, $4, $5, $6, now())
                   ON CONFLICT (node_id) DO UPDATE SET base_url = $2, status = 'active',
                       capacity_bytes = $3, used_bytes = $4, free_bytes = $5,
                       chunk_count = $6, last_heartbeat = now()""",
                node_id, base_url, capacity_bytes, used_bytes, free_bytes, chunk_count,
            )
            await conn.executemany(
                "INSERT INTO hash_ring_vnodes (hash, node_id, vnode) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                vnodes,
            )

        await self.db.transaction(body)

    async def heartbeat(
        self,
        node_id: str,
        *,
        capacity_bytes: int,
        used_bytes: int,
        free_bytes: int,
        chunk_count: int,
    ) -> None:
        """Move the node's last_heartbeat to now and record its space (bytes)."""
        await self.db.execute(
            """UPDATE storage_nodes SET last_heartbeat = now(), status = 'active',
                   capacity_bytes = $2, used_bytes = $3, free_bytes = $4, chunk_count = $5
               WHERE node_id = $1""",
            node_id, capacity_bytes, used_bytes, free_bytes, chunk_count,
        )

    async def node_stopped(self, node_id: str) -> None:
        """Mark a node as cleanly stopped (it stays registered, not active)."""
        await self.db.execute(
            "UPDATE storage_nodes SET status = 'stopped' WHERE node_id = $1", node_id
        )

    async def nodes(self) -> list[NodeInfo]:
        """Every registered node, ordered by id."""
        rows = await self.db.fetch(
            """SELECT node_id, base_url, status, capacity_bytes, used_bytes, free_bytes,
                      chunk_count,
                      extract(epoch FROM now() - last_heartbeat)::float8 AS heartbeat_age_s
               FROM storage_nodes ORDER BY node_id"""
        )
        return [NodeInfo(**dict(r)) for r in rows]

    async def ring_vnodes(self) -> list[tuple[int, str]]:
        """Every vnode of the ring as ``(unsigned position, node_id)``."""
        rows = await self.db.fetch("SELECT hash, node_id FROM hash_ring_vnodes")
        return [(ring.to_unsigned(r["hash"]), r["node_id"]) for r in rows]
