"""The namespace: inodes, dentries, symlinks and extended attributes.

One transaction (most often one statement) per operation, with the errno
rules of the matching system call; a method that raises has changed nothing.
Every method raises ``MetadataUnavailable`` (EIO) when PostgreSQL does not
answer, and the ``ChunkfsError`` its docstring names for bad input.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping, Sequence

import trio

from .. import errors
from ..pg import Connection, Database, Record, UniqueViolationError
from .records import (
    ATTR_COLUMNS,
    ATTR_COLUMNS_I,
    LINK_MAX,
    NAME_MAX,
    ROOT_INO,
    S_IFDIR,
    S_IFMT,
    SYMLINK_MAX,
    XATTR_VALUE_MAX,
    Attrs,
    DirEntry,
    Ino,
    Renamed,
    now_ns,
)

# Inode numbers a process reserves at a time (schema.sql's inode_seq steps
# by as many): see Namespace.new_ino.
INODE_BLOCK = 1024


class Namespace:
    """Names and inodes: lookup, create, link, unlink, rename, attributes,
    symlinks, directory listings and extended attributes."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._free_inos = range(0)
        self._reserving = trio.Lock()

    async def new_ino(self) -> Ino:
        """An inode number no one has had or will have.

        Numbers come from a block of ``INODE_BLOCK`` this process reserved,
        durably, before using any: creates commit asynchronously, so a
        failover may lose one a mount still holds open, and a number handed
        out again would make two files of one in that mount's tables.
        Raises ``MetadataUnavailable``.
        """
        async with self._reserving:
            if not self._free_inos:
                first = await self.db.fetchval("SELECT nextval('inode_seq')")
                await self.db.sync()
                self._free_inos = range(first, first + INODE_BLOCK)
            ino, self._free_inos = self._free_inos[0], self._free_inos[1:]
        return Ino(ino)

    async def getattr(self, ino: Ino) -> Attrs:
        """The inode's attributes. Raises ``NotFound``."""
        row = await self.db.fetchrow(
            f"SELECT {ATTR_COLUMNS} FROM inodes WHERE ino = $1", ino, read=True
        )
        if row is None:
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)

    async def lookup(self, parent: Ino, name: bytes) -> Attrs:
        """The attributes of ``name`` in directory ``parent``.

        Raises ``NameTooLong`` past 255 bytes and ``NotFound``.
        """
        check_name(name)
        row = await self.db.fetchrow(
            f"SELECT {ATTR_COLUMNS_I} FROM dentries d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = $1 AND d.name = $2",
            parent,
            name,
            read=True,
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
        check_name(name)
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
                        WHERE ino = $1 AND nlink > 0 AND mode & {S_IFMT} = {S_IFDIR}
                        FOR UPDATE
                    ), i AS (
                        INSERT INTO inodes (ino, mode, uid, gid, nlink, size, rdev,
                                            atime_ns, mtime_ns, ctime_ns)
                        SELECT $11::bigint,
                               CASE WHEN p.mode & {stat.S_ISGID} <> 0 AND $10::boolean
                                    THEN $3::integer | {stat.S_ISGID} ELSE $3::integer END,
                               $4::bigint,
                               CASE WHEN p.mode & {stat.S_ISGID} <> 0 THEN p.gid ELSE $5::bigint END,
                               CASE WHEN $10::boolean THEN 2 ELSE 1 END,
                               $6::bigint, $7::bigint, $8::bigint, $8::bigint, $8::bigint
                        FROM p
                        RETURNING {ATTR_COLUMNS}
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
                await self.new_ino(),
            )
        except UniqueViolationError:
            raise errors.Exists(name.decode(errors="replace")) from None
        if row is None:
            await self._check_dir(parent)
            raise errors.NotFound(f"directory {parent} was removed")
        return Attrs.from_row(row)

    async def _check_dir(self, ino: Ino) -> None:
        """Raise ``NotFound`` or ``NotADirectory`` unless ``ino`` is a directory."""
        row = await self.db.fetchrow("SELECT mode FROM inodes WHERE ino = $1", ino, read=True)
        if row is None:
            raise errors.NotFound(f"no directory {ino}")
        if not stat.S_ISDIR(row["mode"]):
            raise errors.NotADirectory(f"inode {ino} is not a directory")

    async def link(self, ino: Ino, parent: Ino, name: bytes) -> Attrs:
        """Add a hard link ``name`` in ``parent`` to ``ino``.

        Raises ``NameTooLong``, ``Exists``, ``NotFound``, ``NotPermitted``
        for a directory and ``TooManyLinks`` past ``LINK_MAX`` links.
        """
        check_name(name)
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
                f"RETURNING {ATTR_COLUMNS}",
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
        check_name(name)
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
        check_name(old_name)
        check_name(new_name)
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
            f"UPDATE inodes SET {', '.join(sets)} WHERE ino = $1 RETURNING {ATTR_COLUMNS}", *args
        )
        if row is None:
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)

    async def readlink(self, ino: Ino) -> bytes:
        """A symlink's target. Raises ``InvalidArgument`` for a non-symlink."""
        target = await self.db.fetchval(
            "SELECT target FROM symlinks WHERE ino = $1", ino, read=True
        )
        if target is None:
            raise errors.InvalidArgument(f"inode {ino} is not a symlink")
        return target

    async def readdir(self, parent: Ino, after: int, limit: int) -> list[DirEntry]:
        """Up to ``limit`` entries of ``parent`` whose cookie is above ``after``,
        in cookie order, with their extended attributes (the kernel asks a
        file for ``security.capability`` before each write to it): one
        statement.
        """
        rows = await self.db.fetch(
            f"""SELECT d.name, d.cookie, {ATTR_COLUMNS_I}, x.names, x.values
                FROM dentries d JOIN inodes i ON i.ino = d.ino
                LEFT JOIN LATERAL (
                    SELECT array_agg(name) AS names, array_agg(value) AS values
                    FROM xattrs WHERE ino = d.ino) x ON true
                WHERE d.parent = $1 AND d.cookie > $2 ORDER BY d.cookie LIMIT $3""",
            parent,
            after,
            limit,
            read=True,
        )
        return [_dir_entry(r, r["cookie"]) for r in rows]

    async def walk(self, start: Ino, names: Sequence[bytes]) -> list[DirEntry]:
        """The entries ``names`` lead to from ``start`` (``names[k]`` looked
        up in the entry before it), with their extended attributes, as many
        as exist: the walk stops at a missing name or a non-directory (which
        has no names). One statement; the cookies are 0.
        """
        rows = await self.db.fetch(
            f"""WITH RECURSIVE walk(depth, ino) AS (
                    SELECT 0, $1::bigint
                    UNION ALL
                    SELECT w.depth + 1, d.ino FROM walk w JOIN dentries d
                        ON d.parent = w.ino AND d.name = ($2::bytea[])[w.depth + 1]
                    WHERE w.depth < cardinality($2::bytea[]))
                SELECT ($2::bytea[])[w.depth] AS name, {ATTR_COLUMNS_I}, x.names, x.values
                FROM walk w JOIN inodes i ON i.ino = w.ino
                LEFT JOIN LATERAL (
                    SELECT array_agg(name) AS names, array_agg(value) AS values
                    FROM xattrs WHERE ino = w.ino) x ON true
                WHERE w.depth > 0 ORDER BY w.depth""",
            start,
            list(names),
            read=True,
        )
        return [_dir_entry(r, 0) for r in rows]

    async def parent_of(self, ino: Ino) -> Ino:
        """The parent directory of directory ``ino`` (the root is its own)."""
        if ino == ROOT_INO:
            return ROOT_INO
        parent = await self.db.fetchval(
            "SELECT parent FROM dentries WHERE ino = $1 LIMIT 1", ino, read=True
        )
        if parent is None:
            raise errors.NotFound(f"no directory {ino}")
        return Ino(parent)

    async def xattrs(self, ino: Ino) -> dict[bytes, bytes]:
        """All extended attributes of ``ino``, name -> value."""
        rows = await self.db.fetch("SELECT name, value FROM xattrs WHERE ino = $1", ino, read=True)
        return {r["name"]: r["value"] for r in rows}

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
        if len(value) > XATTR_VALUE_MAX:
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

    async def set_xattrs(self, ino: Ino, values: Mapping[bytes, bytes]) -> None:
        """Set several extended attributes in one statement (replacing any
        of the same names); the inode's ctime moves. Raises ``NotFound``,
        and as ``setxattr`` for a bad name or value.
        """
        for name, value in values.items():
            if not name or len(name) > NAME_MAX or len(value) > XATTR_VALUE_MAX:
                raise errors.InvalidArgument("an xattr name of 1 to 255 bytes, a value to 64 KiB")
        done = await self.db.fetchval(
            """WITH i AS (UPDATE inodes SET ctime_ns = $4 WHERE ino = $1 RETURNING ino),
                    x AS (INSERT INTO xattrs (ino, name, value)
                          SELECT i.ino, n, v FROM i, unnest($2::bytea[], $3::bytea[]) AS u(n, v)
                          ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value)
               SELECT EXISTS (SELECT 1 FROM i)""",
            ino,
            list(values),
            list(values.values()),
            now_ns(),
        )
        if not done:
            raise errors.NotFound(f"no inode {ino}")

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


def _dir_entry(row: Record, cookie: int) -> DirEntry:
    return DirEntry(
        row["name"],
        Attrs.from_row(row),
        cookie,
        dict(zip(row["names"], row["values"], strict=True)) if row["names"] else {},
    )


def check_name(name: bytes) -> None:
    """Raise ``NameTooLong`` past 255 bytes and ``InvalidArgument`` for a
    name no directory can hold (empty, ``.``, ``..``, with ``/`` or NUL).
    """
    if len(name) > NAME_MAX:
        raise errors.NameTooLong(f"name over {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise errors.InvalidArgument("invalid name")


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
        AND (SELECT mode FROM d) & {S_IFMT} <> {S_IFDIR} RETURNING ino
    ), i AS (
        UPDATE inodes SET nlink = nlink - 1, ctime_ns = $3
        WHERE ino = (SELECT ino FROM gone) RETURNING {ATTR_COLUMNS}
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
            WHERE ino = $1 RETURNING {ATTR_COLUMNS}""",
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
