"""Directory read-ahead: the small files of a directory that a reader goes
through one by one (``diff -r``, ``cp -r``, ``tar``, ``grep -r``) are fetched
a batch at a time, before it opens them.

Sequential read-ahead inside a file cannot help a small file: a cold one
costs a request to a node per open. When a second file of one listed
directory has to be read from the nodes, the reader is taken to be going
through the directory, and the next small files of its listing (at most
``SCAN_FILES`` of them, ``SCAN_BYTES`` in all) have their chunk maps
fetched in one statement and their chunks in one batch request per node;
each further cold open in that directory fetches the next batch. The
chunks land in the store's memory cache, which is keyed by chunk id and
verified on arrival, so a file changed meanwhile is read in its new
version all the same (its open still fetches its chunk map): a stale
guess costs only the bytes fetched.
"""

from __future__ import annotations

import contextlib
import logging
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache

from .. import errors
from ..meta import Content, DirEntry, Ino
from ..store import ChunkStore

log = logging.getLogger(__name__)

# Files larger than this are left to the read-ahead inside a file (bytes).
SCAN_FILE_MAX = 1 << 20
# One batch: at most this many files and about this many bytes.
SCAN_FILES = 32
SCAN_BYTES = 4 << 20
# Cold opens in one directory before its files are read ahead: one alone
# says nothing of the next.
SCAN_AFTER = 2
# Small files remembered from listings, in all (the least recently listed
# directories are forgotten first), and batches waiting.
FILES_KEPT = 1 << 16
_WAITING = 8


@dataclass
class _Listing:
    """The small files of one directory in listing order (inode, size in
    bytes), how far batches have reached, and the cold opens seen in it.
    """

    files: list[tuple[Ino, int]] = field(default_factory=list)
    reached: int = 0
    cold_opens: int = 0


class DirectoryScans:
    """Reads ahead the small files of directories being gone through.

    ``listed`` learns each directory's files from its listing, ``opened_cold``
    hears of each open of a small file that the nodes must serve, and
    ``run`` (a background task, until cancelled) fetches the batches.
    """

    def __init__(self, content: Content, store: ChunkStore) -> None:
        self._content = content
        self._store = store
        self._listings: LRUCache[Ino, _Listing] = LRUCache(
            FILES_KEPT, getsizeof=lambda listing: len(listing.files) + 1
        )
        self._parents: LRUCache[Ino, Ino] = LRUCache(FILES_KEPT)
        self._send, self._receive = trio.open_memory_channel[list[Ino]](_WAITING)

    def listed(self, parent: Ino, entries: Sequence[DirEntry], *, first_page: bool) -> None:
        """A page of directory ``parent``'s listing was served; the first
        page starts the listing afresh. At most ``FILES_KEPT`` files are
        remembered in all: a directory with more has only its first ones.
        """
        listing = self._listings.get(parent)
        if first_page or listing is None:
            listing = _Listing()
        for e in entries:
            a = e.attrs
            if len(listing.files) >= FILES_KEPT - 1:
                break
            if stat.S_ISREG(a.mode) and 0 < a.size <= SCAN_FILE_MAX:
                listing.files.append((a.ino, a.size))
                self._parents[a.ino] = parent
        self._listings[parent] = listing  # its new size makes older listings go

    def opened_cold(self, ino: Ino) -> list[Ino]:
        """A small file was opened whose bytes only the nodes have: from the
        second such open in its directory on, queue the next batch of the
        directory's small files (a full queue drops it). Returns the batch
        (empty: none).
        """
        parent = self._parents.get(ino)
        listing = None if parent is None else self._listings.get(parent)
        if listing is None:
            return []
        listing.cold_opens += 1
        if listing.cold_opens < SCAN_AFTER:
            return []
        batch: list[Ino] = []
        size = 0
        while (
            listing.reached < len(listing.files) and len(batch) < SCAN_FILES and size < SCAN_BYTES
        ):
            other, other_size = listing.files[listing.reached]
            listing.reached += 1
            if other != ino:
                batch.append(other)
                size += other_size
        # A full queue: the reader is ahead of the batches, which would come too late.
        if batch:
            with contextlib.suppress(trio.WouldBlock):
                self._send.send_nowait(batch)
        return batch

    async def run(self) -> None:
        """Fetch the queued batches, one at a time, until cancelled; a batch
        that fails is dropped (the files' reads fetch their own chunks).
        """
        async for batch in self._receive:
            try:
                maps = await self._content.chunk_maps(batch)
                await self._store.prefetch([c for m in maps for c in m.chunks])
            except errors.ChunkfsError as exc:
                log.info("directory read-ahead of %d files failed: %s", len(batch), exc)
