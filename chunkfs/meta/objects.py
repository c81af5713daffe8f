"""The S3 gateway's records: access keys, ETags and multipart uploads.

A multipart upload holds an upload session (``upload_sessions``) from its
start until it completes, is aborted or expires; its parts' chunk objects
are protected by that session, so gc collects them once it is gone.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from .. import errors, ring
from ..pg import Database
from .records import AccessKey, ChunkRef, ETag, Ino, MultipartUpload, Part

_KEY_ID_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"


class Objects:
    """Access keys, ETags and multipart uploads of the S3 gateway."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------ keys

    async def add_key(self, uid: int, gid: int, name: str = "") -> AccessKey:
        """Make an access key acting as ``uid``/``gid``, with a random id
        (20 characters) and secret (40). Raises ``InvalidArgument`` for
        negative ids.
        """
        if uid < 0 or gid < 0:
            raise errors.InvalidArgument("uid and gid must be 0 or more")
        key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(20))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
        row = await self.db.fetchrow(
            f"INSERT INTO access_keys (access_key_id, secret, uid, gid, name) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_KEY_COLUMNS}",
            key_id,
            secret,
            uid,
            gid,
            name,
        )
        assert row is not None  # an INSERT ... RETURNING without a condition
        return _key(row)

    async def keys(self) -> list[AccessKey]:
        """Every access key, oldest first."""
        rows = await self.db.fetch(
            f"SELECT {_KEY_COLUMNS} FROM access_keys ORDER BY created_at, access_key_id"
        )
        return [_key(r) for r in rows]

    async def key(self, access_key_id: str) -> AccessKey | None:
        """The access key with this id, or None."""
        row = await self.db.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM access_keys WHERE access_key_id = $1", access_key_id
        )
        return None if row is None else _key(row)

    async def remove_key(self, access_key_id: str) -> None:
        """Remove an access key. Raises ``NotFound``."""
        done = await self.db.fetchval(
            "DELETE FROM access_keys WHERE access_key_id = $1 RETURNING true", access_key_id
        )
        if not done:
            raise errors.NotFound(f"no access key {access_key_id}")

    # ----------------------------------------------------------- etags

    async def etags(self, inos: Sequence[Ino]) -> dict[Ino, ETag]:
        """The ETags recorded for these files (stale ones included: compare
        their version with the file's).
        """
        rows = await self.db.fetch(
            "SELECT ino, version, etag FROM etags WHERE ino = ANY($1::bigint[])", list(inos)
        )
        return {Ino(r["ino"]): ETag(r["version"], r["etag"]) for r in rows}

    async def set_etag(self, ino: Ino, tag: ETag) -> None:
        """Record ``tag`` for ``ino`` unless one of a later version is
        recorded already; nothing when the file is gone.
        """
        await self.db.execute(
            """INSERT INTO etags (ino, version, etag)
               SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM inodes WHERE ino = $1)
               ON CONFLICT (ino) DO UPDATE SET version = excluded.version, etag = excluded.etag
               WHERE etags.version <= excluded.version""",
            ino,
            tag.version,
            tag.etag,
        )

    # ------------------------------------------------------- multipart

    async def create_multipart(
        self,
        bucket_ino: Ino,
        bucket: str,
        key: str,
        *,
        uid: int,
        gid: int,
        headers: Mapping[str, str],
        ttl_s: float,
    ) -> MultipartUpload:
        """Start a multipart upload of ``bucket``/``key`` with an upload
        session that expires ``ttl_s`` seconds after its last part.
        """
        row = await self.db.fetchrow(
            f"""WITH s AS (
                    INSERT INTO upload_sessions (ino, status, expires_at)
                    VALUES ($1, 'uploading', now() + make_interval(secs => $2))
                    RETURNING session_id)
                INSERT INTO multipart_uploads AS m (upload_id, session_id, bucket, key, uid, gid, headers)
                SELECT $3, session_id, $4, $5, $6, $7, $8::jsonb FROM s
                RETURNING {_UPLOAD_COLUMNS}""",
            bucket_ino,
            float(ttl_s),
            secrets.token_hex(16),
            bucket,
            key,
            uid,
            gid,
            json.dumps(dict(headers)),
        )
        assert row is not None  # an INSERT ... RETURNING without a condition
        return _upload(row)

    async def multipart(self, upload_id: str) -> MultipartUpload:
        """The upload in progress with this id. Raises ``NotFound`` (also
        when its session expired).
        """
        row = await self.db.fetchrow(
            f"""SELECT {_UPLOAD_COLUMNS} FROM multipart_uploads m
                JOIN upload_sessions s USING (session_id)
                WHERE m.upload_id = $1 AND s.expires_at >= now()""",
            upload_id,
        )
        if row is None:
            raise errors.NotFound(f"no upload {upload_id}")
        return _upload(row)

    async def multiparts(self, bucket: str) -> list[MultipartUpload]:
        """The uploads in progress into ``bucket``, by key then start time."""
        rows = await self.db.fetch(
            f"""SELECT {_UPLOAD_COLUMNS} FROM multipart_uploads m
                JOIN upload_sessions s USING (session_id)
                WHERE m.bucket = $1 AND s.expires_at >= now()
                ORDER BY m.key, m.created_at, m.upload_id""",
            bucket,
        )
        return [_upload(r) for r in rows]

    async def protect(
        self, upload: MultipartUpload, chunk_ids: Sequence[bytes], ttl_s: float
    ) -> None:
        """Protect ``chunk_ids`` (about to be pushed) from gc under the
        upload's session, whose expiry moves to ``ttl_s`` seconds from now.
        Raises ``NotFound`` when the upload is gone.
        """
        done = await self.db.fetchval(
            """WITH s AS (
                   UPDATE upload_sessions SET expires_at = now() + make_interval(secs => $3)
                   WHERE session_id = $1 AND status = 'uploading' AND expires_at >= now()
                   RETURNING session_id),
               c AS (
                   INSERT INTO upload_session_chunks (session_id, chunk_id)
                   SELECT s.session_id, u FROM s, unnest($2::bytea[]) AS u
                   ON CONFLICT DO NOTHING)
               SELECT EXISTS (SELECT 1 FROM s)""",
            upload.session_id,
            sorted(set(chunk_ids)),
            float(ttl_s),
        )
        if not done:
            raise errors.NotFound(f"no upload {upload.upload_id}")

    async def put_part(self, upload: MultipartUpload, part: Part) -> None:
        """Record ``part`` (replacing one of the same number). Raises
        ``NotFound`` when the upload is gone.
        """
        done = await self.db.fetchval(
            """INSERT INTO multipart_parts (upload_id, part_number, size, md5, piece_ids,
                                            piece_lengths, piece_blocks, piece_nodes)
               SELECT $1, $2, $3, $4, $5, $6, $7, $8::jsonb
               WHERE EXISTS (SELECT 1 FROM multipart_uploads WHERE upload_id = $1)
               ON CONFLICT (upload_id, part_number) DO UPDATE SET size = excluded.size,
                   md5 = excluded.md5, piece_ids = excluded.piece_ids,
                   piece_lengths = excluded.piece_lengths, piece_blocks = excluded.piece_blocks,
                   piece_nodes = excluded.piece_nodes, modified_at = now()
               RETURNING true""",
            upload.upload_id,
            part.number,
            part.size,
            part.md5,
            [p.chunk_id for p in part.pieces],
            [p.length for p in part.pieces],
            [p.blocks or b"" for p in part.pieces],
            json.dumps([list(p.nodes) for p in part.pieces]),
        )
        if not done:
            raise errors.NotFound(f"no upload {upload.upload_id}")

    async def parts(self, upload: MultipartUpload) -> list[Part]:
        """The upload's parts, by number."""
        rows = await self.db.fetch(
            """SELECT part_number, size, md5, extract(epoch FROM modified_at) AS modified_s,
                      piece_ids, piece_lengths, piece_blocks, piece_nodes
               FROM multipart_parts WHERE upload_id = $1 ORDER BY part_number""",
            upload.upload_id,
        )
        return [_part(r) for r in rows]

    async def end_multipart(self, upload: MultipartUpload) -> bool:
        """Forget the upload (completed or aborted): its session completes,
        and gc collects the pieces no file uses. Returns False when it was
        gone already.
        """
        return bool(
            await self.db.fetchval(
                """WITH m AS (DELETE FROM multipart_uploads WHERE upload_id = $1
                              RETURNING session_id)
                   UPDATE upload_sessions SET status = 'completed'
                   WHERE session_id IN (SELECT session_id FROM m) RETURNING true""",
                upload.upload_id,
            )
        )


_KEY_COLUMNS = "access_key_id, secret, uid, gid, name, extract(epoch FROM created_at) AS created_s"
_UPLOAD_COLUMNS = (
    "m.upload_id, m.session_id, m.bucket, m.key, m.uid, m.gid, m.headers, "
    "extract(epoch FROM m.created_at) AS created_s"
)


def _key(row: Mapping[str, Any]) -> AccessKey:
    return AccessKey(
        row["access_key_id"],
        row["secret"],
        row["uid"],
        row["gid"],
        row["name"],
        float(row["created_s"]),
    )


def _upload(row: Mapping[str, Any]) -> MultipartUpload:
    return MultipartUpload(
        upload_id=row["upload_id"],
        session_id=row["session_id"],
        bucket=row["bucket"],
        key=row["key"],
        uid=row["uid"],
        gid=row["gid"],
        headers=json.loads(row["headers"]),
        created_s=float(row["created_s"]),
    )


def _part(row: Mapping[str, Any]) -> Part:
    pieces: list[ChunkRef] = []
    offset = 0
    nodes = json.loads(row["piece_nodes"])
    for i, (chunk_id, length, blocks) in enumerate(
        zip(row["piece_ids"], row["piece_lengths"], row["piece_blocks"], strict=True)
    ):
        chunk_id = bytes(chunk_id)
        pieces.append(
            ChunkRef(
                i,
                offset,
                length,
                chunk_id,
                tuple(nodes[i]),
                bytes(blocks) or None,
                ring.key_position(chunk_id),
            )
        )
        offset += length
    return Part(
        row["part_number"], row["size"], bytes(row["md5"]), float(row["modified_s"]), tuple(pieces)
    )
