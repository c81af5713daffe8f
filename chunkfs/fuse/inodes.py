"""Kernel lookup counts.

The kernel holds a reference to an inode for every lookup-like reply
(lookup, create, mkdir, mknod, symlink, link, and each readdirplus entry but
"." and "..") and returns them with ``forget``. An inode that has lost its
last name may be purged only once the kernel has forgotten it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

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
