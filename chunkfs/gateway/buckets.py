"""S3's buckets and objects over the filesystem core.

A bucket is a directory at the root of the filesystem and an object key the
path below it (``a/b/c`` is ``/bucket/a/b/c``). Every request acts as the
uid/gid of its access key, and the POSIX permission bits decide what it may
do, as the kernel decides for a mount: search (x) on every directory on the
way, read (r) to get a file or list a directory, write and search (wx) on a
directory to add or remove a name in it.

An object is written as a new file under a staging directory at the root
(``STAGING``), committed there like any close (its chunks on R nodes, then
its chunk map), given its ETag and headers, and only then renamed over its
key: a reader sees the old object or the new one, and a failed upload
leaves nothing in the bucket. Object headers are kept as ``user.`` extended
attributes, so both doors read them: ``Content-Type`` as ``user.mime_type``,
the other stored HTTP headers as ``user.s3.<header>``, and ``x-amz-meta-NAME``
as ``user.NAME``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio
from cachetools import LRUCache

from .. import errors
from ..core import ROOT, Caller, FileSystem, permitted
from ..meta import ROOT_INO, Attrs, DirEntry, ETag, Ino, now_ns
from .errors import S3Error

log = logging.getLogger(__name__)

# The directory at the root where objects are written before they are
# renamed into place (not a valid bucket name, so never listed as one).
STAGING = b".chunkfs-gateway"
KEY_MAX = 1024  # bytes in a key, as in S3
FILE_MODE = 0o644
DIR_MODE = 0o755
# Bytes gathered from a request body before they are written to the spool.
WRITE_PIECE = 1 << 20
# Bytes read from a file at a time (a GET streams pieces of this size).
READ_PIECE = 4 << 20
# ETags computed at once while listing files that lack a current one.
ETAG_WORKERS = 4
# ETags this gateway has recorded or read, by (inode, version).
ETAG_CACHE_SIZE = 65_536
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
# HTTP headers S3 stores with an object, besides Content-Type.
STORED_HEADERS = (
    "cache-control", "content-disposition", "content-encoding", "content-language", "expires",
)  # fmt: skip
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
_MIME_XATTR = b"user.mime_type"
_HEADER_XATTR = b"user.s3."


@dataclass(frozen=True)
class ObjectInfo:
    """An object as S3 describes it: its key, the file's attributes (size in
    bytes, mtime in ns, content version), its ETag (quoted) and its headers
    (lower-case names: ``content-type``, stored headers, ``x-amz-meta-*``).
    """

    key: str
    attrs: Attrs
    etag: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Listed:
    """One item of a listing, in key order: an object (``info``) or, with
    a delimiter, a common prefix (``info`` None, ``key`` the prefix).
    """

    key: str
    info: ObjectInfo | None


def check_bucket_name(name: str) -> None:
    """Raise ``InvalidBucketName`` unless ``name`` is a valid S3 bucket
    name: 3 to 63 of ``a-z 0-9 . -``, starting and ending alphanumeric,
    no ``..``, ``.-`` or ``-.``, not an IP address.
    """
    if (
        not _BUCKET_RE.match(name)
        or any(bad in name for bad in ("..", ".-", "-."))
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name)
    ):
        raise S3Error("InvalidBucketName", f"{name!r} is not a valid bucket name", BucketName=name)


def key_names(key: str) -> list[bytes]:
    """The names along ``key``'s path (a trailing ``/`` marks a directory
    and adds no name). Raises ``KeyTooLongError`` and ``InvalidArgument``
    for a key no path can hold (an empty name, ``.`` or ``..``).
    """
    raw = key.encode()
    if len(raw) > KEY_MAX:
        raise S3Error("KeyTooLongError")
    names = raw.removesuffix(b"/").split(b"/")
    if not raw or any(n in (b"", b".", b"..") for n in names) or b"\0" in raw:
        raise S3Error("InvalidArgument", f"the key {key!r} cannot name a file")
    if any(len(n) > 255 for n in names):
        raise S3Error("KeyTooLongError", "a key's names are at most 255 bytes each")
    return names


def headers_to_xattrs(headers: Mapping[str, str]) -> dict[bytes, bytes]:
    """The extended attributes that keep an object's headers."""
    out: dict[bytes, bytes] = {}
    for name, value in headers.items():
        if name == "content-type":
            out[_MIME_XATTR] = value.encode()
        elif name in STORED_HEADERS:
            out[_HEADER_XATTR + name.encode()] = value.encode()
        elif name.startswith("x-amz-meta-"):
            out[b"user." + name[len("x-amz-meta-") :].encode()] = value.encode()
    return out


def xattrs_to_headers(xattrs: Mapping[bytes, bytes]) -> dict[str, str]:
    """An object's headers from its file's extended attributes."""
    headers = {"content-type": DEFAULT_CONTENT_TYPE}
    for name, value in xattrs.items():
        text = value.decode(errors="replace")
        if name == _MIME_XATTR:
            headers["content-type"] = text
        elif name.startswith(_HEADER_XATTR):
            header = name[len(_HEADER_XATTR) :].decode(errors="replace")
            if header in STORED_HEADERS:
                headers[header] = text
        elif name.startswith(b"user."):
            headers["x-amz-meta-" + name[5:].decode(errors="replace")] = text
    return headers


class Buckets:
    """Buckets and objects of the filesystem ``fs``, for one caller per call."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self._staging: Ino | None = None
        # An ETag describes one version of one inode, and neither is ever
        # used again: an entry never goes stale, so a GET or HEAD of an
        # object this gateway has seen needs no query for its ETag.
        self._etag_cache: LRUCache[tuple[Ino, int], str] = LRUCache(ETAG_CACHE_SIZE)

    # ------------------------------------------------------------ paths

    @staticmethod
    def _allow(attrs: Attrs, want: int, caller: Caller) -> None:
        if not permitted(attrs, want, caller):
            raise S3Error("AccessDenied")

    async def _path(self, caller: Caller, bucket: str, names: list[bytes]) -> list[DirEntry]:
        """The bucket's entry, then those of ``names`` below it that exist
        (one walk), which ``caller`` may reach: search on the root, the
        bucket and every directory but the last entry. Raises
        ``NoSuchBucket``, ``AccessDenied``.
        """
        raw = bucket.encode()
        if not bucket or raw.startswith(b".") or b"/" in raw or len(raw) > 255:
            raise S3Error("NoSuchBucket", BucketName=bucket)
        found = await self.fs.walk(ROOT_INO, [raw, *names])
        if not found or not found[0].attrs.is_dir:
            raise S3Error("NoSuchBucket", BucketName=bucket)
        self._allow(await self.fs.getattr(ROOT_INO), os.X_OK, caller)
        self._allow(found[0].attrs, os.X_OK, caller)
        for e in found[1:-1]:
            self._allow(e.attrs, os.X_OK, caller)
        return found

    async def bucket(self, caller: Caller, name: str) -> Attrs:
        """The bucket's directory, which ``caller`` may search. Raises
        ``NoSuchBucket``, ``AccessDenied``.
        """
        return (await self._path(caller, name, []))[0].attrs

    async def _entry(self, caller: Caller, bucket: str, key: str) -> list[DirEntry]:
        """The entries from the bucket to an existing object (a directory
        for a key ending in ``/``), the object's last. Raises
        ``NoSuchBucket``, ``NoSuchKey``, ``AccessDenied``.
        """
        names = key_names(key)
        found = await self._path(caller, bucket, names)
        if len(found) == len(names) + 1:
            last = found[-1].attrs
            if (last.is_reg and not key.endswith("/")) or (last.is_dir and key.endswith("/")):
                return found
        raise S3Error("NoSuchKey", Key=key)

    async def _staging_dir(self) -> Ino:
        if self._staging is None:
            try:
                attrs = await self.fs.lookup(ROOT_INO, STAGING)
            except errors.NotFound:
                try:
                    attrs = await self.fs.mkdir(ROOT_INO, STAGING, 0o711, ROOT)
                except errors.Exists:
                    attrs = await self.fs.lookup(ROOT_INO, STAGING)
            self._staging = attrs.ino
        return self._staging

    async def clean_staging(self, older_than_s: float) -> int:
        """Remove the staged uploads older than ``older_than_s`` seconds
        (left by a gateway that stopped mid-upload); return how many.
        """
        staging = await self._staging_dir()
        cutoff = now_ns() - int(older_than_s * 1e9)
        stale = [e.name async for e in self._entries(staging) if e.attrs.mtime_ns < cutoff]
        for name in stale:
            try:
                await self.fs.unlink(staging, name)
            except errors.NotFound:
                continue
        await self.fs.forget_unlinked()
        return len(stale)

    # ---------------------------------------------------------- buckets

    async def list_buckets(self, caller: Caller) -> list[tuple[str, Attrs]]:
        """The buckets (directories at the root with a name S3 accepts), by name."""
        self._allow(await self.fs.getattr(ROOT_INO), os.R_OK | os.X_OK, caller)
        found = []
        async for e in self._entries(ROOT_INO):
            if e.attrs.is_dir and not e.name.startswith(b"."):
                try:
                    found.append((e.name.decode(), e.attrs))
                except UnicodeDecodeError:
                    continue
        return sorted(found, key=lambda b: b[0])

    async def create_bucket(self, caller: Caller, name: str) -> None:
        """Make the bucket's directory. Raises ``InvalidBucketName``,
        ``BucketAlreadyOwnedByYou`` (the caller owns it),
        ``BucketAlreadyExists``, ``AccessDenied``.
        """
        check_bucket_name(name)
        root = await self.fs.getattr(ROOT_INO)
        try:
            existing = await self.fs.lookup(ROOT_INO, name.encode())
        except errors.NotFound:
            self._allow(root, os.W_OK | os.X_OK, caller)
            try:
                await self.fs.mkdir(ROOT_INO, name.encode(), DIR_MODE, caller)
                return
            except errors.Exists:
                existing = await self.fs.lookup(ROOT_INO, name.encode())
        if existing.uid == caller.uid:
            raise S3Error("BucketAlreadyOwnedByYou", BucketName=name)
        raise S3Error("BucketAlreadyExists", BucketName=name)

    async def delete_bucket(self, caller: Caller, name: str) -> None:
        """Remove an empty bucket. Raises ``NoSuchBucket``,
        ``BucketNotEmpty``, ``AccessDenied``.
        """
        await self.bucket(caller, name)
        self._allow(await self.fs.getattr(ROOT_INO), os.W_OK | os.X_OK, caller)
        try:
            await self.fs.unlink(ROOT_INO, name.encode(), is_dir=True)
        except errors.NotEmpty:
            raise S3Error("BucketNotEmpty", BucketName=name) from None
        except errors.NotFound:
            raise S3Error("NoSuchBucket", BucketName=name) from None
        await self.fs.forget_unlinked()

    # ------------------------------------------------------------ reads

    async def head(self, caller: Caller, bucket: str, key: str) -> ObjectInfo:
        """An object's description, without opening it when its ETag is
        current (a walk and the ETag's lookup). Raises ``NoSuchBucket``,
        ``NoSuchKey``, ``AccessDenied``.
        """
        entry = (await self._entry(caller, bucket, key))[-1]
        self._allow(entry.attrs, os.R_OK, caller)
        if entry.attrs.is_reg:
            tag = (await self._recorded_etags({entry.attrs.ino: entry.attrs.version})).get(
                entry.attrs.ino
            )
            if tag is not None:
                return ObjectInfo(key, entry.attrs, tag, xattrs_to_headers(entry.xattrs))
        info, fh = await self.open(caller, bucket, key)
        await self.fs.release(fh)
        return info

    async def open(self, caller: Caller, bucket: str, key: str) -> tuple[ObjectInfo, int]:
        """Open an object for reading: its description and a handle whose
        reads (``read``) give that version's bytes whatever happens to the
        key meanwhile; the caller releases it (``fs.release``). Raises
        ``NoSuchBucket``, ``NoSuchKey``, ``AccessDenied``.
        """
        entry = (await self._entry(caller, bucket, key))[-1]
        attrs = entry.attrs
        self._allow(attrs, os.R_OK, caller)
        if attrs.is_dir:  # a "folder" made with a PUT of "name/"
            raise S3Error("NoSuchKey", Key=key)
        opened = await self.fs.open(attrs.ino, os.O_RDONLY, caller)
        try:
            xattrs = entry.xattrs
            if opened.version != attrs.version:  # committed elsewhere since the walk
                attrs = replace(await self.fs.getattr(attrs.ino), version=opened.version)
                xattrs = await self.fs.xattrs(attrs.ino)
            tag = (await self._recorded_etags({attrs.ino: opened.version})).get(attrs.ino)
            if tag is None:
                tag = await self._compute_etag(opened.fh, attrs.size, opened.version)
        except BaseException:
            await self.fs.release(opened.fh)
            raise
        return ObjectInfo(key, attrs, tag, xattrs_to_headers(xattrs)), opened.fh

    async def read(self, fh: int, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of an open object, in pieces of at most ``READ_PIECE``."""
        for lo in range(start, end, READ_PIECE):
            data = await self.fs.read(fh, lo, min(READ_PIECE, end - lo))
            if not data:
                return
            yield bytes(data)

    async def _compute_etag(self, fh: int, size: int, version: int) -> str:
        """The ETag of the version open as ``fh`` (the MD5 of its bytes),
        recorded for the next request.
        """
        md5 = hashlib.md5(usedforsecurity=False)
        async for piece in self.read(fh, 0, size):
            md5.update(piece)
        tag = f'"{md5.hexdigest()}"'
        await self._record_etag(self.fs.files.handle(fh).ino, version, tag)
        return tag

    async def _recorded_etags(self, versions: Mapping[Ino, int]) -> dict[Ino, str]:
        """The ETags recorded for these versions (``{ino: version}``), from
        the cache or, for the others, in one query; a file without one for
        its version is left out.
        """
        tags = {ino: self._etag_cache.get((ino, v)) for ino, v in versions.items()}
        wanted = [ino for ino, tag in tags.items() if tag is None]
        if wanted:
            for ino, t in (await self.fs.meta.objects.etags(wanted)).items():
                if t.version == versions[ino]:
                    tags[ino] = self._etag_cache[ino, t.version] = t.etag
        return {ino: tag for ino, tag in tags.items() if tag is not None}

    async def _record_etag(self, ino: Ino, version: int, etag: str) -> None:
        """Record the ETag of a version, in PostgreSQL and in the cache."""
        await self.fs.meta.objects.set_etag(ino, ETag(version, etag))
        self._etag_cache[ino, version] = etag

    # ----------------------------------------------------------- writes

    async def put(
        self,
        caller: Caller,
        bucket: str,
        key: str,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str],
        *,
        content_md5: bytes | None = None,
        etag: str | None = None,
    ) -> ObjectInfo:
        """Store ``body`` as the object ``key``: committed, durable and then
        put in place (replacing the old object at once). Its ETag is the
        body's MD5, or ``etag`` (a multipart upload's). A key ending in
        ``/`` with an empty body makes a directory. Raises ``NoSuchBucket``,
        ``AccessDenied``, ``BadDigest`` (``content_md5`` does not match),
        ``EntityTooLarge``, ``ObjectConflict`` (a file where a directory is
        needed, or the reverse), and what ``body`` raises; nothing is left
        behind by a failure.
        """
        names = key_names(key)
        found = await self._path(caller, bucket, names)
        if key.endswith("/"):
            async for piece in body:
                if piece:
                    raise S3Error(
                        "InvalidRequest", "a key ending in / names a directory: it holds no bytes"
                    )
            attrs = await self._make_dirs(caller, found, names)
            return ObjectInfo(
                key, attrs, f'"{hashlib.md5(b"", usedforsecurity=False).hexdigest()}"', {}
            )
        self._check_parents(caller, found, names)

        async def fill(fh: int) -> tuple[Attrs | None, str]:
            if etag is not None:  # a multipart upload's: its parts' MD5s were taken
                await self._fill(fh, body, None)
                return await self.fs.flush(fh), etag
            md5 = hashlib.md5(usedforsecurity=False)
            await self._fill(fh, body, md5)
            if content_md5 is not None and md5.digest() != content_md5:
                raise S3Error("BadDigest")
            return await self.fs.flush(fh), f'"{md5.hexdigest()}"'

        return await self._stage(caller, found, names, key, headers, fill)

    async def copy(
        self,
        caller: Caller,
        source: ObjectInfo,
        source_fh: int,
        bucket: str,
        key: str,
        headers: Mapping[str, str],
    ) -> ObjectInfo:
        """Make ``key`` a copy of the object ``source`` (open as
        ``source_fh``) that shares its chunks, with ``headers``; nothing is
        uploaded. Raises as ``put``, and ``ServiceUnavailable`` when some
        chunk of the source is short of replicas (``chunkfs repair`` mends that).
        """
        names = key_names(key)
        found = await self._path(caller, bucket, names)
        self._check_parents(caller, found, names)

        async def share(fh: int) -> tuple[Attrs | None, str]:
            committed = await self.fs.share_content(fh, source_fh)
            if committed is None or committed.size != source.attrs.size:
                raise S3Error("ServiceUnavailable", "the source object changed or lacks replicas")
            return committed, source.etag

        return await self._stage(caller, found, names, key, headers, share)

    async def _stage(
        self,
        caller: Caller,
        found: list[DirEntry],
        names: list[bytes],
        key: str,
        headers: Mapping[str, str],
        fill: Callable[[int], Awaitable[tuple[Attrs | None, str]]],
    ) -> ObjectInfo:
        """Make a staged file, ``fill`` it (which commits it and returns the
        attributes committed and the ETag), give it its headers and ETag,
        then rename it over ``key``; a failure removes it.
        """
        staging = await self._staging_dir()
        name = secrets.token_hex(16).encode()
        created = await self.fs.create(staging, name, FILE_MODE, os.O_WRONLY, caller)
        try:
            committed, etag = await fill(created.fh)
            attrs = committed or created.attrs
            xattrs = headers_to_xattrs(headers)
            if xattrs:
                await self.fs.set_xattrs(attrs.ino, xattrs)
            await self._record_etag(attrs.ino, attrs.version, etag)
            await self._rename_into_place(caller, found, names, key, staging, name)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._drop_staged(staging, name, created.fh)
            raise
        await self.fs.release(created.fh)
        await self.fs.forget_unlinked()
        return ObjectInfo(key, attrs, etag, xattrs_to_headers(xattrs))

    async def _rename_into_place(
        self,
        caller: Caller,
        found: list[DirEntry],
        names: list[bytes],
        key: str,
        staging: Ino,
        name: bytes,
    ) -> None:
        """Rename the staged file over ``key``, its directories made where
        missing; once more after a fresh walk when one of them went away
        meanwhile (an object deleted beside it pruned it).
        """
        for attempt in range(2):
            parent = await self._make_dirs(caller, found, names[:-1])
            try:
                await self.fs.rename(staging, name, parent.ino, names[-1])
                return
            except errors.IsADirectory:
                raise S3Error("ObjectConflict", f"{key!r} names a directory") from None
            except errors.NotFound:
                if attempt:
                    raise
                found = await self.fs.walk(ROOT_INO, [found[0].name, *names])

    async def _fill(self, fh: int, body: AsyncIterator[bytes], md5: Any | None) -> None:
        """Write ``body`` to the open file ``fh``, feeding ``md5`` (a hashlib
        MD5, or None) on the way.
        """
        offset = 0
        async for data in pieces_of(body, WRITE_PIECE):
            if md5 is not None:
                await hash_update(md5, data)
            offset += await self._write(fh, offset, data)

    async def _write(self, fh: int, offset: int, data: bytes) -> int:
        try:
            return await self.fs.write(fh, offset, data)
        except errors.FileTooLarge:
            raise S3Error("EntityTooLarge") from None

    async def _drop_staged(self, staging: Ino, name: bytes, fh: int) -> None:
        """Forget a staged file that did not make it into place."""
        self.fs.discard(fh)
        try:
            await self.fs.unlink(staging, name)
        except errors.NotFound:
            return  # it was renamed into place
        except errors.ChunkfsError as exc:
            log.warning("could not remove the staged upload %s: %s", name.decode(), exc)
            return
        await self.fs.forget_unlinked()

    def _check_parents(self, caller: Caller, found: list[DirEntry], names: list[bytes]) -> None:
        """Check, before any byte is stored, that the key's directories are
        directories where they exist (``found``: the walk from the bucket),
        that the key is not a directory, and that the caller may add a name
        where the first missing directory (or the file) goes.
        """
        for k, e in enumerate(found[1 : len(names)]):
            if not e.attrs.is_dir:
                raise S3Error(
                    "ObjectConflict", f"{names[k].decode()!r} is an object, not a directory"
                )
        if len(found) == len(names) + 1 and found[-1].attrs.is_dir:
            raise S3Error("ObjectConflict", "the key names a directory")
        self._allow(found[min(len(found), len(names)) - 1].attrs, os.W_OK | os.X_OK, caller)

    async def _make_dirs(self, caller: Caller, found: list[DirEntry], names: list[bytes]) -> Attrs:
        """The directory ``names`` lead to from the bucket (``found``: the
        walk from it), made where missing (owned by the caller, who needs
        wx on where each goes).
        """
        existing = found[: len(names) + 1]
        attrs = existing[-1].attrs
        for name in names[len(existing) - 1 :]:
            self._allow(attrs, os.W_OK | os.X_OK, caller)
            try:
                child = await self.fs.mkdir(attrs.ino, name, DIR_MODE, caller)
            except errors.Exists:
                child = await self.fs.lookup(attrs.ino, name)
            if not child.is_dir:
                raise S3Error("ObjectConflict", f"{name.decode()!r} is an object, not a directory")
            self._allow(child, os.X_OK, caller)
            attrs = child
        if not attrs.is_dir:
            raise S3Error("ObjectConflict", "an object stands where a directory is needed")
        return attrs

    async def delete(self, caller: Caller, bucket: str, key: str) -> None:
        """Remove an object (nothing when there is none, as S3 answers), and
        the directories it leaves empty up to the bucket. Raises
        ``NoSuchBucket``, ``AccessDenied``.
        """
        try:
            found = await self._entry(caller, bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return
            raise
        self._allow(found[-2].attrs, os.W_OK | os.X_OK, caller)
        try:
            await self.fs.unlink(found[-2].attrs.ino, found[-1].name, is_dir=found[-1].attrs.is_dir)
        except (errors.NotFound, errors.NotEmpty):
            return
        await self.fs.forget_unlinked()
        # S3 has no prefix without an object under it: remove the
        # directories left empty, deepest first, up to the bucket.
        for k in range(len(found) - 2, 0, -1):
            if not permitted(found[k - 1].attrs, os.W_OK | os.X_OK, caller):
                return
            try:
                await self.fs.unlink(found[k - 1].attrs.ino, found[k].name, is_dir=True)
            except (errors.NotEmpty, errors.NotFound, errors.NotADirectory):
                return

    # ---------------------------------------------------------- listing

    async def _entries(self, ino: Ino) -> AsyncIterator[DirEntry]:
        after = 0
        while True:
            page = await self.fs.readdir(ino, after, 1000)
            for e in page:
                yield e
            if len(page) < 1000:
                return
            after = page[-1].cookie

    async def list_objects(
        self,
        caller: Caller,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        after: str = "",
        limit: int = 1000,
    ) -> tuple[list[Listed], bool]:
        """Up to ``limit`` objects and common prefixes of ``bucket`` whose
        keys start with ``prefix`` and sort after ``after`` (UTF-8 byte
        order, as S3 sorts), and whether more follow. With a ``delimiter``,
        the keys that hold it past the prefix are rolled up into common
        prefixes. Directories the caller may not read are skipped. Raises
        ``NoSuchBucket``, ``AccessDenied``.
        """
        top = await self.bucket(caller, bucket)
        self._allow(top, os.R_OK | os.X_OK, caller)
        found: list[tuple[str, DirEntry | None]] = []
        more = False
        async for key, entry in self._walk_keys(caller, top.ino, "", prefix, delimiter, after):
            if delimiter and entry is not None:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    key, entry = key[: cut + len(delimiter)], None
                    if key <= after or (found and found[-1][0] == key):
                        continue
            if len(found) == limit:
                more = True
                break
            found.append((key, entry))
        tags = await self._etags([e for _, e in found if e is not None])
        listed = [
            Listed(key, None if e is None else ObjectInfo(key, e.attrs, tags[e.attrs.ino], {}))
            for key, e in found
        ]
        return listed, more

    async def _walk_keys(
        self, caller: Caller, ino: Ino, dir_key: str, prefix: str, delimiter: str, after: str
    ) -> AsyncIterator[tuple[str, DirEntry | None]]:
        """The keys under directory ``ino`` (whose keys start with
        ``dir_key``) in key order: files with their entries, and with the
        delimiter ``/`` directories past the prefix as common prefixes
        (entry None).
        """
        items = []
        async for e in self._entries(ino):
            try:
                name = e.name.decode()
            except UnicodeDecodeError:
                continue
            if e.attrs.is_dir:
                items.append((dir_key + name + "/", e))
            elif e.attrs.is_reg:
                items.append((dir_key + name, e))
        items.sort(key=lambda item: item[0].encode())
        for key, e in items:
            if not e.attrs.is_dir:
                if key.startswith(prefix) and key.encode() > after.encode():
                    yield key, e
                continue
            if not (key.startswith(prefix) or prefix.startswith(key)):
                continue
            if key.encode() <= after.encode() and not after.startswith(key):
                continue  # every key below sorts before the marker
            if delimiter == "/" and key.startswith(prefix) and len(key) > len(prefix):
                if key.encode() > after.encode():
                    yield key, None
                continue
            if not permitted(e.attrs, os.R_OK | os.X_OK, caller):
                continue
            async for item in self._walk_keys(caller, e.attrs.ino, key, prefix, delimiter, after):
                yield item

    async def _etags(self, entries: list[DirEntry]) -> dict[Ino, str]:
        """The current ETag of each listed file, computed (a few at once)
        for those without one.
        """
        tags = await self._recorded_etags({e.attrs.ino: e.attrs.version for e in entries})
        missing = [e.attrs.ino for e in entries if e.attrs.ino not in tags]
        limiter = trio.CapacityLimiter(ETAG_WORKERS)

        async def compute(ino: Ino) -> None:
            async with limiter:
                try:
                    opened = await self.fs.open(ino, os.O_RDONLY, ROOT)
                except errors.NotFound:
                    tags[ino] = '""'  # removed meanwhile
                    return
                try:
                    size = (await self.fs.getattr(ino)).size
                    tags[ino] = await self._compute_etag(opened.fh, size, opened.version)
                finally:
                    await self.fs.release(opened.fh)

        async with trio.open_nursery() as nursery:
            for ino in missing:
                nursery.start_soon(compute, ino)
        return tags


async def pieces_of(body: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """``body`` cut into pieces of ``size`` bytes (the last one shorter)."""
    held: list[bytes] = []
    count = 0
    async for data in body:
        held.append(data)
        count += len(data)
        while count >= size:
            joined = b"".join(held)
            yield joined[:size]
            rest = joined[size:]
            held, count = ([rest] if rest else []), len(rest)
    if count:
        yield b"".join(held)


# Below this many bytes a hash is updated on the event loop: a thread's
# round trip would cost more than the hashing.
_HASH_IN_THREAD = 64 << 10


async def hash_update(digest: Any, data: bytes) -> None:
    """``digest.update(data)`` (a hashlib object), in a worker thread for
    large ``data`` (hashlib lets go of the GIL), so other requests go on.
    """
    if len(data) < _HASH_IN_THREAD:
        digest.update(data)
    else:
        await trio.to_thread.run_sync(digest.update, data)
