"""The cluster's registry: its settings (made by mkfs, with the schema),
the storage nodes with their heartbeats and space, and the ring's vnodes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import stat
from importlib import resources

from .. import errors, ring
from ..pg import Connection, Database
from .records import (
    HEARTBEAT_QUIET_S,
    HEARTBEAT_TIMEOUT_S,
    ROOT_INO,
    FsStats,
    NodeInfo,
    Settings,
    now_ns,
)

# The schema_version this code needs (schema.sql sets it; mkfs upgrades to it).
SCHEMA_VERSION = 8


async def _refuse_foreign_tables(conn: Connection, ddl: str) -> None:
    """Raise ``ConfigError`` when the schema mkfs would write into (the
    first of the connection's search path) holds tables that ``ddl`` makes
    but is not a chunkfs filesystem: mkfs would mix its tables with them.
    """
    clashing = await conn.fetchval(
        """SELECT array_agg(table_name::text ORDER BY table_name)
           FROM information_schema.tables
           WHERE table_schema = current_schema() AND table_name = ANY($1::text[])""",
        re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", ddl),
    )
    if not clashing:
        return
    ours = "settings" in clashing and await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE "
        "table_schema = current_schema() AND table_name = 'settings' "
        "AND column_name = 'cluster_token')"
    )
    if not ours:
        raise errors.ConfigError(
            f"the database already has tables chunkfs would make ({', '.join(clashing)}) "
            f"and is not a chunkfs filesystem: give chunkfs a database of its own"
        )


class Registry:
    """The cluster: its settings (mkfs), storage nodes, heartbeats and ring vnodes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def mkfs(
        self, *, replicas: int, max_file_size: int, uid: int, gid: int, upload_ttl_s: int = 3600
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
        if upload_ttl_s <= 0:
            raise errors.InvalidArgument("upload TTL must be positive")
        ddl = resources.files("chunkfs").joinpath("schema.sql").read_text()

        async def body(conn: Connection) -> bool:
            async with conn.transaction():
                return await make(conn)

        async def make(conn: Connection) -> bool:
            # Serialize concurrent mkfs runs on the same database.
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await _refuse_foreign_tables(conn, ddl)
            await conn.execute(ddl)
            made = await conn.fetchval(
                "INSERT INTO settings (replicas, max_file_size, cluster_token, upload_ttl_s) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                replicas,
                max_file_size,
                secrets.token_hex(32),
                upload_ttl_s,
            )
            t = now_ns()
            await conn.execute(
                "INSERT INTO inodes (ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                "VALUES ($1, $2, $3, $4, 2, $5, $5, $5) ON CONFLICT DO NOTHING",
                ROOT_INO,
                stat.S_IFDIR | 0o755,
                uid,
                gid,
                t,
            )
            return bool(made)

        # Its own transaction rather than Database.transaction, whose first
        # statement needs commit_marks, which this may create. Cut off
        # mid-way, it raises; run again, it finishes what is missing.
        return await self.db.run(body)

    async def settings(self) -> Settings:
        """The cluster settings. Raises ``ConfigError`` when mkfs never ran
        or the schema is older than ``SCHEMA_VERSION``.
        """
        try:
            # The whole row as JSON: an older schema lacks some columns.
            row = await self.db.fetchrow(
                "SELECT to_jsonb(settings) AS settings, "
                "(SELECT version FROM schema_version) AS schema_version FROM settings",
                read=True,
            )
        except Exception as exc:  # undefined table: not a chunkfs database
            if isinstance(exc, errors.ChunkfsError):
                raise
            row = None
        if row is None:
            raise errors.ConfigError("not a chunkfs filesystem (run `chunkfs mkfs` first)")
        if row["schema_version"] < SCHEMA_VERSION:
            raise errors.ConfigError(
                "the filesystem's metadata schema is older than this chunkfs: "
                "run `chunkfs mkfs` on it to upgrade (files and settings are kept)"
            )
        settings = json.loads(row["settings"])
        return Settings(**{f.name: settings[f.name] for f in dataclasses.fields(Settings)})

    async def register_node(
        self,
        node_id: str,
        base_url: str,
        *,
        zone: str,
        capacity_bytes: int,
        used_bytes: int,
        free_bytes: int,
        chunk_count: int,
    ) -> None:
        """Register (or re-register) a node as active at ``base_url`` in
        ``zone``, with its 150 vnodes; a new URL or zone replaces the old.

        Raises ``ConfigError`` when another live node holds ``base_url``
        (two nodes behind one address would take each other's replicas).
        """
        vnodes = [
            (ring.to_signed(p), node_id, i) for i, p in enumerate(ring.vnode_positions(node_id))
        ]

        async def body(conn: Connection) -> None:
            await conn.execute("LOCK TABLE storage_nodes IN SHARE ROW EXCLUSIVE MODE")
            holder = await conn.fetchval(
                """SELECT node_id FROM storage_nodes
                   WHERE base_url = $1 AND node_id <> $2 AND status = 'active'
                     AND heartbeat_age(last_heartbeat, $4) < $3""",
                base_url,
                node_id,
                HEARTBEAT_TIMEOUT_S,
                HEARTBEAT_QUIET_S,
            )
            if holder is not None:
                raise errors.ConfigError(
                    f"live node {holder} is registered at {base_url}: give this node "
                    f"another address (--listen / --advertise)"
                )
            await conn.execute(
                """INSERT INTO storage_nodes (node_id, base_url, zone, status, capacity_bytes,
                       used_bytes, free_bytes, chunk_count, last_heartbeat)
                   VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, now())
                   ON CONFLICT (node_id) DO UPDATE SET base_url = $2, zone = $3,
                       status = 'active', capacity_bytes = $4, used_bytes = $5,
                       free_bytes = $6, chunk_count = $7, last_heartbeat = now()""",
                node_id,
                base_url,
                zone,
                capacity_bytes,
                used_bytes,
                free_bytes,
                chunk_count,
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
        """Move the node's last_heartbeat to now and record its space
        (bytes). When no node had a heartbeat for ``HEARTBEAT_QUIET_S``
        seconds (PostgreSQL was unreachable), that quiet period is recorded
        first: heartbeat ages leave it out (schema.sql, version 6).
        """
        await self.db.execute(
            """WITH newest AS (
                   SELECT max(last_heartbeat) AS t FROM storage_nodes WHERE status = 'active'
               ), quiet AS (
                   UPDATE settings SET quiet_since = newest.t, quiet_until = now()
                   FROM newest WHERE newest.t < now() - make_interval(secs => $6)
               )
               UPDATE storage_nodes SET last_heartbeat = now(), status = 'active',
                   capacity_bytes = $2, used_bytes = $3, free_bytes = $4, chunk_count = $5
               WHERE node_id = $1""",
            node_id,
            capacity_bytes,
            used_bytes,
            free_bytes,
            chunk_count,
            HEARTBEAT_QUIET_S,
        )

    async def node_stopped(self, node_id: str) -> None:
        """Mark a node as cleanly stopped (it stays registered, not active)."""
        await self.db.execute(
            "UPDATE storage_nodes SET status = 'stopped' WHERE node_id = $1", node_id
        )

    async def nodes(self) -> list[NodeInfo]:
        """Every registered node, ordered by id."""
        rows = await self.db.fetch(
            """SELECT node_id, base_url, zone, status, capacity_bytes, used_bytes, free_bytes,
                      chunk_count, draining,
                      heartbeat_age(last_heartbeat, $1) AS heartbeat_age_s
               FROM storage_nodes ORDER BY node_id""",
            HEARTBEAT_QUIET_S,
            read=True,
        )
        return [NodeInfo(**dict(r)) for r in rows]

    async def set_draining(self, node_id: str, draining: bool) -> None:
        """Mark a node as draining (no new replicas) or not. Raises ``NotFound``."""
        status = await self.db.execute(
            "UPDATE storage_nodes SET draining = $2 WHERE node_id = $1", node_id, draining
        )
        if status.endswith(" 0"):
            raise errors.NotFound(f"no storage node {node_id}")

    async def remove_node(self, node_id: str, *, force: bool = False) -> int:
        """Unregister a node: its vnodes and its replica records go. Returns
        how many chunks that files use are left with fewer than R recorded
        replicas (``chunkfs repair`` brings them back).

        Raises ``NotFound``; ``NotPermitted`` while the node is live and not
        drained (unless ``force``), and while it holds the only recorded copy
        of a chunk that a file uses.
        """

        async def body(conn: Connection) -> int:
            row = await conn.fetchrow(
                """SELECT draining,
                          status = 'active' AND heartbeat_age(last_heartbeat, $3) < $2 AS live
                   FROM storage_nodes WHERE node_id = $1 FOR UPDATE""",
                node_id,
                HEARTBEAT_TIMEOUT_S,
                HEARTBEAT_QUIET_S,
            )
            if row is None:
                raise errors.NotFound(f"no storage node {node_id}")
            if row["live"] and not row["draining"] and not force:
                raise errors.NotPermitted(
                    f"node {node_id} is live and not drained: run `chunkfs node drain` "
                    f"first (or remove it with --force)"
                )
            only = await conn.fetchval(
                """SELECT count(*) FROM chunk_replicas r
                   WHERE r.node_id = $1
                     AND EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = r.chunk_id)
                     AND NOT EXISTS (SELECT 1 FROM chunk_replicas o
                                     WHERE o.chunk_id = r.chunk_id AND o.node_id <> $1)""",
                node_id,
            )
            if only:
                raise errors.NotPermitted(
                    f"node {node_id} holds the only copy of {only} chunks: "
                    f"drain it first (chunkfs node drain)"
                )
            short = await conn.fetchval(
                """SELECT count(*) FROM chunk_replicas r
                   WHERE r.node_id = $1
                     AND EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = r.chunk_id)
                     AND (SELECT count(*) FROM chunk_replicas o
                          WHERE o.chunk_id = r.chunk_id AND o.node_id <> $1)
                         < (SELECT replicas FROM settings)""",
                node_id,
            )
            await conn.execute("DELETE FROM chunk_replicas WHERE node_id = $1", node_id)
            await conn.execute("DELETE FROM storage_nodes WHERE node_id = $1", node_id)
            return int(short)

        return await self.db.transaction(body)

    async def ring_vnodes(self) -> list[ring.Vnode]:
        """Every vnode of the ring."""
        rows = await self.db.fetch("SELECT hash, node_id FROM hash_ring_vnodes", read=True)
        return [ring.Vnode(ring.to_unsigned(r["hash"]), r["node_id"]) for r in rows]

    async def statfs(self) -> FsStats:
        """The space of the live nodes divided by the replica count, and the
        number of inodes.
        """
        row = await self.db.fetchrow(
            """SELECT coalesce(sum(capacity_bytes), 0)::bigint AS cap,
                      coalesce(sum(free_bytes), 0)::bigint AS free,
                      (SELECT count(*) FROM inodes) AS inodes,
                      (SELECT replicas FROM settings) AS r
               FROM storage_nodes
               WHERE status = 'active'
                 AND heartbeat_age(last_heartbeat, $2) < $1""",
            HEARTBEAT_TIMEOUT_S,
            HEARTBEAT_QUIET_S,
            read=True,
        )
        assert row is not None  # an aggregate without GROUP BY gives one row
        r = max(1, row["r"] or 1)
        return FsStats(row["cap"] // r, row["free"] // r, row["inodes"])
