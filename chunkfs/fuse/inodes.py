"""What the kernel holds of each inode: lookup counts and cached copies.

The kernel holds a reference to an inode for every lookup-like reply
(lookup, create, mkdir, mknod, symlink, link, and each readdirplus entry but
"." and "..") and returns them with ``forget``. An inode that has lost its
last name may be purged only once the kernel has forgotten it. It also
caches an inode's attributes (for attr_timeout) and its pages (kept across
opens when the reply to open says keep_cache); ``KernelCache`` remembers
which version of each it was given, to know when to drop them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class LookupCounts:
    """How many references the kernel holds to each inode number."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()

    def add(self, ino: int, n: int = 1) -> None:
        """The kernel took ``n`` more references to ``ino``."""
        self._counts[ino] += n

    def forget(self, pairs: Iterable[tuple[int, int]]) -> list[int]:
        """Drop ``(ino, n)`` references; return the inodes now unreferenced.
        Never raises: a count that would go negative is logged and cleared.
        """
        gone = []
        for ino, n in pairs:
            left = self._counts[ino] - n
            if left < 0:
                log.warning("kernel forgot inode %d more often than it looked it up", ino)
            if left <= 0:
                del self._counts[ino]
                gone.append(ino)
            else:
                self._counts[ino] = left
        return gone

    def __getitem__(self, ino: int) -> int:
        return self._counts.get(ino, 0)


@dataclass
class Given:
    """What the kernel was last given of one inode: the content version and
    mode in its cached attributes, and the version its cached pages hold
    (None: none it may keep).
    """

    attrs_version: int = -1
    mode: int = 0
    pages_version: int | None = None


class KernelCache:
    """Per inode, the versions of what the kernel caches (see ``Given``)."""

    def __init__(self) -> None:
        self._given: dict[int, Given] = {}

    def get(self, ino: int) -> Given:
        """What the kernel holds of ``ino`` (nothing known: an empty ``Given``)."""
        return self._given.get(ino) or Given()

    def gave_attrs(self, ino: int, version: int, mode: int) -> None:
        """The kernel now caches attributes of content ``version`` and ``mode``."""
        g = self._given.setdefault(ino, Given())
        g.attrs_version, g.mode = version, mode

    def gave_pages(self, ino: int, version: int | None) -> None:
        """The kernel's pages of ``ino`` now hold ``version`` (None: unknown)."""
        self._given.setdefault(ino, Given()).pages_version = version

    def forget(self, ino: int) -> None:
        """The kernel no longer holds ``ino``."""
        self._given.pop(ino, None)
