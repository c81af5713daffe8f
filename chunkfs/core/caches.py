"""One cache type for what the filesystem core trusts for a while.

``TtlCache`` is a bounded map whose entries expire a fixed time after they
were put, least recently used out first beyond its size: cachetools'
``TLRUCache`` underneath, with each entry carrying its own deadline so that
``refresh`` can change a value without extending the time it is trusted
(cachetools' ``TTLCache`` restarts the clock on every store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import TLRUCache

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class _Entry(Generic[V]):
    value: V
    deadline: float


class TtlCache(Generic[K, V]):
    """At most ``maxsize`` entries, each trusted for ``ttl`` seconds of
    ``timer`` (default: the monotonic clock) after it was put.
    """

    def __init__(
        self, ttl: float, maxsize: int = 10_000, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._timer = timer
        self._entries: TLRUCache[K, _Entry[V]] = TLRUCache(
            maxsize, lambda key, entry, now: entry.deadline, timer
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value of ``key`` while it is trusted, else None."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def put(self, key: K, value: V) -> V:
        """Trust ``value`` for ``key`` for the next ``ttl`` seconds; return it."""
        self._entries[key] = _Entry(value, self._timer() + self.ttl)
        return value

    def refresh(self, key: K, change: Callable[[V], V]) -> None:
        """Replace a trusted value with ``change(value)``, trusted no longer
        than the value it replaces; nothing when ``key`` is not trusted.
        """
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = _Entry(change(entry.value), entry.deadline)

    def pop(self, key: K) -> None:
        """Stop trusting ``key``."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Stop trusting anything."""
        self._entries.clear()
