"""End to end on a real FUSE mount: real PostgreSQL, six real node processes."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import stat
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import cluster as cl
from chunkfs import layout

MiB = 1 << 20
MOUNT8_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def info(path: Path) -> dict:
    return cl.chunkfs_json("info", str(path), "--json")


def assert_six_chunks(path: Path, data: bytes, cluster: cl.Cluster) -> dict:
    """The file's chunk map tiles its bytes in six chunks, each on two live nodes."""
    report = info(path)
    assert report["size"] == len(data)
    chunks = report["chunks"]
    # (A chunk of zeros only, which random bytes sometimes are, is a hole: no object.)
    ids = [layout.HOLE if c["hole"] else bytes.fromhex(c["sha256"]) for c in chunks]
    assert report["digest"] == layout.file_digest(len(data), ids).hex()
    assert [c["index"] for c in chunks] == list(range(6))
    node_ids = {n.node_id for n in cluster.nodes}
    offset = 0
    for c in chunks:
        piece = data[c["offset"] : c["offset"] + c["length"]]
        assert c["offset"] == offset and len(piece) == c["length"]
        if c["hole"]:
            assert piece and piece == bytes(len(piece)) and c["sha256"] is None
        else:
            assert c["sha256"] == layout.chunk_id_of(layout.block_digests(piece)).hex()
            assert len(set(c["nodes"])) == 2 and set(c["nodes"]) <= node_ids
        offset += c["length"]
    assert offset == len(data)
    return report


def diff_r(a: Path, b: Path) -> None:
    proc = subprocess.run(
        ["diff", "-r", "--no-dereference", str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def make_tree(root: Path) -> Path:
    """A small tree with nested dirs, empty and binary files, a symlink, an xattr."""
    src = root / "src"
    for d in range(4):
        sub = src / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(6):
            (sub.parent / f"file{f}.txt").write_text(f"{d}-{f}\n" * (f * 50))
        (sub / "blob.bin").write_bytes(os.urandom(70_000 + d))
    (src / "empty").write_bytes(b"")
    (src / "link").symlink_to("dir0/file1.txt")
    (src / "name with spaces\tand tab").write_text("x")
    os.setxattr(src / "dir1" / "file2.txt", "user.note", b"kept")
    return src


@pytest.mark.parametrize("size", [0, 1, 5, 6, 7, MiB, 64 * MiB + 3])
def test_files_read_back_byte_for_byte_in_six_chunks(mounted, cluster, size):
    data = os.urandom(size)
    path = mounted / f"f{size}"
    path.write_bytes(data)
    assert path.stat().st_size == size
    assert path.read_bytes() == data
    if size == 0:
        assert info(path)["chunks"] == []
        return
    report = assert_six_chunks(path, data, cluster)
    # (Empty chunks are one object that every file shares: left out.)
    holders = {n for c in report["chunks"] if c["length"] for n in c["nodes"]}
    if size > 6 * 256 * 1024:
        assert len(holders) >= 3, holders  # a large file's chunks spread over the nodes
    elif size >= 6 * 16:  # (chunks of a few bytes may be objects other files made)
        assert len(holders) == 2, holders  # a small file's chunks share their R nodes


def test_a_chunk_of_zeros_only_is_a_hole_that_reads_back_as_zeros(mounted, cluster):
    unit = layout.MIN_UNIT  # six chunks of one unit each: 0 and 3 are zeros
    data = bytes(unit) + os.urandom(2 * unit) + bytes(unit) + os.urandom(2 * unit)
    path = mounted / "zeros"
    path.write_bytes(data)
    assert path.read_bytes() == data
    report = assert_six_chunks(path, data, cluster)
    assert [c["hole"] for c in report["chunks"]] == [True, False, False, True, False, False]
    assert all(c["nodes"] == [] for c in report["chunks"] if c["hole"])


def test_cp_rsync_and_tar_copies_are_identical(mounted, cluster, tmp_path):
    src = make_tree(tmp_path)
    subprocess.run(["cp", "-a", str(src), str(mounted / "cp")], check=True, timeout=300)
    diff_r(src, mounted / "cp")
    assert os.getxattr(mounted / "cp" / "dir1" / "file2.txt", "user.note") == b"kept"
    subprocess.run(["rsync", "-aX", f"{src}/", str(mounted / "rsync")], check=True, timeout=300)
    diff_r(src, mounted / "rsync")
    assert os.getxattr(mounted / "rsync" / "dir1" / "file2.txt", "user.note") == b"kept"
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="src")
    (mounted / "tar").mkdir()
    subprocess.run(
        ["tar", "-xf", str(archive), "-C", str(mounted / "tar")], check=True, timeout=300
    )
    diff_r(src, mounted / "tar" / "src")
    # A second rsync finds nothing to send: sizes and mtimes were kept.
    out = subprocess.run(
        ["rsync", "-ai", f"{src}/", str(mounted / "rsync")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert out.strip() == "", out
    blob = (src / "dir3" / "nested" / "blob.bin").read_bytes()
    assert_six_chunks(mounted / "cp" / "dir3" / "nested" / "blob.bin", blob, cluster)


def test_stat_reports_one_request_as_the_preferred_io_size(mounted):
    # cp, cat and stdio size their buffers by st_blksize: 1 MiB (max_write)
    # makes a large cp one FUSE write per MiB instead of eight.
    (mounted / "f").write_bytes(b"x")
    assert os.stat(mounted / "f").st_blksize == 1 << 20
    assert os.stat(mounted).st_blksize == 1 << 20


def test_the_kernel_reads_ahead_one_request_once_the_mount_is_ready(cluster, mount_factory):
    # Sequential reads then come in requests of 1 MiB, not 128 KiB. A file
    # keeps the read-ahead it was opened with, so it is set before the mount
    # command returns.
    m = mount_factory(cluster.dsn)
    with open("/proc/self/mountinfo") as mountinfo:
        device = next(line.split()[2] for line in mountinfo if line.split()[4] == str(m.path))
    assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"


def test_rename_over_an_existing_file_is_atomic(mounted):
    (mounted / "old").write_bytes(b"old content")
    (mounted / "new").write_bytes(b"new content")
    os.rename(mounted / "new", mounted / "old")
    assert (mounted / "old").read_bytes() == b"new content"
    assert not (mounted / "new").exists()
    (mounted / "d1").mkdir()
    (mounted / "d2").mkdir()
    (mounted / "d2" / "x").write_text("x")
    os.rename(mounted / "d2", mounted / "d1")  # over an empty directory
    assert (mounted / "d1" / "x").read_text() == "x"
    (mounted / "d3").mkdir()
    with pytest.raises(OSError) as exc:
        os.rename(mounted / "d3", mounted / "d1")
    assert exc.value.errno == errno.ENOTEMPTY


def test_hard_links_share_the_inode(mounted):
    a = mounted / "a"
    a.write_bytes(b"shared")
    os.link(a, mounted / "b")
    assert a.stat().st_ino == (mounted / "b").stat().st_ino
    assert a.stat().st_nlink == 2
    (mounted / "b").write_bytes(b"changed through b")
    assert a.read_bytes() == b"changed through b"
    a.unlink()
    assert (mounted / "b").stat().st_nlink == 1
    assert (mounted / "b").read_bytes() == b"changed through b"


def test_symlinks(mounted):
    (mounted / "target").write_text("pointed at")
    os.symlink("target", mounted / "link")
    assert os.readlink(mounted / "link") == "target"
    assert (mounted / "link").read_text() == "pointed at"
    long_target = "t" * 4095
    os.symlink(long_target, mounted / "long")
    assert os.readlink(mounted / "long") == long_target


def test_xattrs(mounted):
    p = mounted / "x"
    p.write_text("x")
    os.setxattr(p, "user.a", b"1")
    os.setxattr(p, "user.b", b"\x00binary\xff")
    assert sorted(os.listxattr(p)) == ["user.a", "user.b"]
    assert os.getxattr(p, "user.b") == b"\x00binary\xff"
    with pytest.raises(FileExistsError):
        os.setxattr(p, "user.a", b"2", os.XATTR_CREATE)
    os.removexattr(p, "user.a")
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.a")
    assert exc.value.errno == errno.ENODATA


def test_truncate_up_and_down(mounted):
    p = mounted / "t"
    data = os.urandom(100_000)
    p.write_bytes(data)
    os.truncate(p, 40_000)
    assert p.read_bytes() == data[:40_000]
    os.truncate(p, 50_000)
    assert p.read_bytes() == data[:40_000] + bytes(10_000)
    with open(p, "r+b") as f:  # through a handle, committed at close
        f.truncate(10)
        f.seek(20)
        f.write(b"end")
    assert p.read_bytes() == data[:10] + bytes(10) + b"end"


def test_open_with_o_trunc_empties_the_file(mounted):
    p = mounted / "shrink"
    p.write_bytes(b"a longer first version")
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 100) == b""
        os.write(fd, b"short")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"short"
    p.write_bytes(b"x")  # O_WRONLY | O_CREAT | O_TRUNC, shorter again
    assert p.read_bytes() == b"x"


def test_unknown_xattr_namespaces_are_not_supported(mounted):
    p = mounted / "ns"
    p.write_text("x")
    for name in ("bogus.name", "os2.name"):
        with pytest.raises(OSError) as exc:
            os.setxattr(p, name, b"v")
        assert exc.value.errno == errno.EOPNOTSUPP


def _getxattr_requests(port: int) -> float:
    text = urllib.request.urlopen(f"http://{cl.HOST}:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "chunkfs_fuse_request_seconds_count" and s.labels == {"op": "getxattr"}:
                return s.value
    return 0.0


def test_selinux_labels_are_not_kept_so_ls_l_asks_once(cluster, mount_factory):
    port = cl.free_ports(1)[0]
    mount = mount_factory(cluster.dsn, [f"metrics={cl.HOST}:{port}"])
    d = mount / "labels"
    d.mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"x")
    f = d / "f0"
    os.setxattr(f, "security.other", b"kept")  # the rest of security.* is kept
    assert os.getxattr(f, "security.other") == b"kept"
    for call in (
        lambda: os.setxattr(f, "security.selinux", b"system_u:object_r:tmp_t:s0"),
        lambda: os.getxattr(f, "security.selinux"),
        lambda: os.removexattr(f, "security.selinux"),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EOPNOTSUPP
    assert os.listxattr(f) == ["security.other"]
    # ls -l asks each file for its label until one answer says the mount
    # keeps none; then it stops asking for the rest of the device.
    before = _getxattr_requests(port)
    listing = subprocess.run(["ls", "-l", os.fspath(d)], capture_output=True, text=True, check=True)
    assert len(listing.stdout.splitlines()) == 41  # "total" and the 40 files
    assert _getxattr_requests(port) - before <= 2


def test_append_and_partial_overwrite(mounted):
    p = mounted / "log"
    p.write_bytes(b"one\n")
    with open(p, "ab") as f:
        f.write(b"two\n")
    with open(p, "ab") as f:
        f.write(b"three\n")
    assert p.read_bytes() == b"one\ntwo\nthree\n"
    big = bytearray(os.urandom(3 * MiB))
    p.write_bytes(big)
    with open(p, "r+b") as f:
        f.seek(MiB + 5)
        f.write(b"patched")
    big[MiB + 5 : MiB + 12] = b"patched"
    assert p.read_bytes() == bytes(big)


def test_readers_on_the_mount_see_unflushed_writes(mounted):
    p = mounted / "live"
    with open(p, "wb") as w:
        w.write(b"not yet closed")
        w.flush()
        with open(p, "rb") as r:
            assert r.read() == b"not yet closed"


def test_a_file_unlinked_while_open_stays_usable_until_closed(mounted):
    p = mounted / "ghost"
    p.write_bytes(b"still here")
    with open(p, "r+b") as f:
        p.unlink()
        assert not p.exists()
        assert f.read() == b"still here"
        f.write(b", and more")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"still here, and more"
    assert not p.exists()


def test_directories(mounted):
    d = mounted / "dir"
    d.mkdir()
    with pytest.raises(FileExistsError):
        d.mkdir()
    (d / "f").write_text("f")
    with pytest.raises(OSError) as exc:
        d.rmdir()
    assert exc.value.errno == errno.ENOTEMPTY
    names = {f"n{i}" for i in range(300)}
    for n in names:
        (d / n).touch()
    assert set(os.listdir(d)) == names | {"f"}
    assert d.stat().st_nlink == 2


def test_limits_give_the_right_errno(mounted):
    with pytest.raises(OSError) as exc:
        (mounted / ("n" * 256)).write_text("x")
    assert exc.value.errno == errno.ENAMETOOLONG
    (mounted / ("n" * 255)).write_text("ok")
    assert (mounted / ("n" * 255)).read_text() == "ok"
    odd = os.fsencode(mounted) + b"/\xff\x01 new\nline"
    with open(odd, "wb") as f:
        f.write(b"bytes name")
    assert b"\xff\x01 new\nline" in os.listdir(os.fsencode(mounted))
    with open(mounted / "huge", "wb") as f:
        with pytest.raises(OSError) as exc:
            os.pwrite(f.fileno(), b"x", 10 << 30)  # past the 10 GiB maximum
        assert exc.value.errno == errno.EFBIG
    assert os.statvfs(mounted).f_namemax == 255
    assert os.statvfs(mounted).f_blocks > 0


def test_everything_survives_unmount_and_mount(cluster, mount_factory, tmp_path):
    m = mount_factory(cluster.dsn)
    src = make_tree(tmp_path)
    subprocess.run(["cp", "-a", str(src), str(m / "tree")], check=True, timeout=300)
    m.unmount()
    assert not any(Path(m.path).iterdir())
    m.mount()
    diff_r(src, m / "tree")


def test_a_second_mount_sees_files_closed_on_the_first(cluster, mount_factory):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    (first / "shared").write_bytes(b"version 1")
    assert (second / "shared").read_bytes() == b"version 1"
    (first / "shared").write_bytes(b"version 2, longer")
    assert (second / "shared").read_bytes() == b"version 2, longer"


def test_an_open_after_a_commit_elsewhere_reads_the_new_size_at_once(cluster, mount_factory):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    (first / "grows").write_bytes(b"01234")
    assert (second / "grows").stat().st_size == 5  # the kernel caches this size
    (first / "grows").write_bytes(b"0123456789abcdefghij")
    out = subprocess.run(
        ["cat", str(second / "grows")], capture_output=True, check=True, timeout=60
    ).stdout
    assert out == b"0123456789abcdefghij"


def test_attributes_a_mount_remembers_from_its_own_write_yield_to_a_newer_commit(
    cluster, mount_factory
):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    (second / "mine").write_bytes(b"short")
    assert (second / "mine").stat().st_size == 5  # answered from what the commit returned
    (first / "mine").write_bytes(b"a longer content from the first mount")
    with open(second / "mine", "rb") as f:  # close-to-open: the open sees the new version
        assert os.fstat(f.fileno()).st_size == 37
        assert f.read() == b"a longer content from the first mount"


def test_changes_to_a_file_open_for_writing_commit_with_its_next_flush(cluster, mount_factory):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    atime, mtime = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321

    def changed(name: str) -> int:
        fd = os.open(first / name, os.O_CREAT | os.O_WRONLY, 0o600)
        os.fchown(fd, 1234, 5678)  # before any write, as rsync changes its temp file
        os.write(fd, b"unflushed")
        os.utime(fd, ns=(atime, mtime))  # what cp -a does before it closes
        os.fchmod(fd, 0o4751)  # after the chown, which would clear setuid
        st = os.stat(first / name)  # this mount answers with them at once
        assert (st.st_mode, st.st_uid, st.st_gid) == (0o104751, 1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (atime, mtime, 9)
        return fd

    def committed(name: str) -> None:
        st = os.stat(second / name)
        assert (st.st_mode, st.st_uid, st.st_gid) == (0o104751, 1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (atime, mtime, 9)
        assert (second / name).read_bytes() == b"unflushed"

    fd = changed("deferred-closed")
    os.close(fd)
    committed("deferred-closed")
    fd = changed("deferred-synced")
    os.fsync(fd)
    committed("deferred-synced")

    def mode_in_metadata() -> int:
        rows = cl.run_sql(
            cluster.dsn,
            "SELECT i.mode FROM inodes i JOIN dentries d"
            " ON d.ino = i.ino WHERE d.parent = 1"
            " AND d.name = 'deferred-synced'::bytea",
        )[0]
        return stat.S_IMODE(rows[0]["mode"])

    os.fchmod(fd, 0o600)  # nothing unflushed, but open for writing: at the close
    assert stat.S_IMODE(os.stat(first / "deferred-synced").st_mode) == 0o600
    assert mode_in_metadata() == 0o4751
    os.close(fd)
    assert mode_in_metadata() == 0o600
    fd = os.open(first / "deferred-synced", os.O_RDONLY)
    os.fchmod(fd, 0o644)  # no writer: committed at once
    assert mode_in_metadata() == 0o644
    os.close(fd)


def test_a_held_change_is_published_when_the_last_writer_goes(cluster, mounted):
    """A writable mapping outlives its descriptor: its release, with no flush
    before it, publishes the chmod that waited for the writer, so a later
    chmod is not overwritten by it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    path = mounted / "mapped"
    path.write_bytes(b"x" * 4096)
    ro = os.open(path, os.O_RDONLY)
    rw = os.open(path, os.O_RDWR)
    addr = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, rw, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    os.close(rw)  # flushed; the mapping keeps the writer's handle
    os.fchmod(ro, 0o600)  # waits for the writer
    assert libc.munmap(addr, 4096) == 0
    os.fchmod(ro, 0o640)
    os.close(ro)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    rows = cl.run_sql(cluster.dsn, f"SELECT mode FROM inodes WHERE ino = {os.stat(path).st_ino}")[0]
    assert stat.S_IMODE(rows[0]["mode"]) == 0o640


def test_a_held_change_never_moves_ctime_back(cluster, mount_factory):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    (first / "linked").write_bytes(b"abc")
    fd = os.open(first / "linked", os.O_WRONLY)
    os.fchmod(fd, 0o600)  # held for the writer
    os.link(first / "linked", first / "linked2")  # a later change of ctime
    shown = os.stat(first / "linked").st_ctime_ns
    os.close(fd)
    st = os.stat(second / "linked")
    assert (stat.S_IMODE(st.st_mode), st.st_ctime_ns) == (0o600, shown)


def test_a_directory_changed_here_stats_as_its_metadata_says(cluster, mount_factory):
    m = mount_factory(cluster.dsn)
    d = m / "dirattrs"
    d.mkdir()
    os.stat(d)  # the mount now remembers it: later answers are derived from the changes
    (d / "f").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "g").symlink_to("f")
    (d / "f").unlink()
    (d / "sub").rmdir()
    (d / "sub2").mkdir()
    os.mknod(d / "fifo", 0o600 | stat.S_IFIFO)
    # Renames: one over a name whose inode keeps another link, one into
    # another directory; all the inodes involved were remembered before.
    (m / "dirattrs2").mkdir()
    (m / "dirattrs2" / "x").write_bytes(b"")  # the kernel re-reads the directory after this
    (d / "h").write_bytes(b"h")
    os.link(d / "h", d / "h2")
    os.chmod(d / "h", 0o640)  # a chmod here is remembered here
    (d / "k").write_bytes(b"k")
    names = ["dirattrs", "dirattrs2", "dirattrs/h", "dirattrs/h2", "dirattrs/k"]
    for name in names:
        os.stat(m / name)
    os.rename(d / "k", d / "h")
    os.rename(d / "g", m / "dirattrs2" / "g")
    names = ["dirattrs", "dirattrs2", "dirattrs/h", "dirattrs/h2", "dirattrs2/g"]
    other = mount_factory(cluster.dsn)  # reads from PostgreSQL
    for name in names:
        here, there = os.lstat(m / name), os.lstat(other / name)
        assert (here.st_ino, here.st_mtime_ns, here.st_ctime_ns, here.st_nlink) == (
            there.st_ino,
            there.st_mtime_ns,
            there.st_ctime_ns,
            there.st_nlink,
        ), name
    assert os.stat(d).st_nlink == 3
    assert os.stat(d / "h2").st_nlink == 1


def _nameless_inodes(dsn: str) -> set[int]:
    return {r["ino"] for r in cl.run_sql(dsn, "SELECT ino FROM inodes WHERE nlink = 0")[0]}


def test_removed_files_are_purged_once_nothing_uses_them(cluster, mount_factory):
    m = mount_factory(cluster.dsn)
    d = m / "purged"
    d.mkdir()
    for i in range(300):
        (d / f"f{i}").write_bytes(b"x" * i)
    held = open(d / "f7", "rb")  # noqa: SIM115 - stays open across the removal
    pinned = {os.fstat(held.fileno()).st_ino, d.stat().st_ino}  # the open file pins its directory
    shutil.rmtree(d)
    # Purged in batches shortly after the kernel forgets them; the open one stays.
    cl.wait_until(
        lambda: _nameless_inodes(cluster.dsn) == pinned, 10, "the removed inodes to go", 0.05
    )
    assert held.read() == b"x" * 7
    held.close()
    cl.wait_until(lambda: not _nameless_inodes(cluster.dsn), 10, "the closed inode to go", 0.05)
    # Those forgotten just before an unmount are purged by it.
    d.mkdir()
    for i in range(50):
        (d / f"g{i}").write_bytes(b"z")
    shutil.rmtree(d)
    m.unmount()
    assert not _nameless_inodes(cluster.dsn)


def test_closing_a_file_another_mount_removed_is_not_an_error(cluster, mount_factory):
    first = mount_factory(cluster.dsn)
    second = mount_factory(cluster.dsn)
    (first / "doomed").write_bytes(b"x")
    fd = os.open(second / "doomed", os.O_WRONLY)
    os.write(fd, b"written after the other mount removed it")
    (first / "doomed").unlink()
    os.close(fd)  # as on a local filesystem: no error, the data goes with the file
    assert not (first / "doomed").exists()


def test_mount_through_mount8(cluster, tmp_path):
    # mount(8) runs helpers with its own PATH; scripts/setup links chunkfs there.
    if shutil.which("chunkfs", path=MOUNT8_PATH) is None:
        pytest.fail("chunkfs is not on mount(8)'s PATH (run scripts/setup)")
    mp = tmp_path / "m8"
    mp.mkdir()
    proc = subprocess.run(
        [
            "mount",
            "-t",
            "fuse.chunkfs",
            cluster.dsn,
            str(mp),
            "-o",
            f"cache_dir={tmp_path / 'cache'},log={tmp_path / 'm8.log'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        (mp / "via-mount8").write_text("hello")
        assert (mp / "via-mount8").read_text() == "hello"
        assert any(
            " fuse.chunkfs " in line and str(mp) in line
            for line in Path("/proc/mounts").read_text().splitlines()
        )
    finally:
        subprocess.run(["umount", str(mp)], check=True, timeout=60)


def test_bad_input_gives_one_line_errors(cluster, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").touch()
    proc = cl.run_chunkfs("mount", cluster.dsn, str(busy), check=False)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cl.run_chunkfs("mount", cluster.dsn, str(empty), "-o", "bogus", check=False)
    assert proc.returncode != 0 and "unknown mount option: bogus" in proc.stderr
    proc = cl.run_chunkfs(
        "mount",
        "postgresql://nobody@127.0.0.1:1/none",
        str(empty),
        "-o",
        f"cache_dir={tmp_path / 'cache'}",  # its log goes there, not to the machine's default
        check=False,
    )
    assert proc.returncode != 0 and "cannot connect" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cl.run_chunkfs("status", "postgresql://nobody@127.0.0.1:1/none", check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not any(
        " fuse.chunkfs " in line and str(empty) in line
        for line in Path("/proc/mounts").read_text().splitlines()
    )


def test_status_reports_every_node(cluster, mounted):
    (mounted / "s").write_bytes(os.urandom(60_000))
    report = cl.chunkfs_json("status", cluster.dsn, "--json")
    nodes = {n["id"]: n for n in report["nodes"]}
    assert set(nodes) == {n.node_id for n in cluster.nodes}
    for n in nodes.values():
        assert n["status"] == "active" and n["heartbeat_age_s"] < 15
        assert n["free_bytes"] > 0 and n["url"].startswith("http://127.0.0.1:")


BIG_DIR_ENTRIES = 100_000


def _bulk_create_files(dsn: str, parent: int, count: int) -> None:
    """``count`` empty files f0 .. f{count-1} in directory inode ``parent``,
    inserted in one statement: making them through FUSE one by one would take
    minutes, and what is under test here is the listing, not the creation.
    """
    cl.run_sql(
        dsn,
        f"""WITH new AS (
               SELECT nextval('inode_seq') AS ino, g FROM generate_series(0, {int(count)} - 1) g),
           ins AS (
               INSERT INTO inodes (ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)
               SELECT ino, {stat.S_IFREG | 0o644}, 0, 0, 1, 0, 0, 0 FROM new)
           INSERT INTO dentries (parent, name, ino)
           SELECT {int(parent)}, convert_to('f' || g, 'UTF8'), ino FROM new""",
        timeout=120,
    )


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def test_rewinddir_lists_the_names_given_since(mounted):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = libc.rewinddir.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]

    def names(dirp: int) -> set[bytes]:
        out: set[bytes] = set()
        for _ in range(100):
            entry = libc.readdir(dirp)
            if not entry:
                return out
            out.add(entry.contents.d_name)
        raise AssertionError("readdir never reached the end")

    for before in ([], [b"first"]):  # an empty directory and one with a name
        d = mounted / f"rewind{len(before)}"
        d.mkdir()
        for name in before:
            (d / name.decode()).write_bytes(b"x")
        dirp = libc.opendir(bytes(d))
        assert dirp, os.strerror(ctypes.get_errno())
        try:
            assert names(dirp) == {b".", b"..", *before}
            (d / "late").write_bytes(b"x")
            libc.rewinddir(dirp)
            assert names(dirp) == {b".", b"..", *before, b"late"}
        finally:
            libc.closedir(dirp)


def test_a_directory_of_100k_entries_lists_completely_while_names_change(cluster, mounted):
    import threading

    big = mounted / "big"
    big.mkdir()
    _bulk_create_files(cluster.dsn, big.stat().st_ino, BIG_DIR_ENTRIES)
    stop = threading.Event()
    churned = 0

    def churn() -> None:  # add and remove other names while the listing runs
        nonlocal churned
        while not stop.is_set() and churned < 5000:
            p = big / f"churn{churned}"
            p.touch()
            if churned % 2:
                p.unlink()
            churned += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        names = [e.name for e in os.scandir(big)]
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    assert churned > 0
    assert len(names) == len(set(names)), "a name was listed twice"
    listed = {n for n in names if n.startswith("f")}
    assert listed == {f"f{i}" for i in range(BIG_DIR_ENTRIES)}
    assert {n for n in names if not n.startswith("f")} <= {f"churn{i}" for i in range(churned)}
    assert big.stat().st_nlink == 2
    kept = {f"churn{i}" for i in range(0, churned, 2)}  # the odd ones were removed
    assert set(os.listdir(big)) == {f"f{i}" for i in range(BIG_DIR_ENTRIES)} | kept


def test_a_password_in_the_dsn_never_shows(cluster, mount_factory):
    # The test server trusts loopback, so any password is accepted and ignored.
    user, rest = cluster.dsn.split("://", 1)[1].split("@", 1)
    secret = "s3cret-pw-4711"
    dsn = f"postgresql://{user.split(':')[0]}:{secret}@{rest}"
    m = mount_factory(dsn)
    (m / "f").write_bytes(b"x")
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert secret.encode() not in cmdline, f"process {pid} shows the password"
    assert secret not in Path("/proc/mounts").read_text()
    assert secret not in m.log_path.read_text()
    status = cl.run_chunkfs("status", dsn)
    assert secret not in status.stdout + status.stderr
    bad = cl.run_chunkfs("status", dsn.replace(rest, "127.0.0.1:1/none"), check=False)
    assert bad.returncode != 0 and secret not in bad.stdout + bad.stderr


def test_a_name_found_absent_is_trusted_only_until_a_mount_gives_it(cluster, mount_factory):
    # A long entry_timeout: the second mount trusts a name it found absent.
    one = mount_factory(cluster.dsn)
    two = mount_factory(cluster.dsn, ["entry_timeout=60"])
    (one / "absent").mkdir()  # the cluster's root holds other tests' names
    first, second = one / "absent", two / "absent"
    (second / "src").write_bytes(b"renamed")
    names = ["file", "dir", "symlink", "fifo", "hardlink", "renamed", "elsewhere"]
    for name in names:
        assert not os.path.lexists(second / name)
    # This mount gives each name: it is there at once, also when the kernel
    # has dropped its dentries and asks again.
    (second / "file").write_bytes(b"x")
    (second / "dir").mkdir()
    (second / "symlink").symlink_to("file")
    os.mkfifo(second / "fifo")
    os.link(second / "file", second / "hardlink")
    os.rename(second / "src", second / "renamed")
    Path("/proc/sys/vm/drop_caches").write_text("2")
    assert all(os.path.lexists(second / name) for name in names[:-1])
    # Another mount gives the last name: an exclusive create here still
    # fails, and a rename onto it replaces what the other mount made.
    (first / "elsewhere").write_bytes(b"from the first mount")
    with pytest.raises(FileExistsError):
        os.open(second / "elsewhere", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.rename(second / "renamed", second / "elsewhere")
    assert (second / "elsewhere").read_bytes() == b"renamed"


def test_a_mount_serves_its_metrics_and_stats_shows_them(cluster, mount_factory):
    port = cl.free_ports(1)[0]
    mount = mount_factory(cluster.dsn, [f"metrics={cl.HOST}:{port}"])
    stats = subprocess.Popen(
        cl.chunkfs_command("stats", os.fspath(mount), "--json", "--interval", "3", "--count", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # its first sample comes before the files
    for i in range(20):
        (mount / f"m{i}").write_bytes(os.urandom(10_000))
    assert (mount / "m0").read_bytes()
    out, err = stats.communicate(timeout=60)
    assert stats.returncode == 0, err
    rates = json.loads(out)
    assert rates["fuse_per_s"] > 0 and rates["commits_per_s"] > 0, rates
    assert rates["up_mib_s"] > 0 and rates["pg_per_s"] > 0, rates
    assert "create" in rates["top"] or "write" in rates["top"], rates
    # The raw metrics: Prometheus text, every file's bytes went up R times.
    text = urllib.request.urlopen(f"http://{cl.HOST}:{port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("chunkfs_fuse_request_seconds_count", (("op", "create"),))] >= 20
    assert samples[("chunkfs_node_bytes_total", (("direction", "up"),))] >= 2 * 20 * 10_000
    assert samples[("chunkfs_commit_seconds_count", ())] >= 20
    # Without -o metrics, stats says what is missing in one line.
    other = mount_factory(cluster.dsn)
    proc = cl.run_chunkfs("stats", os.fspath(other), "--count", "1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"chunkfs: error: no metrics for a mount at {os.fspath(other)}: mount it with -o metrics=HOST:PORT"
    ]
