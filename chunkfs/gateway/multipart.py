"""S3 multipart uploads: parts wait on the storage nodes, the object is
committed whole at completion.

Each part is cut into pieces of at most ``PIECE_MAX`` bytes, each stored
as a chunk object on R nodes (protected from gc by the upload's session,
which every part keeps alive for ``ttl_s`` more seconds) and recorded with
the part. Completion reads the parts back in order, verified, and writes
them as one object through ``Buckets.put``: its six chunks on R nodes
first, then its metadata in one transaction, then the rename into place.
The pieces are then garbage, collected as any chunk no file uses once the
session has ended; an abandoned upload's go when its session expires.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping

import trio

from .. import errors, layout, ring
from ..core import Caller
from ..meta import ChunkRef, MultipartUpload, Part
from ..store import PutItem
from .buckets import Buckets, ObjectInfo, hash_update, key_names, pieces_of
from .errors import S3Error
from .xml import CompletedPart

# Bytes in one stored piece of a part (a chunk object, fetched whole when read).
PIECE_MAX = 8 << 20
# Pieces fetched at once when a completed upload is read back.
READ_AHEAD = 4
# S3's limits: part numbers, and the smallest part but the last (bytes).
PART_NUMBER_MAX = 10000
PART_MIN = 5 << 20
PART_MAX = 5 << 30


def part_etag(part: Part) -> str:
    """A part's ETag, quoted: the MD5 of its bytes."""
    return f'"{part.md5.hex()}"'


class Multipart:
    """Multipart uploads into ``buckets``; sessions live ``ttl_s`` seconds
    past their last part.
    """

    def __init__(self, buckets: Buckets, ttl_s: float) -> None:
        self.buckets = buckets
        self.objects = buckets.fs.meta.objects
        self.store = buckets.fs.files.store
        self.ttl_s = ttl_s

    async def create(
        self, caller: Caller, bucket: str, key: str, headers: Mapping[str, str]
    ) -> MultipartUpload:
        """Start an upload of ``key`` with the object's ``headers``. Raises
        ``NoSuchBucket``, ``AccessDenied``, ``InvalidArgument``.
        """
        key_names(key)
        top = await self.buckets.bucket(caller, bucket)
        return await self.objects.create_multipart(
            top.ino, bucket, key, uid=caller.uid, gid=caller.gid, headers=headers, ttl_s=self.ttl_s
        )

    async def upload(
        self, caller: Caller, bucket: str, key: str, upload_id: str
    ) -> MultipartUpload:
        """The upload ``upload_id`` of ``bucket``/``key``, which ``caller``
        started. Raises ``NoSuchUpload``, ``NoSuchBucket``, ``AccessDenied``.
        """
        await self.buckets.bucket(caller, bucket)
        try:
            upload = await self.objects.multipart(upload_id)
        except errors.NotFound:
            raise S3Error("NoSuchUpload", UploadId=upload_id) from None
        if (upload.bucket, upload.key) != (bucket, key):
            raise S3Error("NoSuchUpload", UploadId=upload_id)
        if caller.uid not in (0, upload.uid):
            raise S3Error("AccessDenied")
        return upload

    async def put_part(
        self,
        upload: MultipartUpload,
        number: int,
        body: AsyncIterator[bytes],
        *,
        content_md5: bytes | None = None,
    ) -> str:
        """Store part ``number`` (replacing one of that number); return its
        ETag. Raises
        ``InvalidArgument`` for a number out of range, ``EntityTooLarge``,
        ``BadDigest``, and what ``body`` raises.
        """
        if not 1 <= number <= PART_NUMBER_MAX:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000")
        md5 = hashlib.md5(usedforsecurity=False)
        pieces: list[ChunkRef] = []
        size = 0
        async for data in pieces_of(body, PIECE_MAX):
            if size + len(data) > PART_MAX:
                raise S3Error("EntityTooLarge")
            await hash_update(md5, data)
            digests = await trio.to_thread.run_sync(layout.block_digests, data)
            pieces.append(await self._store(upload, len(pieces), size, data, digests))
            size += len(data)
        if not pieces:
            pieces.append(await self._store(upload, 0, 0, b"", layout.block_digests(b"")))
        if content_md5 is not None and md5.digest() != content_md5:
            raise S3Error("BadDigest")
        part = Part(number, size, md5.digest(), 0.0, tuple(pieces))
        await self._record(upload, part)
        return part_etag(part)

    async def _store(
        self, upload: MultipartUpload, index: int, offset: int, data: bytes, digests: list[bytes]
    ) -> ChunkRef:
        """One piece of a part (its 1 MiB blocks' SHA-256s ``digests``),
        stored durably on R nodes.
        """
        chunk_id = layout.chunk_id_of(digests)
        position = ring.key_position(chunk_id)
        await self._protect(upload, chunk_id)
        placed = await self.store.put([PutItem(chunk_id, len(data), position, data=data)])
        blocks = b"".join(digests) if len(digests) > 1 else None
        return ChunkRef(
            index, offset, len(data), chunk_id, tuple(placed[chunk_id]), blocks, position
        )

    async def _protect(self, upload: MultipartUpload, chunk_id: bytes) -> None:
        try:
            await self.objects.protect(upload, [chunk_id], self.ttl_s)
        except errors.NotFound:
            raise S3Error("NoSuchUpload", UploadId=upload.upload_id) from None

    async def _record(self, upload: MultipartUpload, part: Part) -> None:
        try:
            await self.objects.put_part(upload, part)
        except errors.NotFound:
            raise S3Error("NoSuchUpload", UploadId=upload.upload_id) from None

    async def parts(self, upload: MultipartUpload) -> list[Part]:
        """The parts stored so far, by number."""
        return await self.objects.parts(upload)

    async def complete(
        self, caller: Caller, upload: MultipartUpload, wanted: list[CompletedPart]
    ) -> ObjectInfo:
        """Commit the object made of the ``wanted`` parts, in order, and end
        the upload. Its ETag is the MD5 of the parts' MD5s, then ``-`` and
        their count. Raises ``InvalidPartOrder``, ``InvalidPart`` (a part
        not stored, or of another ETag), ``EntityTooSmall`` (a part but the
        last under 5 MiB), and what ``Buckets.put`` raises.
        """
        numbers = [p.number for p in wanted]
        if numbers != sorted(numbers):
            raise S3Error("InvalidPartOrder")
        # A part number listed twice (a part sent again) counts once: the last listing.
        wanted = list({p.number: p for p in wanted}.values())
        stored = {p.number: p for p in await self.parts(upload)}
        chosen: list[Part] = []
        for want in wanted:
            part = stored.get(want.number)
            if part is None or want.etag.strip('"') != part.md5.hex():
                raise S3Error("InvalidPart", PartNumber=str(want.number), ETag=want.etag)
            chosen.append(part)
        for part in chosen[:-1]:
            if part.size < PART_MIN:
                raise S3Error("EntityTooSmall", PartNumber=str(part.number))
        etag = combined_etag([p.md5 for p in chosen])
        info = await self.buckets.put(
            caller, upload.bucket, upload.key, self._read(chosen), upload.headers, etag=etag
        )
        await self.objects.end_multipart(upload)
        return info

    async def completed(
        self, caller: Caller, bucket: str, key: str, wanted: list[CompletedPart]
    ) -> ObjectInfo | None:
        """The object a CompleteMultipartUpload of ``wanted`` made, when the
        key holds it still (a client that sends the request again, not
        having seen the first answer, gets the same); else None.
        """
        last = {p.number: p for p in wanted}.values()
        try:
            md5s = [bytes.fromhex(p.etag.strip('"')) for p in last]
        except ValueError:
            return None
        try:
            info = await self.buckets.head(caller, bucket, key)
        except S3Error:
            return None
        return info if info.etag == combined_etag(md5s) else None

    async def _read(self, parts: list[Part]) -> AsyncIterator[bytes]:
        """The bytes of ``parts`` in order, each piece verified against its
        id; ``READ_AHEAD`` pieces are fetched at once.
        """
        pieces = [piece for part in parts for piece in part.pieces]
        for first in range(0, len(pieces), READ_AHEAD):
            group = pieces[first : first + READ_AHEAD]
            got: list[bytes] = [b""] * len(group)

            async def fetch(i: int, group: list[ChunkRef] = group, got: list[bytes] = got) -> None:
                got[i] = bytes(await self.store.read(group[i], 0, group[i].length))

            with errors.unwrapped():
                async with trio.open_nursery() as nursery:
                    for i in range(len(group)):
                        nursery.start_soon(fetch, i)
            for data in got:
                yield data

    async def abort(self, upload: MultipartUpload) -> None:
        """End the upload; its parts are collected. Raises ``NoSuchUpload``."""
        if not await self.objects.end_multipart(upload):
            raise S3Error("NoSuchUpload", UploadId=upload.upload_id)

    async def uploads(self, caller: Caller, bucket: str) -> list[MultipartUpload]:
        """The uploads in progress into ``bucket``. Raises ``NoSuchBucket``."""
        await self.buckets.bucket(caller, bucket)
        return await self.objects.multiparts(bucket)


def combined_etag(md5s: list[bytes]) -> str:
    """A multipart object's ETag, quoted: the MD5 of its parts' MD5s, then
    ``-`` and their count.
    """
    combined = hashlib.md5(b"".join(md5s), usedforsecurity=False)
    return f'"{combined.hexdigest()}-{len(md5s)}"'
