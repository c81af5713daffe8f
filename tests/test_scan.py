"""Directory read-ahead's choices, without PostgreSQL or nodes (the batches
are fetched for real in test_core)."""

from __future__ import annotations

import stat

from chunkfs.core import scan
from chunkfs.core.scan import DirectoryScans
from chunkfs.meta import Attrs, DirEntry, Ino


def entry(ino: int, size: int, mode: int = stat.S_IFREG | 0o644) -> DirEntry:
    attrs = Attrs(Ino(ino), mode, 0, 0, 1, size, 0, 0, 0, 0, 1)
    return DirEntry(b"f%d" % ino, attrs, cookie=ino)


def scans() -> DirectoryScans:
    return DirectoryScans(None, None)  # type: ignore[arg-type]  # run() is not called here


def test_batches_start_at_the_second_cold_open_and_take_the_next_small_files():
    s = scans()
    page = [entry(10, 100), entry(11, 0), entry(12, scan.SCAN_FILE_MAX + 1)]
    page += [entry(13, 100, stat.S_IFDIR | 0o755), entry(14, 100, stat.S_IFLNK | 0o777)]
    page += [entry(ino, 100) for ino in range(20, 20 + scan.SCAN_FILES + 5)]
    s.listed(Ino(1), page, first_page=True)
    assert s.opened_cold(Ino(10)) == []  # one open says nothing of the next
    # Empty, large, directories and symlinks are left out; the file opened too.
    assert s.opened_cold(Ino(20)) == [10, *range(21, 20 + scan.SCAN_FILES)]
    assert s.opened_cold(Ino(25)) == list(range(20 + scan.SCAN_FILES, 25 + scan.SCAN_FILES))
    assert s.opened_cold(Ino(26)) == []  # the listing is used up
    assert s.opened_cold(Ino(999)) == []  # never listed


def test_a_batch_stops_at_its_bytes():
    s = scans()
    big = scan.SCAN_FILE_MAX
    s.listed(Ino(1), [entry(ino, big) for ino in range(10, 20)], first_page=True)
    s.opened_cold(Ino(10))
    fit = scan.SCAN_BYTES // big
    assert s.opened_cold(Ino(11)) == [10, *range(12, 11 + fit)]  # the file opened left out


def test_listings_are_remembered_up_to_a_bound_and_start_afresh_on_the_first_page():
    s = scans()
    n = scan.FILES_KEPT // 2
    s.listed(Ino(1), [entry(ino, 1) for ino in range(10, 10 + n)], first_page=True)
    s.listed(Ino(2), [entry(ino, 1) for ino in range(10**6, 10**6 + n)], first_page=True)
    # Directory 1, listed least recently, made room for directory 2.
    for ino in (10, 11):
        assert s.opened_cold(Ino(ino)) == []
    assert s.opened_cold(Ino(10**6)) == []
    assert len(s.opened_cold(Ino(10**6 + 1))) == scan.SCAN_FILES
    # One directory larger than the bound keeps its first files only.
    s.listed(
        Ino(3), [entry(ino, 1) for ino in range(2 * 10**6, 2 * 10**6 + 2 * n)], first_page=True
    )
    total = sum(len(listing.files) for listing in s._listings.values())
    assert total < scan.FILES_KEPT
    # Listed again from the start: batches start again too.
    s.listed(Ino(2), [entry(10**6 + k, 1) for k in range(40)], first_page=True)
    s.opened_cold(Ino(10**6))
    assert s.opened_cold(Ino(10**6 + 1)) == [10**6, *range(10**6 + 2, 10**6 + scan.SCAN_FILES + 1)]
