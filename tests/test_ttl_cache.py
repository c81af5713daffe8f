"""The core's one cache type: expiry, refresh without extension, LRU bound."""

from __future__ import annotations

from chunkfs.core.caches import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_ttl_seconds_after_they_were_put() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(1.0, timer=clock)
    assert cache.put("a", 1) == 1
    clock.now += 0.9
    assert cache.get("a") == 1
    cache.put("b", 2)
    clock.now += 0.2
    assert cache.get("a") is None and "a" not in cache
    assert cache.get("b") == 2


def test_refresh_changes_a_value_but_not_how_long_it_is_trusted() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(1.0, timer=clock)
    cache.put("a", 1)
    clock.now += 0.5
    cache.refresh("a", lambda v: v + 1)
    cache.refresh("missing", lambda v: v + 1)
    assert cache.get("a") == 2 and cache.get("missing") is None
    clock.now += 0.6
    assert cache.get("a") is None


def test_the_least_recently_used_entry_goes_beyond_maxsize() -> None:
    cache: TtlCache[int, int] = TtlCache(60.0, maxsize=3, timer=Clock())
    for i in range(3):
        cache.put(i, i)
    assert cache.get(0) == 0  # 1 is now the least recently used
    cache.put(3, 3)
    assert [k for k in range(4) if k in cache] == [0, 2, 3]
    cache.pop(0)
    cache.pop(42)
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
