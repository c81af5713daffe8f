"""File content: chunk maps, upload sessions and the commit of a new version.

The commit protocol (README, "How it works": never a torn file, no leaks): a writer opens an
upload session naming the chunks it is about to push, pushes them, and only
then switches the file's chunk map in one statement that also completes the
session. gc never deletes a chunk that a live session or a committed map
references.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .. import errors, ring
from ..layout import HOLE
from ..pg import Database, Record
from .records import ATTR_COLUMNS, Attrs, ChunkMap, ChunkRef, Ino, UploadSession


class Content:
    """File content: chunk maps, upload sessions and the commit of a new version."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def chunk_map(self, ino: Ino) -> ChunkMap:
        """The committed version of a file: size, digest and its chunks with
        the nodes holding each. Raises ``NotFound``.
        """
        found = await self.chunk_maps([ino])
        if not found:
            raise errors.NotFound(f"no inode {ino}")
        return found[0]

    async def chunk_maps(self, inos: Sequence[Ino]) -> list[ChunkMap]:
        """``chunk_map`` of each of ``inos`` that exists, in one statement
        (so every row comes from one snapshot), in no set order.
        """
        rows = await self.db.fetch(
            """SELECT i.ino, i.version, i.size, i.sha256,
                      c.chunk_index, c."offset", c.length, c.chunk_id, o.block_sha256, o.ring_key,
                      coalesce(array_agg(r.node_id ORDER BY r.node_id)
                               FILTER (WHERE r.node_id IS NOT NULL), '{}') AS nodes
               FROM inodes i
               LEFT JOIN chunks c ON c.ino = i.ino
               LEFT JOIN chunk_objects o ON o.chunk_id = c.chunk_id
               LEFT JOIN chunk_replicas r ON r.chunk_id = c.chunk_id
               WHERE i.ino = ANY($1::bigint[]) GROUP BY i.ino, c.ino, c.chunk_index, o.chunk_id
               ORDER BY i.ino, c.chunk_index""",
            list(inos),
            read=True,
        )
        per_ino: dict[int, list[Record]] = {}
        for r in rows:
            per_ino.setdefault(r["ino"], []).append(r)
        return [
            ChunkMap(
                ino=Ino(ino),
                version=group[0]["version"],
                size=group[0]["size"],
                sha256=group[0]["sha256"],
                chunks=tuple(
                    ChunkRef(
                        r["chunk_index"],
                        r["offset"],
                        r["length"],
                        HOLE if r["chunk_id"] is None else bytes(r["chunk_id"]),
                        tuple(r["nodes"]),
                        r["block_sha256"],
                        0 if r["ring_key"] is None else ring.to_unsigned(r["ring_key"]),
                    )
                    for r in group
                    if r["chunk_index"] is not None
                ),
            )
            for ino, group in per_ino.items()
        ]

    async def begin_upload(self, ino: Ino, chunk_ids: Sequence[bytes], ttl_s: int) -> int:
        """Open an upload session protecting ``chunk_ids`` from gc for
        ``ttl_s`` seconds; return its id. One statement, so one round trip.
        """
        return await self.db.fetchval(_BEGIN_UPLOAD, ino, float(ttl_s), sorted(set(chunk_ids)))

    async def begin_commit(
        self, ino: Ino, chunk_ids: Sequence[bytes], ttl_s: int, replicas: int
    ) -> UploadSession:
        """``begin_upload`` and, in the same statement, the chunks among
        ``chunk_ids`` that a committed file uses with at least ``replicas``
        recorded holders: those need no upload.

        For each such chunk one committed chunk row that uses it is locked
        (FOR SHARE) until the session has committed with the statement, so
        that row can be neither deleted nor changed before then: gc, which
        deletes only what no committed row and no live session names, either
        sees that row or sees the session. A row deleted before the lock is
        not counted, and its chunk is uploaded again (gc's delete guard
        spares a chunk put after its check).
        """
        ids = sorted(set(chunk_ids))
        rows = await self.db.fetch(_BEGIN_COMMIT, ino, float(ttl_s), ids, replicas)
        return UploadSession(
            rows[0]["session_id"],
            {bytes(r["chunk_id"]): tuple(r["nodes"]) for r in rows if r["chunk_id"] is not None},
        )

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
        chunks: Sequence[ChunkRef],
        placed: Mapping[bytes, Sequence[str]],
        mtime_ns: int,
        max_file_size: int,
        ctime_ns: int | None = None,
        changes: Mapping[str, int] | None = None,
    ) -> Attrs:
        """Switch a file to a new version in one transaction: its ``chunks``
        (their ``nodes`` are not read; holes get no chunk object), the replicas just written (``placed``:
        ``{chunk_id: node ids}``), size, digest, times (ns; ctime, by
        default mtime, only moves forward) and the ``changes`` made meanwhile
        (``mode`` permission bits, ``uid``, ``gid``, ``atime_ns``); the version
        is bumped and the upload session completed.

        The session (None: the chunks need no protection) must still be live
        and name every chunk object of the version, else nothing changes:
        reclamation spares only chunks a live session or a committed file
        names, so a session that expired or that a failover lost (sessions
        commit asynchronously) may have let it take them. Raises
        ``NotFound``, ``UploadLost`` and ``FileTooLarge``.
        """
        if size > max_file_size:
            raise errors.FileTooLarge(f"{size} bytes is over the maximum of {max_file_size}")
        changes = changes or {}
        objects = {c.chunk_id: c for c in chunks if not c.hole}
        pairs = [(c, n) for c, nodes in placed.items() for n in nodes]
        # One statement (one round trip, atomic): the session row is locked
        # (so expiry cannot remove it meanwhile), then the inode row, against
        # a concurrent commit of the same file; foreign keys are checked at
        # the end of the statement.
        row = await self.db.fetchrow(
            f"""WITH s AS (
                    UPDATE upload_sessions SET status = 'completed'
                    WHERE session_id = $5 AND ino = $1 AND status = 'uploading'
                      AND expires_at >= now()
                      AND NOT EXISTS (
                        SELECT 1 FROM unnest($6::bytea[]) AS u(id) WHERE NOT EXISTS (
                            SELECT 1 FROM upload_session_chunks k
                            WHERE k.session_id = $5 AND k.chunk_id = u.id))
                    RETURNING session_id),
                i AS (
                    UPDATE inodes SET size = $2, sha256 = $3, mtime_ns = $4,
                        ctime_ns = greatest(ctime_ns, $16), version = version + 1,
                        mode = CASE WHEN $17::integer IS NULL THEN mode
                                    ELSE (mode & ~4095) | $17::integer END,
                        uid = coalesce($18::bigint, uid), gid = coalesce($19::bigint, gid),
                        atime_ns = coalesce($20::bigint, atime_ns)
                    WHERE ino = $1 AND ($5::bigint IS NULL OR EXISTS (SELECT 1 FROM s))
                    RETURNING {ATTR_COLUMNS}),
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
            [o.length for o in objects.values()],
            [c for c, _ in pairs],
            [n for _, n in pairs],
            [c.index for c in chunks],
            [c.offset for c in chunks],
            [c.length for c in chunks],
            [None if c.hole else c.chunk_id for c in chunks],
            [o.blocks for o in objects.values()],
            [ring.to_signed(o.position) for o in objects.values()],
            mtime_ns if ctime_ns is None else ctime_ns,
            *(changes.get(k) for k in ("mode", "uid", "gid", "atime_ns")),
            durable=True,  # close() and fsync() return once this is on disk
        )
        if row is None:
            if await self.db.fetchval("SELECT true FROM inodes WHERE ino = $1", ino, read=True):
                raise errors.UploadLost(f"upload session {session_id} of inode {ino} is not live")
            raise errors.NotFound(f"no inode {ino}")
        return Attrs.from_row(row)


# An upload session for ino $1 that expires in $2 seconds, protecting the
# chunk ids $3 from gc (as common table expressions: s holds its id).
_SESSION = """
    s AS (
        INSERT INTO upload_sessions (ino, status, expires_at)
        VALUES ($1, 'uploading', now() + make_interval(secs => $2))
        RETURNING session_id
    ), c AS (
        INSERT INTO upload_session_chunks (session_id, chunk_id)
        SELECT s.session_id, u FROM s, unnest($3::bytea[]) AS u
    )"""

# The session's id.
_BEGIN_UPLOAD = f"WITH {_SESSION} SELECT session_id FROM s"

# The session, and the chunks among $3 that a committed row uses (one such
# row locked per chunk) with at least $4 recorded holders: (session_id,
# chunk_id, nodes) rows, or one (session_id, NULL, NULL) when none is.
_BEGIN_COMMIT = f"""
    WITH {_SESSION}, used AS (
        SELECT u.id FROM unnest($3::bytea[]) AS u(id)
        CROSS JOIN LATERAL (
            SELECT 1 FROM chunks k WHERE k.chunk_id = u.id LIMIT 1 FOR SHARE) AS k
    ), reusable AS (
        SELECT r.chunk_id, array_agg(r.node_id ORDER BY r.node_id) AS nodes
        FROM chunk_replicas r WHERE r.chunk_id IN (SELECT id FROM used)
        GROUP BY r.chunk_id HAVING count(*) >= $4
    )
    SELECT s.session_id, reusable.chunk_id, reusable.nodes
    FROM s LEFT JOIN reusable ON true"""
