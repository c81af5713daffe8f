"""The mount's local content cache on a real cluster: what one mount closed
it reads back from its own disk (nodes not needed), never a stale version,
nothing trusted after a crash, nothing kept with ``cache_size=0``; blocks
another mount's file was read at are kept for the next read.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import cluster as cl

MiB = 1 << 20
T = TypeVar("T")


def content_entries(m: cl.Mount) -> list[str]:
    """The cached contents (by SHA-256) in the mount's cache directory."""
    assert m.cache_dir is not None
    d = m.cache_dir / "content"
    return sorted(n for n in os.listdir(d) if len(n) == 64) if d.exists() else []


def within(read: Callable[[], T], seconds: float) -> T | None:
    """What ``read()`` returns, or None when it took longer than ``seconds``."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(read()), daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


def test_a_remount_reads_its_closed_files_from_local_disk(cluster, mount_factory):
    m = mount_factory(cluster.dsn)
    files = {"small": os.urandom(5000), "big": os.urandom(20 * MiB + 3), "empty": b""}
    for name, data in files.items():
        (m / name).write_bytes(data)
    # Kept at release (after close returns); the empty file has nothing to keep.
    cl.wait_until(lambda: len(content_entries(m)) == 2, 10, "two cached contents", 0.05)
    m.unmount()
    m.mount()  # a clean unmount: the entries are trusted again
    other = mount_factory(cluster.dsn)
    (other / "small").write_bytes(b"changed elsewhere")
    assert (m / "small").read_bytes() == b"changed elsewhere"  # not the cached old version
    for node in cluster.nodes:
        os.kill(node.pid, signal.SIGSTOP)
    try:
        assert within((m / "big").read_bytes, 20) == files["big"]
        assert (m / "empty").read_bytes() == b""
    finally:
        for node in cluster.nodes:
            os.kill(node.pid, signal.SIGCONT)


def test_nothing_cached_is_trusted_after_a_crash(cluster, mount_factory):
    m = mount_factory(cluster.dsn)
    data = os.urandom(3 * MiB)
    (m / "crashed").write_bytes(data)
    # The spool is kept at release, which the kernel sends after close returns.
    cl.wait_until(lambda: content_entries(m), 10, "the content to be cached", 0.05)
    for pid in m.pids:
        os.kill(pid, signal.SIGKILL)
    m.unmount()
    m.mount()
    assert content_entries(m) == []
    assert (m / "crashed").read_bytes() == data  # from the nodes


def test_cache_size_zero_keeps_nothing(cluster, mount_factory):
    m = mount_factory(cluster.dsn, ["cache_size=0"])
    (m / "f").write_bytes(os.urandom(MiB))
    assert content_entries(m) == []
    assert (m / "f").stat().st_size == MiB


def test_blocks_read_at_random_are_kept_for_the_next_mount(cluster, mount_factory):
    writer = mount_factory(cluster.dsn)
    data = os.urandom(64 * MiB)  # chunks of 16 MiB: read a window at a time
    (writer / "big").write_bytes(data)
    reader = mount_factory(cluster.dsn)
    offsets = [50 * MiB + 100, 5 * MiB + 7, 33 * MiB]  # out of order
    with open(reader / "big", "rb") as f:
        for off in offsets:
            assert os.pread(f.fileno(), 4096, off) == data[off : off + 4096]
    kept = set(content_entries(reader))
    for off in offsets:
        block = off // MiB
        assert hashlib.sha256(data[block * MiB : (block + 1) * MiB]).hexdigest() in kept
    reader.unmount()
    reader.mount()  # a clean unmount: the kept blocks are trusted again
    for node in cluster.nodes:
        os.kill(node.pid, signal.SIGSTOP)
    try:

        def read_kept() -> list[bytes]:
            with open(reader / "big", "rb") as f:
                return [os.pread(f.fileno(), 4096, off) for off in offsets]

        assert within(read_kept, 20) == [data[off : off + 4096] for off in offsets]
    finally:
        for node in cluster.nodes:
            os.kill(node.pid, signal.SIGCONT)
