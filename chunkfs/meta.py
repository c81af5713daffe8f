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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NewType

from . import errors, ring
from .pg import Connection, Database, Record, UniqueViolationError

log = logging.getLogger(__name__)

Ino = NewType("Ino", int)
ROOT_INO = Ino(1)
NAME_MAX = 255
SYMLINK_MAX = 4095
# The schema_version this code needs (schema.sql sets it; mkfs upgrades to it).
SCHEMA_VERSION = 2
LINK_MAX = 65000  # hard links per inode, as on ext4
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
    draining: bool = False

    @property
    def live(self) -> bool:
        """True while the node runs and its heartbeat is fresh."""
        return self.status == "active" and self.heartbeat_age_s < HEARTBEAT_TIMEOUT_S

    @property
    def writable(self) -> bool:
        """True when new replicas may go to the node: live and not draining."""
        return self.live and not self.draining


class Meta:
    """The metadata engine over one ``Database``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ----------------------------------------------------------- cluster

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
            # Serialize concurrent mkfs runs on the same database.
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
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

        return await self.db.transaction(body)

    async def settings(self) -> Settings:
        """The cluster settings. Raises ``ConfigError`` when mkfs never ran
        or the schema is older than ``SCHEMA_VERSION``.
        """
        try:
            row = await self.db.fetchrow(
                "SELECT replicas, max_file_size, cluster_token, upload_ttl_s, "
                "(SELECT version FROM schema_version) AS schema_version FROM settings"
            )
        except Exception as exc:  # undefined table: not a chunkfs database
            if isinstance(exc, errors.ChunkfsError):
                raise
            row = None
        if row is None:
            raise errors.ConfigError("not a chunkfs filesystem (run `chunkfs mkfs` first)")
        settings = dict(row)
        if settings.pop("schema_version") < SCHEMA_VERSION:
            raise errors.ConfigError(
                "the filesystem's metadata schema is older than this chunkfs: "
                "run `chunkfs mkfs` on it to upgrade (files and settings are kept)"
            )
        return Settings(**settings)

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
            (ring.to_signed(p), node_id, i) for i, p in enumerate(ring.vnode_positions(node_id))
        ]

        async def body(conn: Connection) -> None:
            await conn.execute(
                """INSERT INTO storage_nodes (node_id, base_url, status, capacity_bytes,
                       used_bytes, free_bytes, chunk_count, last_heartbeat)
                   VALUES ($1, $2, 'active', $3, $4, $5, $6, now())
                   ON CONFLICT (node_id) DO UPDATE SET base_url = $2, status = 'active',
                       capacity_bytes = $3, used_bytes = $4, free_bytes = $5,
                       chunk_count = $6, last_heartbeat = now()""",
                node_id,
                base_url,
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
        """Move the node's last_heartbeat to now and record its space (bytes)."""
        await self.db.execute(
            """UPDATE storage_nodes SET last_heartbeat = now(), status = 'active',
                   capacity_bytes = $2, used_bytes = $3, free_bytes = $4, chunk_count = $5
               WHERE node_id = $1""",
            node_id,
            capacity_bytes,
            used_bytes,
            free_bytes,
            chunk_count,
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
                      chunk_count, draining,
                      extract(epoch FROM now() - last_heartbeat)::float8 AS heartbeat_age_s
               FROM storage_nodes ORDER BY node_id"""
        )
        return [NodeInfo(**dict(r)) for r in rows]

    async def set_draining(self, node_id: str, draining: bool) -> None:
        """Mark a node as draining (no new replicas) or not. Raises ``NotFound``."""
        status = await self.db.execute(
            "UPDATE storage_nodes SET draining = $2 WHERE node_id = $1", node_id, draining
        )
        if status.endswith(" 0"):
            raise errors.NotFound(f"no storage node {node_id}")

    async def remove_node(self, node_id: str) -> int:
        """Unregister a node: its vnodes and its replica records go. Returns
        how many replica records were dropped.

        Raises ``NotFound``, and ``NotPermitted`` while the node holds the
        only recorded copy of a chunk that a file uses.
        """

        async def body(conn: Connection) -> int:
            if not await conn.fetchval(
                "SELECT true FROM storage_nodes WHERE node_id = $1 FOR UPDATE", node_id
            ):
                raise errors.NotFound(f"no storage node {node_id}")
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
            status = await conn.execute("DELETE FROM chunk_replicas WHERE node_id = $1", node_id)
            await conn.execute("DELETE FROM storage_nodes WHERE node_id = $1", node_id)
            return int(status.split()[-1])

        return await self.db.transaction(body)

    async def ring_vnodes(self) -> list[tuple[int, str]]:
        """Every vnode of the ring as ``(unsigned position, node_id)``."""
        rows = await self.db.fetch("SELECT hash, node_id FROM hash_ring_vnodes")
        return [(ring.to_unsigned(r["hash"]), r["node_id"]) for r in rows]

    # ------------------------------------------------------------ inodes

    async def getattr(self, ino: Ino) -> Attrs:
        """The inode's attributes. Raises ``NotFound``."""
        row = await self.db.fetchrow(f"SELECT {_ATTR_COLS} FROM inodes WHERE ino = $1", ino)
        if row is None:
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)

    async def lookup(self, parent: Ino, name: bytes) -> Attrs:
        """The attributes of ``name`` in directory ``parent``.

        Raises ``NameTooLong`` past 255 bytes and ``NotFound``.
        """
        _check_name(name)
        row = await self.db.fetchrow(
            f"SELECT {_ATTR_COLS_I} FROM dentries d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = $1 AND d.name = $2",
            parent,
            name,
        )
        if row is None:
            raise errors.NotFound(name.decode(errors="replace"))
        return Attrs.from_row(row)

    async def create(
        self,
        parent: Ino,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
        now: int | None = None,
    ) -> Attrs:
        """Create a file, directory, special file or (with ``target``) symlink,
        at time ``now`` (ns; default: the clock), which becomes the new inode's
        times and the parent's mtime and ctime.

        ``mode`` holds the file type and the permission bits (umask already
        applied). A setgid parent passes its group on (and its setgid bit, to
        directories). Raises ``NameTooLong``, ``Exists``, ``NotFound`` (no
        parent), ``NotADirectory`` and, for a target over 4095 bytes,
        ``NameTooLong``.
        """
        _check_name(name)
        if target is not None and not 1 <= len(target) <= SYMLINK_MAX:
            raise errors.NameTooLong("symlink target must be 1..4095 bytes")
        is_dir = stat.S_ISDIR(mode)
        # One statement (one round trip, atomic on its own): lock the live
        # parent directory, make the inode (the setgid rules as above), its
        # dentry (a taken name aborts the whole statement) and any symlink
        # target, and touch the parent.
        try:
            row = await self.db.fetchrow(
                f"""WITH p AS (
                        SELECT mode, gid FROM inodes
                        WHERE ino = $1 AND nlink > 0 AND mode & {_S_IFMT} = {stat.S_IFDIR}
                        FOR UPDATE
                    ), i AS (
                        INSERT INTO inodes (ino, mode, uid, gid, nlink, size, rdev,
                                            atime_ns, mtime_ns, ctime_ns)
                        SELECT nextval('inode_seq'),
                               CASE WHEN p.mode & {stat.S_ISGID} <> 0 AND $10::boolean
                                    THEN $3::integer | {stat.S_ISGID} ELSE $3::integer END,
                               $4::bigint,
                               CASE WHEN p.mode & {stat.S_ISGID} <> 0 THEN p.gid ELSE $5::bigint END,
                               CASE WHEN $10::boolean THEN 2 ELSE 1 END,
                               $6::bigint, $7::bigint, $8::bigint, $8::bigint, $8::bigint
                        FROM p
                        RETURNING {_ATTR_COLS}
                    ), d AS (
                        INSERT INTO dentries (parent, name, ino) SELECT $1, $2, ino FROM i
                    ), s AS (
                        INSERT INTO symlinks (ino, target)
                        SELECT ino, $9::bytea FROM i WHERE $9::bytea IS NOT NULL
                    ), u AS (
                        UPDATE inodes SET mtime_ns = $8, ctime_ns = $8,
                                          nlink = nlink + CASE WHEN $10 THEN 1 ELSE 0 END
                        WHERE ino = $1 AND EXISTS (SELECT 1 FROM i)
                    )
                    SELECT * FROM i""",
                parent,
                name,
                mode,
                uid,
                gid,
                len(target) if target else 0,
                rdev,
                now_ns() if now is None else now,
                target,
                is_dir,
            )
        except UniqueViolationError:
            raise errors.Exists(name.decode(errors="replace")) from None
        if row is None:
            await self._check_dir(parent)
            raise errors.NotFound(f"directory {parent} was removed")
        return Attrs.from_row(row)

    async def _check_dir(self, ino: Ino) -> None:
        """Raise ``NotFound`` or ``NotADirectory`` unless ``ino`` is a directory."""
        row = await self.db.fetchrow("SELECT mode FROM inodes WHERE ino = $1", ino)
        if row is None:
            raise errors.NotFound(f"no directory {ino}")
        if not stat.S_ISDIR(row["mode"]):
            raise errors.NotADirectory(f"inode {ino} is not a directory")

    async def link(self, ino: Ino, parent: Ino, name: bytes) -> Attrs:
        """Add a hard link ``name`` in ``parent`` to ``ino``.

        Raises ``NameTooLong``, ``Exists``, ``NotFound``, ``NotPermitted``
        for a directory and ``TooManyLinks`` past ``LINK_MAX`` links.
        """
        _check_name(name)
        t = now_ns()

        async def body(conn: Connection) -> Attrs:
            await _lock_dir(conn, parent)
            row = await conn.fetchrow(
                "SELECT mode, nlink FROM inodes WHERE ino = $1 FOR UPDATE", ino
            )
            if row is None:
                raise errors.NotFound(f"no inode {ino}")
            if stat.S_ISDIR(row["mode"]):
                raise errors.NotPermitted("hard links to directories are not allowed")
            if row["nlink"] >= LINK_MAX:
                raise errors.TooManyLinks(f"inode {ino} has {LINK_MAX} links")
            await _insert_dentry(conn, parent, name, ino)
            row = await conn.fetchrow(
                f"UPDATE inodes SET nlink = nlink + 1, ctime_ns = $2 WHERE ino = $1 "
                f"RETURNING {_ATTR_COLS}",
                ino,
                t,
            )
            await _touch_dir(conn, parent, t)
            return Attrs.from_row(row)

        return await self.db.transaction(body)

    async def unlink(
        self, parent: Ino, name: bytes, *, is_dir: bool = False, now: int | None = None
    ) -> Attrs:
        """Remove a name (``rmdir`` when ``is_dir``) at time ``now`` (ns;
        default: the clock; the parent's new mtime and ctime); return the
        target's new attributes.

        The inode itself stays until ``purge`` (it may still be open).
        Raises ``NotFound``, ``IsADirectory`` (unlink of a directory),
        ``NotADirectory`` (rmdir of a non-directory), ``NotEmpty``.
        """
        _check_name(name)
        t = now_ns() if now is None else now
        if not is_dir:
            # One statement removes the name of anything but a directory.
            # Every row it changes is reached from the dentry it deleted, so
            # a concurrent unlink or rename of the same name makes it delete
            # nothing (NotFound) rather than act on a name that moved.
            row = await self.db.fetchrow(_UNLINK_NON_DIR, parent, name, t)
            if row is not None and stat.S_ISDIR(row["found_mode"]):
                raise errors.IsADirectory(name.decode(errors="replace"))
            if row is None or row["ino"] is None:  # no such name, or it went meanwhile
                raise errors.NotFound(name.decode(errors="replace"))
            return Attrs.from_row(row)

        async def body(conn: Connection) -> Attrs:
            await _lock_dir(conn, parent)
            ino = await conn.fetchval(
                "SELECT ino FROM dentries WHERE parent = $1 AND name = $2", parent, name
            )
            if ino is None:
                raise errors.NotFound(name.decode(errors="replace"))
            mode = await conn.fetchval("SELECT mode FROM inodes WHERE ino = $1 FOR UPDATE", ino)
            if not stat.S_ISDIR(mode):
                raise errors.NotADirectory(name.decode(errors="replace"))
            await _check_empty(conn, ino)
            await conn.execute("DELETE FROM dentries WHERE parent = $1 AND name = $2", parent, name)
            row = await _drop_link(conn, ino, mode, t)
            await _touch_dir(conn, parent, t, nlink_delta=-1)
            return Attrs.from_row(row)

        return await self.db.transaction(body)

    async def rename(
        self,
        old_parent: Ino,
        old_name: bytes,
        new_parent: Ino,
        new_name: bytes,
        *,
        noreplace: bool = False,
        exchange: bool = False,
        now: int | None = None,
    ) -> Renamed:
        """Rename atomically, with rename(2)'s rules and errnos, at time
        ``now`` (ns; default: the clock), which becomes the parents' mtime
        and ctime and the moved inode's ctime.

        Returns what changed (see ``Renamed``). Raises ``NotFound``,
        ``Exists`` (noreplace), ``InvalidArgument`` (a directory into its own
        subtree, or both flags), ``IsADirectory``, ``NotADirectory``,
        ``NotEmpty``, ``NameTooLong``.
        """
        _check_name(old_name)
        _check_name(new_name)
        if noreplace and exchange:
            raise errors.InvalidArgument("RENAME_NOREPLACE and RENAME_EXCHANGE together")
        t = now_ns() if now is None else now

        if not exchange:
            # The common case, one round trip (see rename_file in schema.sql).
            row = await self.db.fetchrow(
                "SELECT * FROM rename_file($1, $2, $3, $4, $5, $6)",
                old_parent,
                old_name,
                new_parent,
                new_name,
                t,
                noreplace,
            )
            if row is not None and row["done"]:
                replaced = Attrs.from_row(row) if row["ino"] is not None else None
                return Renamed(row["moved"], replaced)

        async def body(conn: Connection) -> Renamed:
            # Lock both parents in ino order, so two renames cannot deadlock.
            for p in sorted({old_parent, new_parent}):
                await _lock_dir(conn, p)
            src = await _dentry(conn, old_parent, old_name)
            if src is None:
                raise errors.NotFound(old_name.decode(errors="replace"))
            dst = await _dentry(conn, new_parent, new_name)
            src_ino, src_mode = src
            if dst is not None and dst[0] == src_ino:
                return Renamed(None, None)  # same inode: rename(2) does nothing
            if noreplace and dst is not None:
                raise errors.Exists(new_name.decode(errors="replace"))
            if exchange and dst is None:
                raise errors.NotFound(new_name.decode(errors="replace"))
            if stat.S_ISDIR(src_mode) and await _is_ancestor(conn, src_ino, new_parent):
                raise errors.InvalidArgument("cannot move a directory into itself")
            if exchange and dst is not None:  # (dst is never None here: see above)
                await _exchange(conn, old_parent, old_name, src, new_parent, new_name, dst, t)
                return Renamed(None, None)
            replaced = None
            if dst is not None:
                replaced = await _replace_target(conn, src_mode, new_parent, new_name, dst, t)
            await conn.execute(
                "UPDATE dentries SET parent = $3, name = $4 WHERE parent = $1 AND name = $2",
                old_parent,
                old_name,
                new_parent,
                new_name,
            )
            moved_dir = stat.S_ISDIR(src_mode) and old_parent != new_parent
            await _touch_dir(conn, old_parent, t, nlink_delta=-1 if moved_dir else 0)
            await _touch_dir(conn, new_parent, t, nlink_delta=1 if moved_dir else 0)
            await conn.execute("UPDATE inodes SET ctime_ns = $2 WHERE ino = $1", src_ino, t)
            return Renamed(None, replaced)  # a directory moved

        return await self.db.transaction(body)

    async def purge(self, inos: Sequence[Ino]) -> int:
        """Delete the inodes among ``inos`` that have no name left (nlink 0),
        with their chunk maps, xattrs and symlink targets; return how many.
        The chunk objects they referenced are left to gc.
        """
        status = await self.db.execute(
            "DELETE FROM inodes WHERE ino = ANY($1::bigint[]) AND nlink = 0", list(inos)
        )
        return int(status.split()[-1])

    async def setattr(
        self,
        ino: Ino,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attrs:
        """Change permission bits, owner or times; ctime moves to now (or
        ``ctime_ns``, never backwards). ``mode`` replaces the permission bits
        only, never the file type. Raises ``NotFound``.
        """
        sets = ["ctime_ns = greatest(ctime_ns, $2)"]
        args: list[object] = [ino, ctime_ns if ctime_ns is not None else now_ns()]
        for col, value in (
            ("uid", uid),
            ("gid", gid),
            ("atime_ns", atime_ns),
            ("mtime_ns", mtime_ns),
        ):
            if value is not None:
                args.append(value)
                sets.append(f"{col} = ${len(args)}")
        if mode is not None:
            args.append(mode & 0o7777)
            sets.append(f"mode = (mode & ~4095) | ${len(args)}")
        row = await self.db.fetchrow(
            f"UPDATE inodes SET {', '.join(sets)} WHERE ino = $1 RETURNING {_ATTR_COLS}", *args
        )
        if row is None:
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)

    async def readlink(self, ino: Ino) -> bytes:
        """A symlink's target. Raises ``InvalidArgument`` for a non-symlink."""
        target = await self.db.fetchval("SELECT target FROM symlinks WHERE ino = $1", ino)
        if target is None:
            raise errors.InvalidArgument(f"inode {ino} is not a symlink")
        return target

    async def readdir(self, parent: Ino, after: int, limit: int) -> list[tuple[bytes, Attrs, int]]:
        """Up to ``limit`` entries of ``parent`` whose cookie is above ``after``,
        as ``(name, attrs, cookie)`` in cookie order.
        """
        rows = await self.db.fetch(
            f"SELECT d.name, d.cookie, {_ATTR_COLS_I} FROM dentries d "
            "JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = $1 AND d.cookie > $2 ORDER BY d.cookie LIMIT $3",
            parent,
            after,
            limit,
        )
        return [(r["name"], Attrs.from_row(r), r["cookie"]) for r in rows]

    async def parent_of(self, ino: Ino) -> Ino:
        """The parent directory of directory ``ino`` (the root is its own)."""
        if ino == ROOT_INO:
            return ROOT_INO
        parent = await self.db.fetchval("SELECT parent FROM dentries WHERE ino = $1 LIMIT 1", ino)
        if parent is None:
            raise errors.NotFound(f"no directory {ino}")
        return Ino(parent)

    # ------------------------------------------------------------ xattrs

    async def xattrs(self, ino: Ino) -> dict[bytes, bytes]:
        """All extended attributes of ``ino``, name -> value."""
        rows = await self.db.fetch("SELECT name, value FROM xattrs WHERE ino = $1", ino)
        return {r["name"]: r["value"] for r in rows}

    async def xattrs_of(self, inos: Sequence[Ino]) -> dict[Ino, dict[bytes, bytes]]:
        """The extended attributes of several inodes: ino -> name -> value
        (inodes without any are left out).
        """
        rows = await self.db.fetch(
            "SELECT ino, name, value FROM xattrs WHERE ino = ANY($1::bigint[])", list(inos)
        )
        out: dict[Ino, dict[bytes, bytes]] = {}
        for r in rows:
            out.setdefault(Ino(r["ino"]), {})[r["name"]] = r["value"]
        return out

    async def setxattr(
        self, ino: Ino, name: bytes, value: bytes, *, create: bool = False, replace: bool = False
    ) -> None:
        """Set an extended attribute (XATTR_CREATE / XATTR_REPLACE semantics).

        Raises ``Exists``, ``NoAttribute``, ``NameTooLong`` (name over 255
        bytes), ``InvalidArgument`` (value over 64 KiB or empty name).
        """
        if not name:
            raise errors.InvalidArgument("empty xattr name")
        if len(name) > NAME_MAX:
            raise errors.NameTooLong("xattr name over 255 bytes")
        if len(value) > 65536:
            raise errors.InvalidArgument("xattr value over 64 KiB")
        t = now_ns()

        async def body(conn: Connection) -> None:
            old = await conn.fetchval(
                "SELECT value FROM xattrs WHERE ino = $1 AND name = $2", ino, name
            )
            if create and old is not None:
                raise errors.Exists(name.decode(errors="replace"))
            if replace and old is None:
                raise errors.NoAttribute(name.decode(errors="replace"))
            if old == value:
                return  # as on ext4: rewriting the same value changes nothing, ctime included
            await conn.execute(
                "INSERT INTO xattrs (ino, name, value) VALUES ($1, $2, $3) "
                "ON CONFLICT (ino, name) DO UPDATE SET value = $3",
                ino,
                name,
                value,
            )
            await conn.execute("UPDATE inodes SET ctime_ns = $2 WHERE ino = $1", ino, t)

        await self.db.transaction(body)

    async def removexattr(self, ino: Ino, name: bytes) -> None:
        """Remove an extended attribute. Raises ``NoAttribute``."""
        t = now_ns()

        async def body(conn: Connection) -> None:
            status = await conn.execute(
                "DELETE FROM xattrs WHERE ino = $1 AND name = $2", ino, name
            )
            if status.endswith(" 0"):
                raise errors.NoAttribute(name.decode(errors="replace"))
            await conn.execute("UPDATE inodes SET ctime_ns = $2 WHERE ino = $1", ino, t)

        await self.db.transaction(body)

    # ------------------------------------------------------ file content

    async def chunk_map(self, ino: Ino) -> ChunkMap:
        """The committed version of a file: size, digest and its chunks with
        the nodes holding each. Raises ``NotFound``.
        """
        # One statement, so the inode row and its chunk rows come from one snapshot.
        rows = await self.db.fetch(
            """SELECT i.version, i.size, i.sha256,
                      c.chunk_index, c."offset", c.length, c.chunk_id, o.block_sha256, o.ring_key,
                      coalesce(array_agg(r.node_id ORDER BY r.node_id)
                               FILTER (WHERE r.node_id IS NOT NULL), '{}') AS nodes
               FROM inodes i
               LEFT JOIN (chunks c JOIN chunk_objects o ON o.chunk_id = c.chunk_id) ON c.ino = i.ino
               LEFT JOIN chunk_replicas r ON r.chunk_id = c.chunk_id
               WHERE i.ino = $1 GROUP BY i.ino, c.ino, c.chunk_index, o.chunk_id
               ORDER BY c.chunk_index""",
            ino,
        )
        if not rows:
            raise errors.NotFound(f"no inode {ino}")
        head = rows[0]
        return ChunkMap(
            ino=ino,
            version=head["version"],
            size=head["size"],
            sha256=head["sha256"],
            chunks=tuple(
                ChunkRef(
                    r["chunk_index"],
                    r["offset"],
                    r["length"],
                    bytes(r["chunk_id"]),
                    tuple(r["nodes"]),
                    r["block_sha256"],
                    ring.to_unsigned(r["ring_key"]),
                )
                for r in rows
                if r["chunk_index"] is not None
            ),
        )

    async def sync(self) -> None:
        """Make every metadata change committed so far durable (fsync)."""
        await self.db.sync()

    async def begin_upload(self, ino: Ino, chunk_ids: Sequence[bytes], ttl_s: int) -> int:
        """Open an upload session protecting ``chunk_ids`` from gc for
        ``ttl_s`` seconds; return its id. One statement, so one round trip.
        """
        return await self.db.fetchval(_BEGIN_UPLOAD, ino, float(ttl_s), sorted(set(chunk_ids)))

    async def begin_commit(
        self, ino: Ino, chunk_ids: Sequence[bytes], ttl_s: int, replicas: int
    ) -> tuple[int, dict[bytes, tuple[str, ...]]]:
        """``begin_upload``, then the chunks among ``chunk_ids`` that a
        committed file uses with at least ``replicas`` recorded holders:
        ``(session_id, {chunk_id: holders})``. Those need no upload.

        The session commits first and the reuse check reads a later snapshot:
        gc either sees the session (and keeps the chunks) or decided before
        it, when a chunk it found unused can have a committed user now only
        through an upload that gc's delete guard refuses to undo.
        """

        async def body(conn: Connection) -> tuple[int, dict[bytes, tuple[str, ...]]]:
            ids = sorted(set(chunk_ids))
            session = await conn.fetchval(_BEGIN_UPLOAD, ino, float(ttl_s), ids)
            rows = await conn.fetch(
                """SELECT r.chunk_id, array_agg(r.node_id ORDER BY r.node_id) AS nodes
                   FROM chunk_replicas r
                   WHERE r.chunk_id = ANY ($1::bytea[])
                     AND EXISTS (SELECT 1 FROM chunks k WHERE k.chunk_id = r.chunk_id)
                   GROUP BY r.chunk_id HAVING count(*) >= $2""",
                ids,
                replicas,
            )
            return session, {bytes(r["chunk_id"]): tuple(r["nodes"]) for r in rows}

        return await self.db.run(body)

    async def fail_upload(self, session_id: int) -> None:
        """Mark an upload session failed; gc reclaims what it pushed."""
        await self.end_upload(session_id, "failed")

    async def end_upload(self, session_id: int, status: str = "completed") -> None:
        """Close an upload session as 'completed' or 'failed'."""
        await self.db.execute(
            "UPDATE upload_sessions SET status = $2 WHERE session_id = $1", session_id, status
        )

    async def commit_chunks(
        self,
        ino: Ino,
        session_id: int | None,
        *,
        size: int,
        sha256: bytes,
        chunks: Sequence[tuple[int, int, int, bytes, bytes | None, int]],
        replicas: Mapping[bytes, Sequence[str]],
        mtime_ns: int,
        max_file_size: int,
        ctime_ns: int | None = None,
        changes: Mapping[str, int] | None = None,
    ) -> Attrs:
        """Switch a file to a new version in one transaction: the chunk map
        (``(index, offset, length, chunk_id, block_digests, ring_position)``
        rows), the replicas just written, size, digest, times (ns; ctime, by
        default mtime, only moves forward) and the ``changes`` made meanwhile
        (``mode`` permission bits, ``uid``, ``gid``, ``atime_ns``); the version
        is bumped and the upload session completed. Raises ``NotFound`` and
        ``FileTooLarge``.
        """
        if size > max_file_size:
            raise errors.FileTooLarge(f"{size} bytes is over the maximum of {max_file_size}")
        changes = changes or {}
        objects = {c[3]: (c[2], c[4], ring.to_signed(c[5])) for c in chunks}
        pairs = [(c, n) for c, nodes in replicas.items() for n in nodes]
        # One statement (one round trip, atomic): the inode row is updated
        # first, which locks it against a concurrent commit of the same file;
        # foreign keys are checked at the end of the statement.
        row = await self.db.fetchrow(
            f"""WITH i AS (
                    UPDATE inodes SET size = $2, sha256 = $3, mtime_ns = $4,
                        ctime_ns = greatest(ctime_ns, $16), version = version + 1,
                        mode = CASE WHEN $17::integer IS NULL THEN mode
                                    ELSE (mode & ~4095) | $17::integer END,
                        uid = coalesce($18::bigint, uid), gid = coalesce($19::bigint, gid),
                        atime_ns = coalesce($20::bigint, atime_ns)
                    WHERE ino = $1 RETURNING {_ATTR_COLS}),
                s AS (
                    UPDATE upload_sessions SET status = 'completed'
                    WHERE session_id = $5 AND EXISTS (SELECT 1 FROM i)),
                o AS (
                    INSERT INTO chunk_objects (chunk_id, length, block_sha256, ring_key)
                    SELECT * FROM unnest($6::bytea[], $7::bigint[], $14::bytea[], $15::bigint[])
                    WHERE EXISTS (SELECT 1 FROM i)
                    ON CONFLICT DO NOTHING),
                r AS (
                    INSERT INTO chunk_replicas (chunk_id, node_id)
                    SELECT * FROM unnest($8::bytea[], $9::text[]) WHERE EXISTS (SELECT 1 FROM i)
                    ON CONFLICT DO NOTHING),
                d AS (
                    DELETE FROM chunks WHERE ino = $1 AND chunk_index <> ALL ($10::smallint[])
                    AND EXISTS (SELECT 1 FROM i)),
                c AS (
                    INSERT INTO chunks (ino, chunk_index, "offset", length, chunk_id)
                    SELECT $1, * FROM unnest($10::smallint[], $11::bigint[], $12::bigint[], $13::bytea[])
                    WHERE EXISTS (SELECT 1 FROM i)
                    ON CONFLICT (ino, chunk_index) DO UPDATE SET "offset" = excluded."offset",
                        length = excluded.length, chunk_id = excluded.chunk_id)
                SELECT * FROM i""",
            ino,
            size,
            sha256 if size else None,
            mtime_ns,
            session_id,
            list(objects),
            [o[0] for o in objects.values()],
            [c for c, _ in pairs],
            [n for _, n in pairs],
            [c[0] for c in chunks],
            [c[1] for c in chunks],
            [c[2] for c in chunks],
            [c[3] for c in chunks],
            [o[1] for o in objects.values()],
            [o[2] for o in objects.values()],
            mtime_ns if ctime_ns is None else ctime_ns,
            *(changes.get(k) for k in ("mode", "uid", "gid", "atime_ns")),
            durable=True,  # close() and fsync() return once this is on disk
        )
        if row is None:
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)

    # -------------------------------------------------------- accounting

    async def statfs(self) -> tuple[int, int, int]:
        """``(capacity_bytes, free_bytes, inode_count)``: space of the live
        nodes divided by the replica count, and the number of inodes.
        """
        row = await self.db.fetchrow(
            """SELECT coalesce(sum(capacity_bytes), 0)::bigint AS cap,
                      coalesce(sum(free_bytes), 0)::bigint AS free,
                      (SELECT count(*) FROM inodes) AS inodes,
                      (SELECT replicas FROM settings) AS r
               FROM storage_nodes
               WHERE status = 'active'
                 AND last_heartbeat > now() - make_interval(secs => $1)""",
            HEARTBEAT_TIMEOUT_S,
        )
        assert row is not None  # an aggregate without GROUP BY gives one row
        r = max(1, row["r"] or 1)
        return row["cap"] // r, row["free"] // r, row["inodes"]

    async def file_totals(self) -> tuple[int, int]:
        """``(regular files, bytes in them)``."""
        row = await self.db.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(size), 0)::bigint AS b FROM inodes "
            "WHERE mode & 61440 = 32768"
        )
        assert row is not None  # an aggregate without GROUP BY gives one row
        return row["n"], row["b"]

    async def chunk_counts(self) -> dict[str, int]:
        """Number of chunk replicas recorded per node id."""
        rows = await self.db.fetch(
            "SELECT node_id, count(*) AS n FROM chunk_replicas GROUP BY node_id"
        )
        return {r["node_id"]: r["n"] for r in rows}

    # --------------------------------------------------------------- gc

    async def expire_sessions(self) -> int:
        """Delete upload sessions past their expiry or finished; return how many."""
        status = await self.db.execute(
            "DELETE FROM upload_sessions WHERE expires_at < now() "
            "OR status IN ('completed', 'failed')"
        )
        return int(status.split()[-1])

    async def unneeded(self, node_id: str, chunk_ids: Sequence[bytes]) -> set[bytes]:
        """Those of ``chunk_ids``, held by ``node_id``, that no live upload
        session protects and that are either used by no committed chunk map
        or not recorded as a replica on that node (a copy left behind by a
        failed or superseded move).
        """
        rows = await self.db.fetch(
            """SELECT id FROM unnest($1::bytea[]) AS id
               WHERE (NOT EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = id)
                      OR NOT EXISTS (SELECT 1 FROM chunk_replicas r
                                     WHERE r.chunk_id = id AND r.node_id = $2))
                 AND NOT EXISTS (SELECT 1 FROM upload_session_chunks s
                                 JOIN upload_sessions u USING (session_id)
                                 WHERE s.chunk_id = id AND u.status IN ('pending', 'uploading')
                                   AND u.expires_at >= now())""",
            list(chunk_ids),
            node_id,
        )
        return {bytes(r["id"]) for r in rows}

    async def forget_objects(self, chunk_ids: Sequence[bytes]) -> None:
        """Drop the records (object and replicas) of unreferenced chunk objects."""
        await self.db.execute(
            """DELETE FROM chunk_objects o WHERE o.chunk_id = ANY($1::bytea[])
               AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = o.chunk_id)""",
            list(chunk_ids),
        )

    async def used_replicas_on(self, node_id: str) -> int:
        """How many chunk objects that files use are recorded on ``node_id``."""
        return await self.db.fetchval(
            """SELECT count(*) FROM chunk_replicas r WHERE r.node_id = $1
               AND EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = r.chunk_id)""",
            node_id,
        )

    async def add_replica(self, chunk_id: bytes, node_id: str) -> None:
        """Record that ``node_id`` holds a durable copy of ``chunk_id``."""
        await self.db.execute(
            "INSERT INTO chunk_replicas (chunk_id, node_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            chunk_id,
            node_id,
        )

    async def drop_replica(self, chunk_id: bytes, node_id: str) -> None:
        """Forget that ``node_id`` holds ``chunk_id``."""
        await self.db.execute(
            "DELETE FROM chunk_replicas WHERE chunk_id = $1 AND node_id = $2", chunk_id, node_id
        )

    # ------------------------------------------------------ fsck, repair

    async def used_objects(
        self, after: bytes, limit: int
    ) -> list[tuple[bytes, int, int, tuple[str, ...]]]:
        """Chunk objects some file uses, with id above ``after``, in id order:
        ``(chunk_id, length, ring position, recorded holders)``, at most ``limit``.
        """
        rows = await self.db.fetch(
            """SELECT o.chunk_id, o.length, o.ring_key,
                      coalesce(array_agg(r.node_id ORDER BY r.node_id)
                               FILTER (WHERE r.node_id IS NOT NULL), '{}') AS nodes
               FROM chunk_objects o LEFT JOIN chunk_replicas r ON r.chunk_id = o.chunk_id
               WHERE o.chunk_id > $1
                 AND EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = o.chunk_id)
               GROUP BY o.chunk_id ORDER BY o.chunk_id LIMIT $2""",
            after,
            limit,
        )
        return [
            (bytes(r["chunk_id"]), r["length"], ring.to_unsigned(r["ring_key"]), tuple(r["nodes"]))
            for r in rows
        ]

    async def inode_problems(self) -> list[tuple[int, str, bool]]:
        """Metadata invariants that do not hold, as ``(ino, what, serious)``: link
        counts that disagree with the dentries, files whose chunk rows are
        not six extents tiling their size (``layout.extents``), chunks of
        what is not a regular file, large chunks without block digests, and
        inodes no name reaches (not serious: unlinked while open on a mount,
        or left by a mount that crashed).
        """
        rows = await self.db.fetch(
            """WITH names AS (SELECT ino, count(*) AS n FROM dentries GROUP BY ino),
                    subdirs AS (SELECT d.parent AS ino, count(*) AS n FROM dentries d
                                JOIN inodes c ON c.ino = d.ino
                                WHERE c.mode & 61440 = 16384 GROUP BY d.parent)
               SELECT i.ino, 'nlink ' || i.nlink || ', expected ' ||
                      CASE WHEN i.mode & 61440 = 16384 THEN 2 + coalesce(s.n, 0)
                           ELSE coalesce(n.n, 0) END AS what, true AS serious
               FROM inodes i LEFT JOIN names n ON n.ino = i.ino
                             LEFT JOIN subdirs s ON s.ino = i.ino
               WHERE i.nlink <> CASE WHEN i.mode & 61440 = 16384 THEN 2 + coalesce(s.n, 0)
                                     ELSE coalesce(n.n, 0) END
                 AND (coalesce(n.n, 0) > 0 OR i.ino = 1)
               UNION ALL
               SELECT i.ino, 'no name reaches it (nlink ' || i.nlink || ')', false
               FROM inodes i WHERE i.ino <> 1
                 AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.ino = i.ino)
               UNION ALL
               SELECT i.ino, 'chunk map does not tile its ' || i.size || ' bytes in six chunks', true
               FROM inodes i LEFT JOIN chunks c ON c.ino = i.ino
               WHERE i.mode & 61440 = 32768
               GROUP BY i.ino
               HAVING (i.size = 0 AND count(c.ino) > 0)
                   OR (i.size > 0 AND (count(c.ino) <> 6 OR bool_or(
                          c."offset" <> c.chunk_index * (i.size / 6) + least(c.chunk_index, i.size % 6)
                          OR c.length <> i.size / 6 + CASE WHEN c.chunk_index < i.size % 6
                                                           THEN 1 ELSE 0 END)))
               UNION ALL
               SELECT DISTINCT i.ino, 'chunks on what is not a regular file', true
               FROM inodes i JOIN chunks c ON c.ino = i.ino WHERE i.mode & 61440 <> 32768
               UNION ALL
               SELECT DISTINCT c.ino, 'chunk ' || encode(o.chunk_id, 'hex') || ' has no block digests',
                      true
               FROM chunks c JOIN chunk_objects o ON o.chunk_id = c.chunk_id
               WHERE o.length > 1048576 AND o.block_sha256 IS NULL
               ORDER BY 1"""
        )
        return [(r["ino"], r["what"], r["serious"]) for r in rows]


# ------------------------------------------------------------- records

_ATTR_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "size",
    "rdev",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "version",
)
_ATTR_COLS = ", ".join(_ATTR_FIELDS)
_S_IFMT = 0o170000  # the file type bits of a mode
_ATTR_COLS_I = ", ".join(f"i.{c}" for c in _ATTR_FIELDS)


@dataclass(frozen=True)
class Attrs:
    """An inode's attributes as stored (sizes in bytes, times in ns)."""

    ino: Ino
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    version: int

    @classmethod
    def from_row(cls, row: Record) -> Attrs:
        return cls(**{f: row[f] for f in _ATTR_FIELDS})


@dataclass(frozen=True)
class Renamed:
    """What a rename changed. ``moved``: the inode that took the new name,
    when it is not a directory (None for a directory, an exchange or a
    rename onto the same inode, whose changes reach further or nowhere).
    ``replaced``: the inode whose name was taken over, as it is afterwards
    (nlink 0: it lost its last name, the caller purges it when unused).
    """

    moved: Ino | None
    replaced: Attrs | None


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a committed file: its extent, object id and holders."""

    index: int
    offset: int
    length: int
    chunk_id: bytes
    nodes: tuple[str, ...]
    # SHA-256 of each 1 MiB block, concatenated (chunks over one block only).
    blocks: bytes | None = None
    # Ring position (unsigned 64-bit) the replicas were placed from.
    position: int = 0


@dataclass(frozen=True)
class ChunkMap:
    """A file's committed version: ``chunks`` is empty for an empty file."""

    ino: Ino
    version: int
    size: int
    sha256: bytes | None
    chunks: tuple[ChunkRef, ...]


# ------------------------------------------------- transaction helpers


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise errors.NameTooLong(f"name over {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise errors.InvalidArgument("invalid name")


# An upload session for ino $1 that expires in $2 seconds, protecting the
# chunk ids $3 from gc; returns its id.
_BEGIN_UPLOAD = """
    WITH s AS (
        INSERT INTO upload_sessions (ino, status, expires_at)
        VALUES ($1, 'uploading', now() + make_interval(secs => $2))
        RETURNING session_id
    ), c AS (
        INSERT INTO upload_session_chunks (session_id, chunk_id)
        SELECT s.session_id, u FROM s, unnest($3::bytea[]) AS u
    )
    SELECT session_id FROM s"""

# unlink of anything but a directory: $1 parent, $2 name, $3 time (ns).
# found_mode is the named inode's mode (a directory is left alone); the
# inode's new attributes follow when its name was removed. Every part needs
# p first, so the parent is locked before the inode, in the order of every
# other name change (rename, create), which rules out deadlocks with them.
_UNLINK_NON_DIR = f"""
    WITH p AS (
        SELECT ino FROM inodes WHERE ino = $1 FOR UPDATE
    ), d AS (
        SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino
        WHERE d.parent = (SELECT ino FROM p) AND d.name = $2 FOR UPDATE OF i
    ), gone AS (
        DELETE FROM dentries WHERE parent = $1 AND name = $2
        AND (SELECT mode FROM d) & {_S_IFMT} <> {stat.S_IFDIR} RETURNING ino
    ), i AS (
        UPDATE inodes SET nlink = nlink - 1, ctime_ns = $3
        WHERE ino = (SELECT ino FROM gone) RETURNING {_ATTR_COLS}
    ), touched AS (
        UPDATE inodes SET mtime_ns = $3, ctime_ns = $3
        WHERE ino = $1 AND EXISTS (SELECT 1 FROM gone)
    )
    SELECT d.mode AS found_mode, i.* FROM d LEFT JOIN i ON true"""


async def _lock_dir(conn: Connection, ino: Ino) -> tuple[int, int]:
    """Lock a directory inode's row; return its (mode, gid)."""
    row = await conn.fetchrow("SELECT mode, gid, nlink FROM inodes WHERE ino = $1 FOR UPDATE", ino)
    if row is None:
        raise errors.NotFound(f"no directory {ino}")
    if not stat.S_ISDIR(row["mode"]):
        raise errors.NotADirectory(f"inode {ino} is not a directory")
    if row["nlink"] == 0:
        raise errors.NotFound(f"directory {ino} was removed")
    return row["mode"], row["gid"]


async def _insert_dentry(conn: Connection, parent: Ino, name: bytes, ino: int) -> None:
    done = await conn.fetchval(
        "INSERT INTO dentries (parent, name, ino) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING RETURNING true",
        parent,
        name,
        ino,
    )
    if not done:
        raise errors.Exists(name.decode(errors="replace"))


async def _touch_dir(conn: Connection, ino: Ino, t: int, nlink_delta: int = 0) -> None:
    await conn.execute(
        "UPDATE inodes SET mtime_ns = $2, ctime_ns = $2, nlink = nlink + $3 WHERE ino = $1",
        ino,
        t,
        nlink_delta,
    )


async def _dentry(conn: Connection, parent: Ino, name: bytes) -> tuple[int, int] | None:
    row = await conn.fetchrow(
        "SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino "
        "WHERE d.parent = $1 AND d.name = $2 FOR UPDATE OF i",
        parent,
        name,
    )
    return (row["ino"], row["mode"]) if row else None


async def _check_empty(conn: Connection, ino: int) -> None:
    if await conn.fetchval("SELECT true FROM dentries WHERE parent = $1 LIMIT 1", ino):
        raise errors.NotEmpty(f"directory {ino} is not empty")


async def _drop_link(conn: Connection, ino: int, mode: int, t: int) -> Record:
    """One name of ``ino`` is gone: a directory drops to nlink 0, a file by one."""
    return await conn.fetchrow(
        f"""UPDATE inodes SET nlink = CASE WHEN $3 THEN 0 ELSE nlink - 1 END, ctime_ns = $2
            WHERE ino = $1 RETURNING {_ATTR_COLS}""",
        ino,
        t,
        stat.S_ISDIR(mode),
    )


async def _is_ancestor(conn: Connection, ancestor: int, ino: int) -> bool:
    """Whether directory ``ancestor`` is ``ino`` or one of its ancestors."""
    return bool(
        await conn.fetchval(
            """WITH RECURSIVE up(ino) AS (
               SELECT $2::bigint
               UNION SELECT d.parent FROM dentries d JOIN up ON d.ino = up.ino
               WHERE up.ino <> 1)
           SELECT true FROM up WHERE ino = $1 LIMIT 1""",
            ancestor,
            ino,
        )
    )


async def _replace_target(
    conn: Connection, src_mode: int, parent: Ino, name: bytes, dst: tuple[int, int], t: int
) -> Attrs:
    """Remove the dentry a rename replaces; return the replaced inode as it is afterwards."""
    dst_ino, dst_mode = dst
    if stat.S_ISDIR(src_mode) and not stat.S_ISDIR(dst_mode):
        raise errors.NotADirectory(name.decode(errors="replace"))
    if not stat.S_ISDIR(src_mode) and stat.S_ISDIR(dst_mode):
        raise errors.IsADirectory(name.decode(errors="replace"))
    if stat.S_ISDIR(dst_mode):
        await _check_empty(conn, dst_ino)
        # The replaced directory's ".." no longer counts in the parent.
        await _touch_dir(conn, parent, t, nlink_delta=-1)
    await conn.execute("DELETE FROM dentries WHERE parent = $1 AND name = $2", parent, name)
    return Attrs.from_row(await _drop_link(conn, dst_ino, dst_mode, t))


async def _exchange(
    conn: Connection,
    old_parent: Ino,
    old_name: bytes,
    src: tuple[int, int],
    new_parent: Ino,
    new_name: bytes,
    dst: tuple[int, int],
    t: int,
) -> None:
    """RENAME_EXCHANGE: the two names swap inodes."""
    if stat.S_ISDIR(dst[1]) and await _is_ancestor(conn, dst[0], old_parent):
        raise errors.InvalidArgument("cannot move a directory into itself")
    await conn.execute(
        "UPDATE dentries SET ino = $3 WHERE parent = $1 AND name = $2", old_parent, old_name, dst[0]
    )
    await conn.execute(
        "UPDATE dentries SET ino = $3 WHERE parent = $1 AND name = $2", new_parent, new_name, src[0]
    )
    if old_parent != new_parent:
        delta = stat.S_ISDIR(src[1]) - stat.S_ISDIR(dst[1])
        await _touch_dir(conn, old_parent, t, nlink_delta=-delta)
        await _touch_dir(conn, new_parent, t, nlink_delta=delta)
    else:
        await _touch_dir(conn, old_parent, t)
    await conn.execute(
        "UPDATE inodes SET ctime_ns = $3 WHERE ino = $1 OR ino = $2", src[0], dst[0], t
    )
