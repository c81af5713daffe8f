"""The queries of gc, fsck, repair and rebalance: replica records,
unreferenced chunk objects, expired upload sessions and invariant checks.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import layout, ring
from ..pg import Database
from .records import S_IFDIR, S_IFMT, S_IFREG, FileTotals, InodeProblem, UsedObject

# Seconds past its expiry that an upload session still protects its chunks
# (and is kept): a commit that checked its session just before the expiry
# may become visible after it (its statement began earlier: now() is the
# transaction's start; and it waits for the disk or a standby).
SESSION_GRACE_S = 600
# Seconds a connection's commit mark is kept after its last transaction: a
# mark is read only just after a lost COMMIT, and a live connection that
# lost its row writes it again with its next transaction.
COMMIT_MARK_KEEP_S = 86_400


class Maintenance:
    """The queries of gc, fsck, repair and rebalance: replica records,
    unreferenced objects, expired sessions and invariant checks."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def file_totals(self) -> FileTotals:
        """How many regular files there are and the bytes in them."""
        row = await self.db.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(size), 0)::bigint AS b FROM inodes "
            f"WHERE mode & {S_IFMT} = {S_IFREG}"
        )
        assert row is not None  # an aggregate without GROUP BY gives one row
        return FileTotals(row["n"], row["b"])

    async def chunk_counts(self) -> dict[str, int]:
        """Number of chunk replicas recorded per node id."""
        rows = await self.db.fetch(
            "SELECT node_id, count(*) AS n FROM chunk_replicas GROUP BY node_id"
        )
        return {r["node_id"]: r["n"] for r in rows}

    async def expire_sessions(self) -> int:
        """Delete upload sessions finished, or past their expiry by
        ``SESSION_GRACE_S``; return how many.
        """
        status = await self.db.execute(
            "DELETE FROM upload_sessions "
            "WHERE expires_at + make_interval(secs => $1) < now() "
            "OR status IN ('completed', 'failed')",
            float(SESSION_GRACE_S),
        )
        return int(status.split()[-1])

    async def forget_commit_marks(self) -> int:
        """Delete the commit marks (``pg.Database.transaction``) of
        connections idle for ``COMMIT_MARK_KEEP_S``; return how many.
        """
        status = await self.db.execute(
            "DELETE FROM commit_marks WHERE at < now() - make_interval(secs => $1)",
            float(COMMIT_MARK_KEEP_S),
        )
        return int(status.split()[-1])

    async def take_unneeded(self, node_id: str, chunk_ids: Sequence[bytes]) -> set[bytes]:
        """Those of ``chunk_ids``, held by ``node_id``, that no upload
        session protects (one neither finished nor past its expiry by
        ``SESSION_GRACE_S``) and that are either used by no committed chunk map
        or not recorded as a replica on that node (a copy left behind by a
        failed or superseded move); their replica records on that node are
        dropped in the same statement, before any file is deleted. A record
        dropped later could be one a commit made meanwhile, after pushing the
        chunk again (a new file where gc had just deleted the old).
        """
        rows = await self.db.fetch(
            """WITH dead AS (
                 SELECT id FROM unnest($1::bytea[]) AS id
                 WHERE (NOT EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = id)
                        OR NOT EXISTS (SELECT 1 FROM chunk_replicas r
                                       WHERE r.chunk_id = id AND r.node_id = $2))
                   AND NOT EXISTS (SELECT 1 FROM upload_session_chunks s
                                   JOIN upload_sessions u USING (session_id)
                                   WHERE s.chunk_id = id AND u.status IN ('pending', 'uploading')
                                     AND u.expires_at + make_interval(secs => $3) >= now())),
               d AS (DELETE FROM chunk_replicas r USING dead
                     WHERE r.node_id = $2 AND r.chunk_id = dead.id)
               SELECT id FROM dead""",
            list(chunk_ids),
            node_id,
            float(SESSION_GRACE_S),
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
        await self.drop_replicas(node_id, [chunk_id])

    async def drop_replicas(self, node_id: str, chunk_ids: Sequence[bytes]) -> None:
        """Forget that ``node_id`` holds any of ``chunk_ids``."""
        await self.db.execute(
            "DELETE FROM chunk_replicas WHERE node_id = $1 AND chunk_id = ANY($2::bytea[])",
            node_id,
            list(chunk_ids),
        )

    async def used_object_count(self) -> int:
        """How many chunk objects some file uses."""
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM chunk_objects o "
                "WHERE EXISTS (SELECT 1 FROM chunks c WHERE c.chunk_id = o.chunk_id)"
            )
        )

    async def used_objects(self, after: bytes, limit: int) -> list[UsedObject]:
        """Chunk objects some file uses, with id above ``after``, in id order,
        at most ``limit``.
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
            UsedObject(
                bytes(r["chunk_id"]),
                r["length"],
                ring.to_unsigned(r["ring_key"]),
                tuple(r["nodes"]),
            )
            for r in rows
        ]

    async def inode_problems(self) -> list[InodeProblem]:
        """Metadata invariants that do not hold: link
        counts that disagree with the dentries, files whose chunk rows are
        not six extents tiling their size (``layout.extents``), chunks of
        what is not a regular file, large chunks without block digests, and
        inodes no name reaches (not serious: unlinked while open on a mount,
        or left by a mount that crashed).
        """
        rows = await self.db.fetch(
            f"""WITH names AS (SELECT ino, count(*) AS n FROM dentries GROUP BY ino),
                    subdirs AS (SELECT d.parent AS ino, count(*) AS n FROM dentries d
                                JOIN inodes c ON c.ino = d.ino
                                WHERE c.mode & {S_IFMT} = {S_IFDIR} GROUP BY d.parent)
               SELECT i.ino, 'nlink ' || i.nlink || ', expected ' ||
                      CASE WHEN i.mode & {S_IFMT} = {S_IFDIR} THEN 2 + coalesce(s.n, 0)
                           ELSE coalesce(n.n, 0) END AS what, true AS serious
               FROM inodes i LEFT JOIN names n ON n.ino = i.ino
                             LEFT JOIN subdirs s ON s.ino = i.ino
               WHERE i.nlink <> CASE WHEN i.mode & {S_IFMT} = {S_IFDIR} THEN 2 + coalesce(s.n, 0)
                                     ELSE coalesce(n.n, 0) END
                 AND (coalesce(n.n, 0) > 0 OR i.ino = 1)
               UNION ALL
               SELECT i.ino, 'no name reaches it (nlink ' || i.nlink || ')', false
               FROM inodes i WHERE i.ino <> 1
                 AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.ino = i.ino)
               UNION ALL
               SELECT ino, 'chunk map does not tile its ' || size || ' bytes in six chunks', true
               FROM ({_TILING}) t
               GROUP BY ino, size
               HAVING (size = 0 AND count(chunk_index) > 0)
                   OR (size > 0 AND (count(chunk_index) <> 6
                                     OR NOT (bool_and(sixths) OR bool_and(power_of_two))))
               UNION ALL
               SELECT DISTINCT i.ino, 'chunks on what is not a regular file', true
               FROM inodes i JOIN chunks c ON c.ino = i.ino WHERE i.mode & {S_IFMT} <> {S_IFREG}
               UNION ALL
               SELECT DISTINCT c.ino, 'chunk ' || encode(o.chunk_id, 'hex') || ' has no block digests',
                      true
               FROM chunks c JOIN chunk_objects o ON o.chunk_id = c.chunk_id
               WHERE o.length > {layout.BLOCK_SIZE} AND o.block_sha256 IS NULL
               ORDER BY 1"""
        )
        return [InodeProblem(r["ino"], r["what"], r["serious"]) for r in rows]


# Per chunk row of every regular file (LEFT JOIN: a file without chunks gives
# one row of NULLs): whether it sits where each layout of chunkfs.layout puts
# it, the near-equal sixths of older versions or the power-of-two units of
# this one (unit: the larger of MIN_UNIT and ceil(size / 6) rounded up to a
# power of two, from the bit length of ceil(size / 6) - 1).
_TILING = f"""
    SELECT i.ino, i.size, c.chunk_index,
           c."offset" = c.chunk_index * (i.size / 6) + least(c.chunk_index, i.size % 6)
               AND c.length = i.size / 6 + CASE WHEN c.chunk_index < i.size % 6
                                                THEN 1 ELSE 0 END AS sixths,
           c."offset" = least(c.chunk_index * u.u, i.size)
               AND c.length = least((c.chunk_index + 1) * u.u, i.size)
                              - least(c.chunk_index * u.u, i.size) AS power_of_two
    FROM inodes i
    CROSS JOIN LATERAL (
        SELECT greatest({layout.MIN_UNIT}::bigint, 1::bigint << length(ltrim(
                   (greatest((i.size + 5) / 6 - 1, 0))::bit(64)::text, '0'))) AS u
    ) u
    LEFT JOIN chunks c ON c.ino = i.ino
    WHERE i.mode & {S_IFMT} = {S_IFREG}"""
