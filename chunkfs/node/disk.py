"""Chunk files on a storage node's disk.

Layout of a data directory (mode 0700)::

    DATA/node_id            16 lowercase hex: the node's identity, kept across restarts
    DATA/cluster_id         the id of the cluster (mkfs) the directory belongs to,
                            written at the node's first registration
    DATA/lock               locked (flock) while a node process serves the directory
    DATA/chunks/ab/<id>     one file (mode 0600) per chunk; <id> is the 64-hex SHA-256
                            of its bytes, fanned out by its first two hex digits
    DATA/tmp/               uploads in progress; emptied at start, so a chunk file
                            only ever appears whole (temp file, fsync, rename)

A chunk file's mtime is the last time a writer stored or re-used it. Garbage
collection deletes with a ``before_ns`` guard and is refused when the chunk
was touched after its decision, so a writer re-using an old chunk never loses it.

All blocking file I/O runs in worker threads (``trio.to_thread``), in pieces
of about ``PIECE_SIZE`` bytes (``READ_PIECE_SIZE`` for ranged reads). Sizes
are in bytes, times in nanoseconds since the epoch (the node's clock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import secrets
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from ..diskio import fsync_dir, syncfs
from ..errors import (
    ChunkfsError,
    ChunkMissing,
    ConfigError,
    DigestMismatch,
    InvalidArgument,
    NodeFull,
)
from ..layout import BLOCK_SIZE, BlockHasher, chunk_id_of, id_matches, zero_digest
from ..wire import BODY, ZERO, BatchEntry, Source, is_valid_id

log = logging.getLogger(__name__)

# Bytes handed to a worker thread at a time: large enough that the thread hop
# is negligible, small enough to keep memory per upload bounded.
PIECE_SIZE = 1 << 20
# A ranged read goes out in pieces this large: a mount's read-ahead span
# (``store.SPAN`` windows) in one thread hop and one send; in 1 MiB pieces
# the hops cost a node serving a sequential reader a quarter of its CPU.
READ_PIECE_SIZE = 8 << 20
# Streamed chunks of at least this size are written with O_DIRECT, in aligned
# PIECE_SIZE writes: straight to the disk, so a large upload neither fills
# the page cache with pages nobody reads soon nor leaves fsync a backlog to
# write back. Smaller ones (and filesystems without O_DIRECT) go buffered.
DIRECT_MIN = 4 << 20
_NODE_ID_RE = re.compile(r"[0-9a-f]{16}\Z")
_FANOUT = [f"{i:02x}" for i in range(256)]


class LengthMismatch(ChunkfsError):
    """A body ended before, or ran past, its declared length."""

    errno = errno.EINVAL

    def __init__(self, expected: int, received: int) -> None:
        what = "more" if received > expected else "fewer"
        super().__init__(f"body has {what} bytes than the declared {expected}")
        self.expected = expected
        self.received = received


class DeleteRefused(ChunkfsError):
    """A guarded delete found the chunk touched at or after ``before_ns``."""

    errno = errno.EBUSY


def _check_id(chunk_id: str) -> None:
    if not is_valid_id(chunk_id):
        raise InvalidArgument("chunk id must be 64 lowercase hex digits")


@dataclass(frozen=True)
class Stats:
    """Space and content of a node, in bytes and chunks (what heartbeats carry)."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    chunk_count: int


class ChunkFile:
    """An open chunk for reading. The open descriptor survives a concurrent delete."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    async def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the chunk (fewer if the range passes its end)."""
        fd = self._require_fd()
        return await trio.to_thread.run_sync(_pread_all, fd, start, end)

    async def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` in pieces of at most ``READ_PIECE_SIZE``
        bytes; closes the file when done. Raises OSError from the disk.
        """
        try:
            if end - start > READ_PIECE_SIZE:
                # The disk reads the whole range at once, not a piece per
                # read-ahead window of the kernel.
                await trio.to_thread.run_sync(_will_need, self._require_fd(), start, end)
            pos = start
            while pos < end:
                data = await self.read(pos, min(end, pos + READ_PIECE_SIZE))
                if not data:
                    break
                pos += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        """Close the descriptor; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError("chunk file is closed")
        return self._fd


def _will_need(fd: int, start: int, end: int) -> None:
    """Ask the kernel to start reading bytes ``[start, end)`` of ``fd`` now."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no posix_fadvise
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)


def _pread_all(fd: int, start: int, end: int) -> bytes:
    parts = []
    while start < end:
        data = os.pread(fd, end - start, start)
        if not data:
            break
        parts.append(data)
        start += len(data)
    return b"".join(parts)


def _touch(path: Path) -> bool:
    """Set mtime to now; False when the file does not exist.

    The time is passed explicitly: the kernel's own file timestamps come from
    a coarse clock that can lag ``time.time_ns()`` by milliseconds, which would
    let a touch land before a ``before_ns`` taken just earlier.
    """
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
        return True
    except FileNotFoundError:
        return False


def _no_room(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class ChunkDisk:
    """The chunks of one data directory. Create with ``await ChunkDisk.open(...)``.

    Used bytes and chunk count are kept in memory (scanned at open). Puts and
    deletes of one id are serialized by a per-id lock, so the counts stay exact.
    """

    def __init__(
        self, root: Path, node_id: str, capacity_bytes: int | None, lock_fd: int = -1
    ) -> None:
        self.root = root
        self.node_id = node_id
        self._lock_fd = lock_fd
        self._capacity = capacity_bytes
        self._chunks = root / "chunks"
        self._tmp = root / "tmp"
        self.used_bytes = 0
        self.chunk_count = 0
        self._reserved = 0
        self._locks: dict[str, tuple[trio.Lock, list[int]]] = {}

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls, data_dir: str | os.PathLike[str], *, capacity_bytes: int | None = None
    ) -> ChunkDisk:
        """Create or open a data directory: lock it, make its layout, empty
        tmp/, scan chunks. ``close`` gives the lock back.

        ``capacity_bytes`` caps the bytes stored (None: the disk's size).
        Raises ``ChunkfsError`` with a one-line message when the directory
        cannot be used (another process serves it, permissions, a corrupt
        node_id file, ...).
        """
        if capacity_bytes is not None and capacity_bytes < 0:
            raise InvalidArgument("capacity must not be negative")
        root = Path(data_dir).absolute()  # noqa: ASYNC240 - no I/O: joins the cwd
        lock_fd = -1
        try:
            lock_fd = await trio.to_thread.run_sync(_lock, root)
            node_id = await trio.to_thread.run_sync(_prepare_layout, root)
            disk = cls(root, node_id, capacity_bytes, lock_fd)
            disk.used_bytes, disk.chunk_count = await trio.to_thread.run_sync(
                _scan, root / "chunks"
            )
        except BaseException as exc:
            if lock_fd >= 0:
                os.close(lock_fd)
            if isinstance(exc, OSError):
                raise ChunkfsError(
                    f"cannot use data directory {root}: {exc.strerror or exc}"
                ) from exc
            raise
        log.info(
            "data directory %s: node %s, %d chunks, %d bytes",
            root,
            node_id,
            disk.chunk_count,
            disk.used_bytes,
        )
        return disk

    def close(self) -> None:
        """Give back the directory's lock (another process may then serve it)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def claim(self, cluster_id: str) -> None:
        """Record that this directory belongs to cluster ``cluster_id``, or
        check that it does. Raises ``ConfigError`` when it belongs to another
        (its chunks are not this cluster's: gc would delete them all).
        """
        path = self.root / "cluster_id"
        try:
            held = (await trio.Path(path).read_text()).strip()
        except FileNotFoundError:
            await trio.to_thread.run_sync(_write_durably, self.root, "cluster_id", cluster_id)
            return
        if held != cluster_id:
            raise ConfigError(
                f"data directory {self.root} belongs to cluster {held}, not to this "
                f"filesystem's cluster {cluster_id}: give the node a directory of its own"
            )

    # -------------------------------------------------------------- space

    def _disk(self) -> tuple[int, int]:
        """Size and free space (available to us) of the disk, in bytes."""
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _disk_free(self) -> int:
        return self._disk()[1]

    def _free(self, disk_free: int) -> int:
        room = disk_free
        if self._capacity is not None:
            room = min(room, self._capacity - self.used_bytes)
        return max(0, room - self._reserved)

    async def stats(self) -> Stats:
        """Capacity, used and free bytes, and chunk count, as of now."""
        disk_size, disk_free = await trio.to_thread.run_sync(self._disk)
        capacity = disk_size if self._capacity is None else self._capacity
        return Stats(capacity, self.used_bytes, self._free(disk_free), self.chunk_count)

    @asynccontextmanager
    async def _reservation(self, length: int) -> AsyncIterator[None]:
        """Hold ``length`` bytes of room while they are written; raise ``NodeFull`` if none."""
        disk_free = self._disk_free()  # one statvfs: cheaper than a thread trip
        # No checkpoint between the check and the reservation: concurrent
        # puts see each other's reservations.
        if length > self._free(disk_free):
            raise NodeFull(f"no room for {length} bytes on node {self.node_id}")
        self._reserved += length
        try:
            yield
        finally:
            self._reserved -= length

    # -------------------------------------------------------------- locks

    @asynccontextmanager
    async def _locked(self, chunk_id: str) -> AsyncIterator[None]:
        entry = self._locks.get(chunk_id)
        if entry is None:
            entry = self._locks[chunk_id] = (trio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[chunk_id]

    # -------------------------------------------------------------- paths

    def path(self, chunk_id: str) -> Path:
        """Where chunk ``chunk_id`` lives. Raises ``InvalidArgument`` for a bad id."""
        _check_id(chunk_id)
        return self._chunks / chunk_id[:2] / chunk_id

    def _temp_path(self, chunk_id: str) -> Path:
        return self._tmp / f"{chunk_id}.{secrets.token_hex(8)}"

    # ---------------------------------------------------------------- put

    async def put(self, chunk_id: str, body: AsyncIterable[bytes], length: int) -> bool:
        """Store a chunk streamed from ``body``, which must yield exactly ``length`` bytes.

        Returns True when the chunk was created, False when it was already
        there (then it is not rewritten, only its mtime is moved to now, but
        the body is still read and checked). The chunk is durable (file and
        directory fsynced) when this returns.

        Raises ``InvalidArgument`` (bad id), ``LengthMismatch``,
        ``DigestMismatch`` (nothing stored), ``NodeFull`` (507: over the
        capacity or the disk's free space).
        """
        final = self.path(chunk_id)
        if length < 0:
            raise InvalidArgument("length must not be negative")
        async with self._locked(chunk_id):
            # Touch first: from here on a guarded delete decided earlier is refused.
            if await trio.to_thread.run_sync(_touch, final):
                await self._check_body(chunk_id, body, length)
                return False
            async with self._reservation(length):
                await self._write_new(
                    chunk_id, length, final, lambda out: _stream_into(out, body, length)
                )
            self.used_bytes += length
            self.chunk_count += 1
            return True

    async def _check_body(self, chunk_id: str, body: AsyncIterable[bytes], length: int) -> None:
        """Read and hash a body without storing it (the chunk already exists)."""
        blocks, digest = BlockHasher(), hashlib.sha256()  # either form of id

        def update(piece: bytearray) -> None:
            blocks.update(piece)
            digest.update(piece)

        async with aclosing(_regroup(body, length)) as pieces:
            async for piece in pieces:
                await trio.to_thread.run_sync(update, piece)
        if bytes.fromhex(chunk_id) not in (chunk_id_of(blocks.digests()), digest.digest()):
            raise DigestMismatch(f"body does not match chunk id {chunk_id}")

    async def _write_new(
        self,
        chunk_id: str,
        length: int,
        final: Path,
        fill: Callable[[_ChunkWriter], Awaitable[None]],
        *,
        hash_list: bool = False,
    ) -> None:
        """Write a new chunk of ``length`` bytes, which ``fill`` hands to the
        writer, and keep it if its bytes match the id (as a hash list only,
        with ``hash_list``; else also as the SHA-256 of the bytes, as chunks
        were named before hash lists).
        """
        tmp = self._temp_path(chunk_id)
        fd = await trio.to_thread.run_sync(_create_temp, tmp, length >= DIRECT_MIN)
        try:
            out = _ChunkWriter(fd)
            await fill(out)
            await trio.to_thread.run_sync(out.finish)
            wanted = bytes.fromhex(chunk_id)
            if chunk_id_of(out.blocks.digests()) != wanted and (
                hash_list
                or len(out.blocks.digests()) == 1
                or await trio.to_thread.run_sync(_sha256_of_file, tmp) != wanted
            ):
                raise DigestMismatch(f"body does not match chunk id {chunk_id}")
            # _commit closes the descriptor whatever happens.
            owned, fd = fd, -1
            await trio.to_thread.run_sync(_commit, owned, tmp, final)
        except BaseException:
            # Shielded: a cancelled upload (client gone) must still clean up.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_discard, fd, tmp)
            raise

    async def derive(
        self,
        chunk_id: str,
        length: int,
        base_id: str | None,
        sources: Sequence[Source],
        body: AsyncIterable[bytes],
    ) -> bool:
        """Store a chunk of ``length`` bytes whose blocks (``layout.BLOCK_SIZE``
        bytes, the last one maybe fewer) come from ``sources`` (one per block,
        as ``chunkfs.wire`` describes them): blocks of the chunk ``base_id``
        on this node, blocks of zeros (left as holes in the file), and the
        bytes of ``body`` for the others. So a chunk that changed in a few
        blocks, or is mostly zeros, crosses the network as its other blocks
        only. The id is checked as a hash list of the new chunk's block
        digests (``layout.chunk_id_of``) before it is kept.

        Returns True when created, False when it was there (then only its
        mtime moves, and the body is read and dropped). Raises
        ``InvalidArgument`` (ids, or sources that do not fit ``length``),
        ``ChunkMissing`` (no base chunk here), ``LengthMismatch`` (body),
        ``DigestMismatch`` (nothing stored), ``NodeFull``.
        """
        _check_id(chunk_id)
        if base_id is not None:
            _check_id(base_id)
        sizes = [min(BLOCK_SIZE, length - k) for k in range(0, length, BLOCK_SIZE)]
        if len(sizes) < 2 or len(sources) != len(sizes):
            raise InvalidArgument(f"{len(sources)} block sources for {length} bytes")
        if base_id is None and any(isinstance(src, int) for src in sources):
            raise InvalidArgument("block sources name a base chunk but none was given")
        body_length = sum(n for n, src in zip(sizes, sources, strict=True) if src is BODY)
        pieces = _Pieces(_regroup(body, body_length))
        async with aclosing(pieces.source), self._locked(chunk_id):
            final = self.path(chunk_id)
            if await trio.to_thread.run_sync(_touch, final):
                await pieces.drain()
                return False
            base = -1
            if base_id is not None:
                try:
                    base = await trio.to_thread.run_sync(os.open, self.path(base_id), os.O_RDONLY)
                except FileNotFoundError:
                    await pieces.drain()  # read, so that the connection stays usable
                    raise ChunkMissing(f"base chunk {base_id} not on node {self.node_id}") from None

            async def fill(out: _ChunkWriter) -> None:
                for n, src in zip(sizes, sources, strict=True):
                    if src == ZERO:
                        out.skip(n)
                        continue
                    if isinstance(src, int):
                        data = await trio.to_thread.run_sync(
                            _pread_exact, base, n, src * BLOCK_SIZE
                        )
                    else:
                        data = await pieces.take(n)
                    await trio.to_thread.run_sync(out.write, data)

            try:
                async with self._reservation(length):
                    await self._write_new(chunk_id, length, final, fill, hash_list=True)
            finally:
                if base >= 0:
                    os.close(base)
            self.used_bytes += length
            self.chunk_count += 1
            return True

    async def put_many(self, entries: list[BatchEntry]) -> list[bool]:
        """Store several chunks held in memory, as ``put`` would store each.

        Every digest is checked before anything is written, so a bad chunk
        (``DigestMismatch``, ``InvalidArgument``) stores none. Returns, per
        entry, True if created and False if it already existed; all are
        durable when this returns. Raises ``NodeFull`` when the batch does
        not fit (room is checked for all of it; chunks written before a disk
        full error stay: they are valid).
        """
        for entry in entries:
            _check_id(entry.chunk_id)
        async with AsyncExitStack() as stack:
            # Sorted, so two batches never wait on each other's locks in a cycle.
            for chunk_id in sorted({e.chunk_id for e in entries}):
                await stack.enter_async_context(self._locked(chunk_id))
            return await self._store_verified(entries)
        raise AssertionError("unreachable")

    async def _store_verified(self, entries: list[BatchEntry]) -> list[bool]:
        # One trip to a worker thread for the whole batch: a small file's
        # chunks are many and tiny, so per-chunk trips would dominate. Room is
        # held for every byte of the batch, including chunks already here.
        paths = [(self._temp_path(e.chunk_id), self.path(e.chunk_id)) for e in entries]
        async with self._reservation(sum(len(e.data) for e in entries)):
            created = await trio.to_thread.run_sync(_store_batch, self.root, entries, paths)
        self.used_bytes += sum(len(e.data) for e, new in zip(entries, created, strict=False) if new)
        self.chunk_count += sum(created)
        return created

    # --------------------------------------------------------------- read

    async def open_chunk(self, chunk_id: str) -> ChunkFile:
        """Open a chunk for reading. Raises ``ChunkMissing``, ``InvalidArgument``."""
        path = self.path(chunk_id)
        try:
            fd, size = await trio.to_thread.run_sync(_open_read, path)
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk_id} not on node {self.node_id}") from None
        return ChunkFile(fd, size)

    async def read_many(self, chunk_ids: list[str], max_bytes: int) -> list[bytes | None]:
        """Several whole chunks in one trip to a worker thread (for small
        files), each checked against its id: one that does not match is
        quarantined and comes back as None. Raises ``ChunkMissing`` if any is
        absent, ``InvalidArgument`` for a bad id or when they add up to more
        than ``max_bytes``.
        """
        for chunk_id in chunk_ids:
            _check_id(chunk_id)
        try:
            chunks = await trio.to_thread.run_sync(
                _read_whole, [self.path(c) for c in chunk_ids], max_bytes
            )
        except FileNotFoundError as exc:
            raise ChunkMissing(
                f"chunk {Path(exc.filename).name} not on node {self.node_id}"
            ) from None
        out: list[bytes | None] = []
        for chunk_id, data in zip(chunk_ids, chunks, strict=False):
            if id_matches(bytes.fromhex(chunk_id), data):
                out.append(data)
            else:
                await self.quarantine(chunk_id)
                out.append(None)
        return out

    async def quarantine(self, chunk_id: str) -> None:
        """Move a chunk whose bytes do not match its id out of service, into
        ``DATA/quarantine/`` (kept for inspection, no longer listed or served).
        """
        async with self._locked(chunk_id):
            try:
                size = await trio.to_thread.run_sync(_quarantine, self.path(chunk_id), self.root)
            except FileNotFoundError:
                return
            self.used_bytes -= size
            self.chunk_count -= 1
        log.error("chunk %s does not match its digest: quarantined", chunk_id)

    async def size(self, chunk_id: str) -> int | None:
        """The chunk's length in bytes, or None when it is not here."""
        path = self.path(chunk_id)
        try:
            st = await trio.to_thread.run_sync(os.stat, path)
        except FileNotFoundError:
            return None
        return st.st_size

    # ------------------------------------------------------------- delete

    async def delete(self, chunk_id: str, before_ns: int | None = None) -> None:
        """Delete a chunk; with ``before_ns``, only if its mtime is older than that.

        Raises ``ChunkMissing`` when absent, ``DeleteRefused`` when the guard
        finds it touched at or after ``before_ns`` (a writer re-used it).
        """
        path = self.path(chunk_id)
        async with self._locked(chunk_id):
            try:
                size = await trio.to_thread.run_sync(_unlink_guarded, path, before_ns)
            except FileNotFoundError:
                raise ChunkMissing(f"chunk {chunk_id} not on node {self.node_id}") from None
            self.used_bytes -= size
            self.chunk_count -= 1

    # --------------------------------------------------------------- list

    async def list_ids(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Up to ``limit`` chunk ids greater than ``after``, in ascending order."""
        if after is not None:
            _check_id(after)
        if limit < 1:
            raise InvalidArgument("limit must be at least 1")
        return await trio.to_thread.run_sync(_list_ids, self._chunks, after, limit)


# ------------------------------------------------------------------ helpers
# These run in worker threads.


def _prepare_layout(root: Path) -> str:
    """Make the directories, empty tmp/, and return the node id (made if new)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    chunks, tmp = root / "chunks", root / "tmp"
    chunks.mkdir(mode=0o700, exist_ok=True)
    tmp.mkdir(mode=0o700, exist_ok=True)
    for sub in _FANOUT:
        (chunks / sub).mkdir(mode=0o700, exist_ok=True)
    fsync_dir(chunks)
    removed = 0
    for entry in os.scandir(tmp):
        # Anything here is an upload that never finished: it was never acknowledged.
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            os.unlink(entry.path)
            removed += 1
    if removed:
        log.info("removed %d unfinished uploads from %s", removed, tmp)
    node_id = _read_or_make_node_id(root)
    fsync_dir(root)
    return node_id


def _lock(root: Path) -> int:
    """Make ``root`` and lock its lock file (flock, held until the descriptor
    closes). Raises ``ChunkfsError`` when another process holds it.
    """
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ChunkfsError(f"data directory {root} is in use by another node process") from None
    return fd


def _write_durably(root: Path, name: str, text: str) -> None:
    """Write ``root/name`` whole (temp file, fsync, rename, fsync the directory)."""
    tmp = root / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, root / name)
    fsync_dir(root)


def _read_or_make_node_id(root: Path) -> str:
    path = root / "node_id"
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = secrets.token_hex(8)
        _write_durably(root, "node_id", node_id)
        return node_id
    if not _NODE_ID_RE.match(node_id):
        raise ChunkfsError(f"{path} does not hold a node id (16 lowercase hex digits)")
    return node_id


def _scan(chunks: Path) -> tuple[int, int]:
    used = count = 0
    for sub in _FANOUT:
        for entry in os.scandir(chunks / sub):
            if not (is_valid_id(entry.name) and entry.name.startswith(sub)):
                log.warning("ignoring stray file %s", entry.path)
                continue
            used += entry.stat(follow_symlinks=False).st_size
            count += 1
    return used, count


def _create_temp(tmp: Path, direct: bool = False) -> int:
    """Create ``tmp`` for writing, with O_DIRECT when ``direct`` and the
    filesystem allows it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(tmp, flags | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(tmp, flags, 0o600)


def _write_all(fd: int, data: bytes | bytearray | mmap.mmap) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            if _no_room(exc):
                raise NodeFull("disk full") from exc
            raise
        view = view[n:]


class _ChunkWriter:
    """Appends a streamed chunk to a new file and hashes it (its block
    digests in ``blocks``). On an O_DIRECT descriptor the bytes go through one
    page-aligned buffer of ``PIECE_SIZE`` bytes, written whenever full; the
    unaligned tail goes buffered in ``finish``. Raises ``NodeFull``, OSError.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.length = 0  # bytes written or skipped
        self.blocks = BlockHasher()
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        self._buf = mmap.mmap(-1, PIECE_SIZE) if direct else None
        self._fill = 0

    def write(self, data: bytes | bytearray) -> None:
        """Hash and append ``data``."""
        self.blocks.update(data)
        self.length += len(data)
        if self._buf is None:
            _write_all(self.fd, data)
            return
        view = memoryview(data)
        while view:
            n = min(len(view), PIECE_SIZE - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == PIECE_SIZE:
                _write_all(self.fd, self._buf)
                self._fill = 0

    def skip(self, n: int) -> None:
        """Append ``n`` zero bytes as a hole: a whole block (or the last,
        shorter one) at a block boundary. Raises ValueError elsewhere.
        """
        if self.length % BLOCK_SIZE or self._fill:
            raise ValueError("a hole must start on a block boundary")
        self.blocks.add(zero_digest(n))
        os.lseek(self.fd, n, os.SEEK_CUR)
        self.length += n

    def finish(self) -> None:
        """Write what is buffered (the file ends at ``length``, after any
        trailing hole); the descriptor stays open.
        """
        if self._buf is None:
            os.ftruncate(self.fd, self.length)
            return
        if self._fill:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            _write_all(self.fd, self._buf[: self._fill])
        self._buf.close()
        self._buf = None
        os.ftruncate(self.fd, self.length)


def _commit(fd: int, tmp: Path, final: Path) -> None:
    """Make a written temp file the chunk: mtime now, fsync, rename, fsync the directory."""
    try:
        now = time.time_ns()
        os.utime(fd, ns=(now, now))
        os.fsync(fd)
    except OSError as exc:
        if _no_room(exc):
            raise NodeFull("disk full") from exc
        raise
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(final.parent)


async def _stream_into(out: _ChunkWriter, body: AsyncIterable[bytes], length: int) -> None:
    """Hand ``body`` (exactly ``length`` bytes) to ``out`` in pieces of about ``PIECE_SIZE``."""
    async with aclosing(_regroup(body, length)) as pieces:
        async for piece in pieces:
            await trio.to_thread.run_sync(out.write, piece)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; InvalidArgument when the file ends first."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise InvalidArgument("the base chunk is shorter than the blocks taken from it")
    return data


class _Pieces:
    """Exact-length reads from an async stream of pieces."""

    def __init__(self, source: AsyncGenerator[bytearray, None]) -> None:
        self.source = source
        self._buf = bytearray()

    async def take(self, n: int) -> bytes:
        """The next ``n`` bytes. Raises ``LengthMismatch`` when the stream ends first."""
        while len(self._buf) < n:
            try:
                self._buf += await self.source.__anext__()
            except StopAsyncIteration:
                raise LengthMismatch(n, len(self._buf)) from None
        data, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return data

    async def drain(self) -> None:
        """Read the rest of the stream (its length is still enforced)."""
        async for _ in self.source:
            pass


def _sha256_of_file(path: Path) -> bytes:
    """The SHA-256 of a file's bytes (read through a descriptor of its own:
    the writer's may be O_DIRECT).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(PIECE_SIZE):
            digest.update(piece)
    return digest.digest()


def _discard(fd: int, tmp: Path) -> None:
    if fd >= 0:
        os.close(fd)
    with suppress(FileNotFoundError):
        os.unlink(tmp)


def _store_bytes(tmp: Path, final: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write one whole chunk: temp file, fsync (unless the caller syncs the
    whole filesystem), rename (the caller makes the rename durable).
    """
    fd = _create_temp(tmp)
    try:
        _write_all(fd, data)
        now = time.time_ns()
        os.utime(fd, ns=(now, now))
        if fsync:
            os.fsync(fd)
    except BaseException:
        _discard(fd, tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)


def _store_batch(
    root: Path, entries: list[BatchEntry], paths: list[tuple[Path, Path]]
) -> list[bool]:
    """Store whole chunks at their ``(temp, final)`` paths: every digest is
    checked first (a bad one stores nothing, ``DigestMismatch``), chunks
    already here are touched, the others written and made durable. Returns,
    per entry, whether it was created (an id named twice is created once).
    """
    for e in entries:
        if not id_matches(bytes.fromhex(e.chunk_id), e.data):
            raise DigestMismatch(f"body does not match chunk id {e.chunk_id}")
    created, new = [], {}
    for e, (tmp, final) in zip(entries, paths, strict=False):
        fresh = e.chunk_id not in new and not _touch(final)
        if fresh:
            new[e.chunk_id] = (tmp, final, e.data)
        created.append(fresh)
    if new:
        _store_all(root, list(new.values()))
    return created


def _store_all(root: Path, stored: list[tuple[Path, Path, bytes]]) -> None:
    """Store whole chunks ``(temp, final, bytes)`` and make them durable.

    With syncfs(2) (Linux), the files are written and renamed without a sync
    each, then the filesystem holding ``root`` is synced once: one journal
    commit for the batch instead of two flushes per chunk, which is what a
    small file's chunks cost. Elsewhere: fsync each file, then each directory.
    """
    if syncfs is None:
        dirs = set()
        try:
            for tmp, final, data in stored:
                _store_bytes(tmp, final, data)
                dirs.add(final.parent)
        finally:
            for d in dirs:
                fsync_dir(d)
        return
    try:
        for tmp, final, data in stored:
            _store_bytes(tmp, final, data, fsync=False)
    finally:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)


def _read_whole(paths: list[Path], max_bytes: int) -> list[bytes]:
    out, total = [], 0
    for path in paths:
        data = path.read_bytes()
        total += len(data)
        if total > max_bytes:
            raise InvalidArgument(f"chunks add up to more than {max_bytes} bytes")
        out.append(data)
    return out


def _open_read(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def _unlink_guarded(path: Path, before_ns: int | None) -> int:
    """Unlink ``path`` and return its size; refuse if touched at/after ``before_ns``."""
    st = os.stat(path)
    if before_ns is not None and st.st_mtime_ns >= before_ns:
        raise DeleteRefused(
            f"chunk {path.name} was used at {st.st_mtime_ns} ns, not before {before_ns}"
        )
    os.unlink(path)
    fsync_dir(path.parent)
    return st.st_size


def _list_ids(chunks: Path, after: str | None, limit: int) -> list[str]:
    found: list[str] = []
    first = after[:2] if after else "00"
    for sub in _FANOUT:
        if sub < first:
            continue
        names = sorted(
            n
            for n in os.listdir(chunks / sub)
            if is_valid_id(n) and n.startswith(sub) and (after is None or n > after)
        )
        found.extend(names[: limit - len(found)])
        if len(found) >= limit:
            break
    return found


async def _regroup(body: AsyncIterable[bytes], length: int) -> AsyncGenerator[bytearray, None]:
    """Re-cut a body into pieces of about ``PIECE_SIZE``; enforce its declared length."""
    buf = bytearray()
    received = 0
    async for data in body:
        received += len(data)
        if received > length:
            raise LengthMismatch(length, received)
        buf += data
        if len(buf) >= PIECE_SIZE:
            yield buf
            buf = bytearray()
    if received != length:
        raise LengthMismatch(length, received)
    if buf:
        yield buf


def _quarantine(path: Path, root: Path) -> int:
    where = root / "quarantine"
    where.mkdir(mode=0o700, exist_ok=True)
    size = path.stat().st_size
    os.rename(path, where / path.name)
    return size
