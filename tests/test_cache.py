"""The local content cache on its own: adopt, read, evict, crash safety."""

from __future__ import annotations

import hashlib
import os

from chunkfs.core.content_cache import ContentCache, short_of_room


def held(cache: ContentCache, digest: bytes) -> bool:
    """Whether the cache holds the content ``digest``."""
    return cache.pread(digest, 0, 0) is not None


def bytes_on_disk(directory) -> int:
    """Bytes of the cache's entries (files named by a SHA-256) in ``directory``."""
    return sum(p.stat().st_size for p in directory.iterdir() if len(p.name) == 64)


def _spool(tmp_path, data: bytes) -> tuple[int, bytes]:
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.pwrite(fd, data, 0)
    return fd, hashlib.sha256(data).digest()


def test_adopted_content_is_read_back(tmp_path):
    cache = ContentCache(str(tmp_path / "c"), 1 << 20)
    fd, digest = _spool(tmp_path, b"hello world")
    assert cache.adopt(fd, digest, 11)
    os.close(fd)
    assert held(cache, digest) and bytes_on_disk(tmp_path / "c") == 11
    assert cache.pread(digest, 6, 5) == b"world"
    assert cache.pread(hashlib.sha256(b"other").digest(), 0, 5) is None
    cache.close()


def test_oldest_entries_go_over_budget(tmp_path):
    cache = ContentCache(str(tmp_path / "c"), 250)
    digests = []
    for i in range(3):
        fd, digest = _spool(tmp_path, bytes([i]) * 100)
        cache.adopt(fd, digest, 100)
        os.close(fd)
        digests.append(digest)
        if i == 1:
            cache.pread(digests[0], 0, 1)  # the first is now the most recently used
    assert held(cache, digests[0]) and held(cache, digests[2]) and not held(cache, digests[1])
    assert bytes_on_disk(tmp_path / "c") == 200
    assert not (tmp_path / "c" / digests[1].hex()).exists()
    cache.close()


def test_a_zero_budget_keeps_nothing(tmp_path):
    cache = ContentCache(str(tmp_path / "c"), 0)
    fd, digest = _spool(tmp_path, b"x")
    assert not cache.adopt(fd, digest, 1)
    os.close(fd)
    assert not held(cache, digest)
    cache.close()


def test_entries_survive_a_clean_close_only(tmp_path):
    d = str(tmp_path / "c")
    cache = ContentCache(d, 1 << 20)
    fd, digest = _spool(tmp_path, b"kept")
    cache.adopt(fd, digest, 4)
    os.close(fd)
    cache.close()
    again = ContentCache(d, 1 << 20)
    assert again.pread(digest, 0, 4) == b"kept"
    assert not os.path.exists(os.path.join(d, "clean"))  # removed while in use
    # No close: as after a crash. The next owner trusts nothing.
    os.close(again._lock_fd)
    third = ContentCache(d, 1 << 20)
    assert not held(third, digest) and bytes_on_disk(tmp_path / "c") == 0
    assert not os.path.exists(os.path.join(d, digest.hex()))
    third.close()


def test_one_owner_at_a_time(tmp_path):
    d = str(tmp_path / "c")
    first = ContentCache(d, 1 << 20)
    second = ContentCache(d, 1 << 20)
    fd, digest = _spool(tmp_path, b"x")
    assert not second.adopt(fd, digest, 1)
    assert first.adopt(fd, digest, 1)
    os.close(fd)
    second.close()
    first.close()


def test_room_is_short_under_a_tenth_of_the_disk_or_one_gib():
    gib = 1 << 30
    assert not short_of_room(22 * gib, 260 * gib)  # 8.5 % available, plenty of room
    assert short_of_room(gib // 2, 260 * gib)
    assert short_of_room(gib // 2, 10 * gib)  # a small disk keeps a tenth
    assert not short_of_room(2 * gib, 10 * gib)
