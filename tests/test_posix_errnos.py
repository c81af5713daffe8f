"""One small test per POSIX case of issue 3, each against a local directory.

Every scenario runs twice: in a directory on the machine's own disk (the
reference, ext4 or tmpfs under pytest's ``tmp_path``) and in a directory of
a chunkfs mount. The two outcomes (return value or errno name, plus whatever
the scenario observes afterwards) must be equal, and where Linux fixes the
answer the local outcome is also checked against it, so that a failure says
whether chunkfs or the reference is off.

Cases that need another uid run the scenario in a forked child that has
dropped to ``nobody`` (with the supplementary group ``users`` when it
exists); the child reaches the directory through a descriptor, as the path
above it may be closed to that uid.

The mount is shared by the tests of this module (each works in a directory of
its own), except the O_DIRECT test, which makes a fresh one: it checks that
the mount survives.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import mmap
import os
import pickle
import pwd
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cluster as cl

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(rc: int) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(src: str | bytes | Path, dst: str | bytes | Path, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags))


def utimensat(path: str | bytes | Path, atime_ns: int, mtime_ns: int) -> None:
    """utimensat(2) with raw nanoseconds, so that UTIME_NOW / UTIME_OMIT can be passed."""

    def spec(ns: int) -> _Timespec:
        if ns in (UTIME_NOW, UTIME_OMIT):
            return _Timespec(0, ns)
        return _Timespec(ns // 10**9, ns % 10**9)

    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), ctypes.byref(times), 0))


# ---------------------------------------------------------------- helpers


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", value)`` or ``("err", "ENAME")``."""
    try:
        return ("ok", fn(*args, **kwargs))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def listing(d: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(d)))


def mode_of(p: Path | str) -> str:
    return oct(os.lstat(p).st_mode)


_ANY = object()


def on_both(sides: dict[str, Path], scenario: Callable[[Path], Any], expect: Any = _ANY) -> Any:
    """Run ``scenario`` in the local directory and in the mount; they must agree
    (and the local result must be ``expect`` when given). Returns the result.
    """
    local = scenario(sides["local"])
    if expect is not _ANY:
        assert local == expect, f"the local reference itself gave {local!r}, not {expect!r}"
    mounted = scenario(sides["chunkfs"])
    assert mounted == local, f"\n  local  : {local!r}\n  chunkfs: {mounted!r}"
    return local


def nobody() -> tuple[int, int, list[int]]:
    """uid, gid and supplementary groups of the unprivileged user the tests use."""
    pw = pwd.getpwnam("nobody")
    try:
        groups = [grp.getgrnam("users").gr_gid]
    except KeyError:
        groups = []
    return pw.pw_uid, pw.pw_gid, groups


def as_user(
    cwd: Path,
    fn: Callable[[], Any],
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: list[int] | None = None,
    umask: int | None = None,
) -> Any:
    """Run ``fn()`` in a forked child with those credentials, in ``cwd``
    (entered through a descriptor); return its result, or ``("err", NAME)``
    for an OSError that escapes it.
    """
    if uid is None or gid is None:
        uid, gid, groups = nobody()
    dirfd = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        status = 0
        try:
            os.close(r)
            os.setgroups(groups or [])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if umask is not None:
                os.umask(umask)
            os.fchdir(dirfd)
            try:
                result: Any = fn()
            except OSError as exc:
                result = ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            except BaseException as exc:  # noqa: BLE001 - shown to the parent
                result = ("exception", repr(exc))
            os.write(w, pickle.dumps(result))
        except BaseException:  # noqa: BLE001 - the child exits whatever happened
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    os.close(dirfd)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and chunks, "the child process failed before answering"
    result = pickle.loads(b"".join(chunks))
    if isinstance(result, tuple) and result and result[0] == "exception":
        raise AssertionError(f"the scenario raised in the child: {result[1]}")
    return result


# --------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_mount(
    cluster: cl.Cluster, fuse_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[cl.Mount]:
    """One mount of the cluster for the whole module."""
    base = tmp_path_factory.mktemp("errno-mount")
    m = cl.Mount(cluster.dsn, base / "mnt", log_path=base / "mount.log", cache_dir=base / "cache")
    m.mount()
    try:
        yield m
    finally:
        m.unmount()


@pytest.fixture
def sides(
    request: pytest.FixtureRequest, shared_mount: cl.Mount, tmp_path: Path
) -> Iterator[dict[str, Path]]:
    """A fresh directory (root's, 0755) on the local disk and one on the mount."""
    if os.geteuid() != 0:
        pytest.fail("these tests run as root (they chown, mknod and switch uids)", pytrace=False)
    local = tmp_path / "local"
    remote = Path(shared_mount) / f"{request.node.name[:80]}-{uuid.uuid4().hex[:8]}"
    for d in (local, remote):
        d.mkdir()
        os.chmod(d, 0o755)
    yield {"local": local, "chunkfs": remote}


def _file(
    p: Path, data: bytes = b"", mode: int | None = None, owner: tuple[int, int] | None = None
) -> Path:
    p.write_bytes(data)
    if owner is not None:
        os.chown(p, *owner)
    if mode is not None:
        os.chmod(p, mode)
    return p


def _dir(p: Path, mode: int | None = None, owner: tuple[int, int] | None = None) -> Path:
    p.mkdir()
    if owner is not None:
        os.chown(p, *owner)
    if mode is not None:
        os.chmod(p, mode)
    return p


# ---------------------------------------------------------------- renames


def test_rename_file_over_file(sides):
    def scenario(d: Path):
        _file(d / "a", b"from a")
        _file(d / "b", b"from b")
        res = outcome(os.rename, d / "a", d / "b")
        return res, listing(d), (d / "b").read_bytes()

    on_both(sides, scenario, expect=(("ok", None), [b"b"], b"from a"))


def test_rename_directory_over_empty_directory(sides):
    def scenario(d: Path):
        _dir(d / "src")
        _file(d / "src" / "f", b"x")
        _dir(d / "dst")
        res = outcome(os.rename, d / "src", d / "dst")
        return res, listing(d), listing(d / "dst"), os.stat(d).st_nlink

    on_both(sides, scenario, expect=(("ok", None), [b"dst"], [b"f"], 3))


def test_rename_directory_over_non_empty_directory_is_enotempty(sides):
    def scenario(d: Path):
        _dir(d / "src")
        _dir(d / "dst")
        _file(d / "dst" / "keep")
        return outcome(os.rename, d / "src", d / "dst"), listing(d), listing(d / "dst")

    on_both(sides, scenario, expect=(("err", "ENOTEMPTY"), [b"dst", b"src"], [b"keep"]))


def test_rename_directory_into_its_own_subtree_is_einval(sides):
    def scenario(d: Path):
        _dir(d / "top")
        _dir(d / "top" / "sub")
        return (
            outcome(os.rename, d / "top", d / "top" / "sub" / "moved"),
            outcome(os.rename, d / "top", d / "top" / "inside"),
            listing(d),
        )

    on_both(sides, scenario, expect=(("err", "EINVAL"), ("err", "EINVAL"), [b"top"]))


def test_rename_file_over_directory_is_eisdir(sides):
    def scenario(d: Path):
        _file(d / "f", b"x")
        _dir(d / "dir")
        return outcome(os.rename, d / "f", d / "dir"), listing(d)

    on_both(sides, scenario, expect=(("err", "EISDIR"), [b"dir", b"f"]))


def test_rename_directory_over_file_is_enotdir(sides):
    def scenario(d: Path):
        _file(d / "f", b"x")
        _dir(d / "dir")
        return outcome(os.rename, d / "dir", d / "f"), listing(d)

    on_both(sides, scenario, expect=(("err", "ENOTDIR"), [b"dir", b"f"]))


def test_rename_onto_itself_changes_nothing(sides):
    def scenario(d: Path):
        _file(d / "f", b"same")
        before = os.stat(d / "f")
        res = outcome(os.rename, d / "f", d / "f")
        after = os.stat(d / "f")
        return (
            res,
            listing(d),
            (d / "f").read_bytes(),
            after.st_ino == before.st_ino,
            after.st_ctime_ns == before.st_ctime_ns,
        )

    on_both(sides, scenario, expect=(("ok", None), [b"f"], b"same", True, True))


def test_rename_onto_another_hard_link_of_the_same_inode_changes_nothing(sides):
    def scenario(d: Path):
        _file(d / "one", b"linked")
        os.link(d / "one", d / "two")
        res = outcome(os.rename, d / "one", d / "two")
        return res, listing(d), os.stat(d / "one").st_nlink, (d / "two").read_bytes()

    on_both(sides, scenario, expect=(("ok", None), [b"one", b"two"], 2, b"linked"))


def test_rename_noreplace_onto_an_existing_name_is_eexist(sides):
    def scenario(d: Path):
        _file(d / "a", b"a")
        _file(d / "b", b"b")
        res = outcome(renameat2, d / "a", d / "b", RENAME_NOREPLACE)
        free = outcome(renameat2, d / "a", d / "c", RENAME_NOREPLACE)
        return res, free, listing(d), (d / "b").read_bytes()

    on_both(sides, scenario, expect=(("err", "EEXIST"), ("ok", None), [b"b", b"c"], b"b"))


def test_rename_exchange_swaps_both_names(sides):
    def scenario(d: Path):
        _file(d / "f", b"file")
        _dir(d / "dir")
        _file(d / "dir" / "inside", b"i")
        res = outcome(renameat2, d / "f", d / "dir", RENAME_EXCHANGE)
        return (
            res,
            stat.S_ISDIR(os.lstat(d / "f").st_mode),
            listing(d / "f"),
            (d / "dir").read_bytes(),
        )

    on_both(sides, scenario, expect=(("ok", None), True, [b"inside"], b"file"))


def test_rename_exchange_with_a_missing_name_is_enoent(sides):
    def scenario(d: Path):
        _file(d / "f", b"file")
        return outcome(renameat2, d / "f", d / "missing", RENAME_EXCHANGE), listing(d)

    on_both(sides, scenario, expect=(("err", "ENOENT"), [b"f"]))


def test_rename_exchange_of_directories_moves_parent_link_counts(sides):
    def scenario(d: Path):
        _dir(d / "p")
        _dir(d / "p" / "sub")
        _dir(d / "q")
        _file(d / "q" / "file")
        res = outcome(renameat2, d / "p" / "sub", d / "q" / "file", RENAME_EXCHANGE)
        return res, os.stat(d / "p").st_nlink, os.stat(d / "q").st_nlink, listing(d / "p")

    on_both(sides, scenario, expect=(("ok", None), 2, 3, [b"sub"]))


# ---------------------------------------------------------- names, limits


def test_name_of_255_bytes_works_and_256_is_enametoolong(sides):
    def scenario(d: Path):
        ok_name, long_name = b"n" * 255, b"n" * 256
        base = os.fsencode(d)
        return (
            outcome(lambda: os.close(os.open(base + b"/" + ok_name, os.O_CREAT | os.O_WRONLY))),
            outcome(lambda: os.close(os.open(base + b"/" + long_name, os.O_CREAT | os.O_WRONLY))),
            outcome(os.mkdir, base + b"/" + long_name),
            outcome(os.symlink, b"x", base + b"/" + long_name),
            outcome(os.rename, base + b"/" + ok_name, base + b"/" + long_name),
            outcome(os.link, base + b"/" + ok_name, base + b"/" + long_name),
            outcome(os.stat, base + b"/" + long_name),
            listing(d),
        )

    err = ("err", "ENAMETOOLONG")
    on_both(sides, scenario, expect=(("ok", None), err, err, err, err, err, err, [b"n" * 255]))


def test_symlink_target_of_4095_bytes_works_and_4096_is_enametoolong(sides):
    def scenario(d: Path):
        return (
            outcome(os.symlink, b"t" * 4095, d / "ok"),
            outcome(lambda: len(os.readlink(d / "ok"))),
            outcome(os.symlink, b"t" * 4096, d / "long"),
            listing(d),
        )

    on_both(sides, scenario, expect=(("ok", None), ("ok", 4095), ("err", "ENAMETOOLONG"), [b"ok"]))


def test_names_are_bytes(sides):
    names = [
        b"\xff\xfe not utf-8",
        b"new\nline",
        b"  spaces  ",
        b"tab\there",
        b"\x01\x1f",
        "unicod\u00e9".encode(),
    ]

    def scenario(d: Path):
        base = os.fsencode(d)
        for i, n in enumerate(names):
            with open(base + b"/" + n, "wb") as f:
                f.write(bytes([i]))
        return listing(d), [open(base + b"/" + n, "rb").read() for n in names]

    on_both(sides, scenario, expect=(sorted(names), [bytes([i]) for i in range(len(names))]))


def test_statfs_reports_a_name_length_of_255(sides):
    assert os.statvfs(sides["chunkfs"]).f_namemax == os.statvfs(sides["local"]).f_namemax == 255


# ------------------------------------------------------------ open flags


def test_o_excl_on_an_existing_name_is_eexist(sides):
    def scenario(d: Path):
        _file(d / "f", b"keep")
        return (
            outcome(os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644),
            (d / "f").read_bytes(),
        )

    on_both(sides, scenario, expect=(("err", "EEXIST"), b"keep"))


def test_o_creat_on_an_existing_name_keeps_its_content(sides):
    def scenario(d: Path):
        _file(d / "f", b"keep", mode=0o600)
        fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o777)
        try:
            data = os.read(fd, 100)
        finally:
            os.close(fd)
        return data, mode_of(d / "f")

    on_both(sides, scenario, expect=(b"keep", oct(stat.S_IFREG | 0o600)))


def test_o_trunc_truncates_an_existing_file(sides):
    def scenario(d: Path):
        _file(d / "f", b"old content")
        fd = os.open(d / "f", os.O_TRUNC | os.O_WRONLY)
        try:
            during = os.fstat(fd).st_size, (d / "f").read_bytes()
            os.write(fd, b"new")
        finally:
            os.close(fd)
        return during, (d / "f").read_bytes()

    on_both(sides, scenario, expect=((0, b""), b"new"))


def test_o_trunc_with_o_rdonly_truncates_as_on_linux(sides):
    # POSIX leaves O_RDONLY|O_TRUNC unspecified; Linux filesystems truncate.
    def scenario(d: Path):
        _file(d / "f", b"old content")
        os.close(os.open(d / "f", os.O_RDONLY | os.O_TRUNC))
        return (d / "f").read_bytes()

    on_both(sides, scenario, expect=b"")


def test_shell_style_overwrite_replaces_the_content(sides):
    def scenario(d: Path):
        (d / "f").write_bytes(b"hello")
        (d / "f").write_bytes(b"ab")  # open(O_WRONLY|O_CREAT|O_TRUNC)
        return (d / "f").read_bytes()

    on_both(sides, scenario, expect=b"ab")


def test_appends_from_two_descriptors_interleave_without_loss(sides):
    def scenario(d: Path):
        _file(d / "log", b"")
        fds = [os.open(d / "log", os.O_WRONLY | os.O_APPEND) for _ in range(2)]
        try:
            for i in range(50):
                os.write(fds[i % 2], f"{i % 2}:{i:03d}\n".encode())
        finally:
            for fd in fds:
                os.close(fd)
        return (d / "log").read_bytes()

    expected = b"".join(f"{i % 2}:{i:03d}\n".encode() for i in range(50))
    on_both(sides, scenario, expect=expected)


def test_pwrite_on_an_o_append_descriptor_appends(sides):
    def scenario(d: Path):
        _file(d / "f", b"12345")
        fd = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
        try:
            os.pwrite(fd, b"ab", 0)  # Linux: the offset is ignored with O_APPEND
        finally:
            os.close(fd)
        return (d / "f").read_bytes()

    on_both(sides, scenario, expect=b"12345ab")


def test_reading_while_another_descriptor_writes_sees_the_bytes(sides):
    def scenario(d: Path):
        _file(d / "f", b"0123456789")
        reader = os.open(d / "f", os.O_RDONLY)
        writer = os.open(d / "f", os.O_WRONLY)
        try:
            seen = [os.pread(reader, 100, 0)]
            os.pwrite(writer, b"AB", 3)
            seen.append(os.pread(reader, 100, 0))
            os.pwrite(writer, b"tail", 12)
            seen.append(os.pread(reader, 100, 0))
            fresh = os.open(d / "f", os.O_RDONLY)  # a third descriptor, opened now
            try:
                seen.append(os.read(fresh, 100))
            finally:
                os.close(fresh)
        finally:
            os.close(writer)
            os.close(reader)
        return seen

    on_both(
        sides,
        scenario,
        expect=[b"0123456789", b"012AB56789", b"012AB56789\0\0tail", b"012AB56789\0\0tail"],
    )


def test_o_direct_works_or_gives_einval_and_the_mount_survives(mounted):
    d = Path(mounted) / "odirect"
    d.mkdir()
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    buf.write(b"D" * 4096)
    try:
        fd = os.open(d / "f", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, f"O_DIRECT open failed with {errno.errorcode[exc.errno]}"
        fd = None
    if fd is not None:
        try:
            res = outcome(os.write, fd, buf)
            assert res in (("ok", 4096), ("err", "EINVAL")), res
            if res[0] == "ok":
                back = mmap.mmap(-1, 4096)
                n = os.preadv(fd, [back], 0)
                assert (n, back[:]) == (4096, b"D" * 4096)
            unaligned = outcome(os.write, fd, b"xyz")  # may fail, must not kill anything
            assert unaligned[0] == "ok" or unaligned == ("err", "EINVAL"), unaligned
        finally:
            os.close(fd)
    # The mount is alive and still serves files.
    (d / "after").write_bytes(b"alive")
    assert (d / "after").read_bytes() == b"alive"
    assert mounted.mounted


def test_mmap_shared_writes_reach_the_file_and_reads_see_write(sides):
    def scenario(d: Path):
        _file(d / "f", b"." * 8192)
        fd = os.open(d / "f", os.O_RDWR)
        try:
            m = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[4090:4100] = b"through-mm"
            m.flush()
            os.pwrite(fd, b"via-write", 100)
            seen_in_map = m[100:109]
            m.close()
        finally:
            os.close(fd)
        data = (d / "f").read_bytes()
        return seen_in_map, data[4090:4100], data[100:109], len(data)

    on_both(sides, scenario, expect=(b"via-write", b"through-mm", b"via-write", 8192))


def test_a_shared_map_sees_writes_through_a_write_only_descriptor(sides):
    def scenario(d: Path):
        _file(d / "f", b"." * 8192)
        reader = os.open(d / "f", os.O_RDONLY)
        try:
            m = mmap.mmap(reader, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
            before = m[4094:4098]
            writer = os.open(d / "f", os.O_WRONLY)
            try:
                os.pwrite(writer, b"WXYZ", 4094)
                open_writer = m[4094:4098]
            finally:
                os.close(writer)
            seen = before, open_writer, m[4094:4098]
            m.close()
        finally:
            os.close(reader)
        return seen

    on_both(sides, scenario, expect=(b"....", b"WXYZ", b"WXYZ"))


def test_fsync_on_a_directory_succeeds(sides):
    def scenario(d: Path):
        _file(d / "f", b"x")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return outcome(os.fsync, fd), outcome(os.fdatasync, fd)
        finally:
            os.close(fd)

    on_both(sides, scenario, expect=(("ok", None), ("ok", None)))


# ------------------------------------------------------------ directories


def test_rmdir_of_a_non_empty_directory_is_enotempty(sides):
    def scenario(d: Path):
        _dir(d / "dir")
        _file(d / "dir" / "f")
        return outcome(os.rmdir, d / "dir"), listing(d / "dir")

    on_both(sides, scenario, expect=(("err", "ENOTEMPTY"), [b"f"]))


def test_eisdir_cases(sides):
    def scenario(d: Path):
        _dir(d / "dir")
        return (
            outcome(os.unlink, d / "dir"),
            outcome(os.open, d / "dir", os.O_WRONLY),
            outcome(os.open, d / "dir", os.O_RDWR),
            outcome(os.truncate, d / "dir", 0),
            outcome(lambda: os.read(os.open(d / "dir", os.O_RDONLY), 10)),
        )

    err = ("err", "EISDIR")
    on_both(sides, scenario, expect=(err, err, err, err, err))


def test_enotdir_cases(sides):
    def scenario(d: Path):
        _file(d / "f", b"x")
        return (
            outcome(os.mkdir, d / "f" / "sub"),
            outcome(os.stat, d / "f" / "x"),
            outcome(os.rmdir, d / "f"),
            outcome(os.listdir, d / "f"),
            outcome(os.open, d / "f", os.O_RDONLY | os.O_DIRECTORY),
            outcome(os.stat, str(d / "f") + "/"),
        )

    err = ("err", "ENOTDIR")
    on_both(sides, scenario, expect=(err, err, err, err, err, err))


def test_hard_link_to_a_directory_is_eperm(sides):
    def scenario(d: Path):
        _dir(d / "dir")
        return outcome(os.link, d / "dir", d / "alias"), listing(d)

    on_both(sides, scenario, expect=(("err", "EPERM"), [b"dir"]))


def test_link_counts(sides):
    def scenario(d: Path):
        _file(d / "f")
        os.link(d / "f", d / "g")
        os.link(d / "f", d / "h")
        _dir(d / "dir")
        for n in ("s1", "s2", "s3"):
            _dir(d / "dir" / n)
        _file(d / "dir" / "file")
        os.unlink(d / "h")
        os.rmdir(d / "dir" / "s3")
        return (
            os.stat(d / "f").st_nlink,
            os.stat(d / "dir").st_nlink,
            os.stat(d / "dir" / "s1").st_nlink,
        )

    on_both(sides, scenario, expect=(2, 4, 2))


def test_write_past_the_end_leaves_a_hole_of_zeros(sides):
    def scenario(d: Path):
        _file(d / "f", b"head")
        with open(d / "f", "r+b") as f:
            f.seek(100_000)
            f.write(b"tail")
        data = (d / "f").read_bytes()
        return len(data), data[:4], data[4:100_000] == bytes(100_000 - 4), data[-4:]

    on_both(sides, scenario, expect=(100_004, b"head", True, b"tail"))


def test_truncate_up_reads_as_zeros_and_down_cuts(sides):
    def scenario(d: Path):
        _file(d / "f", b"abcdef")
        os.truncate(d / "f", 3)
        down = (d / "f").read_bytes()
        os.truncate(d / "f", 70_000)
        up = (d / "f").read_bytes()
        return down, len(up), up[:3], up[3:] == bytes(70_000 - 3)

    on_both(sides, scenario, expect=(b"abc", 70_000, b"abc", True))


def test_st_blocks_counts_written_data(sides):
    def scenario(d: Path):
        _file(d / "f", os.urandom(100_000))
        st = os.stat(d / "f")
        return st.st_blocks * 512 >= 100_000

    on_both(sides, scenario, expect=True)


# ------------------------------------------------ ownership, permissions


def test_new_files_belong_to_the_caller(sides):
    uid, gid, _groups = nobody()

    def scenario(d: Path):
        os.chmod(d, 0o777)

        def make():
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644))
            os.mkdir("dir")
            os.symlink("f", "link")
            os.mkfifo("fifo")
            return [(os.lstat(n).st_uid, os.lstat(n).st_gid) for n in ("f", "dir", "link", "fifo")]

        return as_user(d, make)

    on_both(sides, scenario, expect=[(uid, gid)] * 4)


def test_umask_is_applied(sides):
    def scenario(d: Path):
        os.chmod(d, 0o777)

        def make():
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir("dir", 0o777)
            os.mkfifo("fifo", 0o666)
            os.mknod("sock", stat.S_IFSOCK | 0o666)
            return [oct(stat.S_IMODE(os.lstat(n).st_mode)) for n in ("f", "dir", "fifo", "sock")]

        return as_user(d, make, umask=0o027)

    on_both(sides, scenario, expect=["0o640", "0o750", "0o640", "0o640"])


def test_setgid_directory_passes_its_group_on(sides):
    _uid, gid, _ = nobody()
    other_gid = 100 if gid != 100 else 0

    def scenario(d: Path):
        _dir(d / "shared", mode=0o2777, owner=(0, other_gid))
        os.chmod(d / "shared", 0o2777)

        def make():
            os.close(os.open("shared/f", os.O_CREAT | os.O_WRONLY, 0o644))
            os.mkdir("shared/sub", 0o755)
            return [
                (os.stat(p).st_gid, oct(stat.S_IMODE(os.stat(p).st_mode)))
                for p in ("shared/f", "shared/sub")
            ]

        return as_user(d, make, groups=[])

    on_both(sides, scenario, expect=[(other_gid, "0o644"), (other_gid, "0o2755")])


def test_sticky_directory_refuses_unlink_and_rename_by_another_uid(sides):
    def scenario(d: Path):
        _dir(d / "tmp", mode=0o1777)
        _file(d / "tmp" / "roots", b"r", mode=0o666)

        def attempt():
            return (
                outcome(os.unlink, "tmp/roots"),
                outcome(os.rename, "tmp/roots", "tmp/mine"),
                outcome(lambda: os.close(os.open("tmp/own", os.O_CREAT | os.O_WRONLY))),
                outcome(os.unlink, "tmp/own"),
            )

        return as_user(d, attempt), listing(d / "tmp")

    on_both(
        sides,
        scenario,
        expect=((("err", "EPERM"), ("err", "EPERM"), ("ok", None), ("ok", None)), [b"roots"]),
    )


def test_mode_bits_are_enforced_for_another_uid(sides):
    def scenario(d: Path):
        _file(d / "secret", b"s", mode=0o600)
        _file(d / "readonly", b"r", mode=0o644)
        _dir(d / "closed", mode=0o700)
        _dir(d / "nowrite", mode=0o755)

        def attempt():
            return (
                outcome(os.open, "secret", os.O_RDONLY),
                outcome(os.open, "readonly", os.O_WRONLY),
                outcome(os.listdir, "closed"),
                outcome(os.stat, "closed/x"),
                outcome(os.mkdir, "nowrite/x"),
                outcome(os.access, "readonly", os.R_OK),
                outcome(os.access, "readonly", os.W_OK),
            )

        return as_user(d, attempt)

    acc = ("err", "EACCES")
    on_both(sides, scenario, expect=(acc, acc, acc, acc, acc, ("ok", True), ("ok", False)))


def test_access_as_root(sides):
    def scenario(d: Path):
        _file(d / "plain", b"x", mode=0o644)
        _file(d / "none", b"x", mode=0o000)
        _file(d / "exec", b"x", mode=0o100)
        _dir(d / "dir", mode=0o000)
        return [
            outcome(os.access, d / n, m)
            for n, m in (
                ("plain", os.X_OK),
                ("none", os.R_OK | os.W_OK),
                ("none", os.X_OK),
                ("exec", os.X_OK),
                ("dir", os.X_OK),
                ("dir", os.R_OK | os.W_OK),
            )
        ]

    on_both(
        sides,
        scenario,
        expect=[
            ("ok", False),
            ("ok", True),
            ("ok", False),
            ("ok", True),
            ("ok", True),
            ("ok", True),
        ],
    )


def test_chown_by_a_non_root_owner(sides):
    _uid, _gid, groups = nobody()

    def scenario(d: Path):
        os.chmod(d, 0o777)

        def attempt():
            os.close(os.open("mine", os.O_CREAT | os.O_WRONLY, 0o644))
            res = [
                outcome(os.chown, "mine", 0, -1),  # give it away: refused
                outcome(os.chown, "mine", -1, 0),
            ]  # a group it is not in: refused
            if groups:
                res.append(outcome(os.chown, "mine", -1, groups[0]))  # one of its groups
                res.append(os.stat("mine").st_gid)
            return res

        return as_user(d, attempt, groups=groups)

    expect = [("err", "EPERM"), ("err", "EPERM")]
    if groups:
        expect += [("ok", None), groups[0]]
    on_both(sides, scenario, expect=expect)


def test_write_by_a_non_owner_clears_setuid_and_setgid(sides):
    def scenario(d: Path):
        _file(d / "prog", b"#!/bin/sh\n", mode=0o6777, owner=(0, 0))
        os.chmod(d / "prog", 0o6777)

        def write():
            fd = os.open("prog", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"echo\n")
            finally:
                os.close(fd)

        res = as_user(d, write)
        return res, mode_of(d / "prog"), (d / "prog").read_bytes()

    on_both(sides, scenario, expect=(None, oct(stat.S_IFREG | 0o777), b"#!/bin/sh\necho\n"))


def test_setuid_set_after_an_unprivileged_open_is_cleared_by_the_next_write(sides):
    def scenario(d: Path):
        uid, gid, _ = nobody()
        _file(d / "prog", b"#!/bin/sh\n", mode=0o755, owner=(uid, gid))

        def write():
            fd = os.open("prog", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"a\n")
                os.chmod("prog", 0o6755)  # the owner, while its handle is open
                set_bits = mode_of("prog")
                os.write(fd, b"b\n")
                return set_bits, mode_of("prog")
            finally:
                os.close(fd)

        return as_user(d, write), (d / "prog").read_bytes()

    on_both(
        sides,
        scenario,
        expect=((oct(stat.S_IFREG | 0o6755), oct(stat.S_IFREG | 0o755)), b"#!/bin/sh\na\nb\n"),
    )


def test_open_with_o_trunc_by_a_non_owner_clears_setuid_and_setgid(sides):
    def scenario(d: Path):
        _file(d / "prog", b"#!/bin/sh\n", mode=0o6777, owner=(0, 0))
        os.chmod(d / "prog", 0o6777)

        def truncate():
            os.close(os.open("prog", os.O_WRONLY | os.O_TRUNC))

        return as_user(d, truncate), mode_of(d / "prog"), (d / "prog").read_bytes()

    on_both(sides, scenario, expect=(None, oct(stat.S_IFREG | 0o777), b""))


def test_timestamps_past_2262_are_clamped_not_an_error(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        os.utime(f, ns=(0, 10_000_000_000 * 10**9))  # the year 2286
        return os.stat(f).st_mtime_ns > 9_000_000_000 * 10**9

    assert scenario(sides["chunkfs"])


def test_trusted_xattr_names_are_listed_to_root_only(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x", mode=0o644)
        os.setxattr(f, "trusted.t", b"1")
        os.setxattr(f, "user.u", b"2")
        return sorted(os.listxattr(f)), as_user(d, lambda: sorted(os.listxattr("f")))

    on_both(sides, scenario, expect=(["trusted.t", "user.u"], ["user.u"]))


def test_truncate_by_a_non_owner_clears_setuid(sides):
    def scenario(d: Path):
        _file(d / "prog", b"#!/bin/sh\n", mode=0o4777, owner=(0, 0))
        os.chmod(d / "prog", 0o4777)
        res = as_user(d, lambda: os.truncate("prog", 3))
        return res, mode_of(d / "prog"), (d / "prog").read_bytes()

    on_both(sides, scenario, expect=(None, oct(stat.S_IFREG | 0o777), b"#!/"))


def test_chown_clears_setuid_and_setgid(sides):
    uid, gid, _ = nobody()

    def scenario(d: Path):
        _file(d / "prog", b"x", mode=0o6755)
        os.chmod(d / "prog", 0o6755)
        os.chown(d / "prog", uid, gid)  # by root
        return mode_of(d / "prog")

    on_both(sides, scenario, expect=oct(stat.S_IFREG | 0o755))


def test_chmod_by_the_owner_outside_the_group_drops_setgid(sides):
    uid, _gid, _ = nobody()

    def scenario(d: Path):
        _file(d / "f", b"x", mode=0o644, owner=(uid, 0))  # group root: not one of nobody's

        def attempt():
            os.chmod("f", 0o2755)
            return mode_of("f")

        return as_user(d, attempt, groups=[])

    on_both(sides, scenario, expect=oct(stat.S_IFREG | 0o755))


def test_utimensat_permission_rules(sides):
    def scenario(d: Path):
        _file(d / "writable", b"w", mode=0o666)  # root's, world-writable
        _file(d / "readonly", b"r", mode=0o644)  # root's

        def attempt():
            return (
                outcome(utimensat, "writable", UTIME_NOW, UTIME_NOW),
                outcome(utimensat, "writable", UTIME_OMIT, UTIME_OMIT),
                outcome(utimensat, "writable", 10**9, 2 * 10**9),
                outcome(utimensat, "writable", UTIME_NOW, UTIME_OMIT),
                outcome(utimensat, "readonly", UTIME_NOW, UTIME_NOW),
            )

        return as_user(d, attempt)

    on_both(
        sides,
        scenario,
        expect=(("ok", None), ("ok", None), ("err", "EPERM"), ("err", "EPERM"), ("err", "EACCES")),
    )


def test_utimensat_now_and_omit(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        os.utime(f, ns=(1_000_000_001, 2_000_000_002))
        utimensat(f, UTIME_OMIT, 3_000_000_003)
        st1 = os.stat(f)
        utimensat(f, UTIME_NOW, UTIME_OMIT)
        st2 = os.stat(f)
        return (st1.st_atime_ns, st1.st_mtime_ns, st2.st_atime_ns > 10**18, st2.st_mtime_ns)

    on_both(sides, scenario, expect=(1_000_000_001, 3_000_000_003, True, 3_000_000_003))


def test_explicit_mtime_survives_close_of_a_written_file(sides):
    def scenario(d: Path):
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"data")
            os.utime(d / "f", ns=(5_000_000_005, 6_000_000_006))
        finally:
            os.close(fd)
        return os.stat(d / "f").st_mtime_ns

    on_both(sides, scenario, expect=6_000_000_006)


def tick() -> None:
    """Let the coarse clock that stamps local files move on (it ticks every few ms)."""
    time.sleep(0.02)


_OLD = 1_000_000_000  # an mtime/atime to start from, so that any update shows


def _make_name(d: Path) -> None:
    _file(d / "new")


def _make_dir(d: Path) -> None:
    os.mkdir(d / "newdir")


def _make_symlink(d: Path) -> None:
    os.symlink("target", d / "sym")


def _make_fifo(d: Path) -> None:
    os.mkfifo(d / "fifo")


def _remove_name(d: Path) -> None:
    os.unlink(d / "old")


def _remove_dir(d: Path) -> None:
    os.rmdir(d / "olddir")


def _rename_within(d: Path) -> None:
    os.rename(d / "old", d / "renamed")


def _link(d: Path) -> None:
    os.link(d / "old", d / "linked")


@pytest.mark.parametrize(
    "change",
    [
        _make_name,
        _make_dir,
        _make_symlink,
        _make_fifo,
        _remove_name,
        _remove_dir,
        _rename_within,
        _link,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_name_change_updates_the_parent_mtime_and_ctime(sides, change):
    def scenario(d: Path):
        parent = _dir(d / "p")
        _file(parent / "old", b"x")
        _dir(parent / "olddir")
        os.utime(parent, ns=(_OLD, _OLD))
        before = os.stat(parent)
        tick()
        change(parent)
        after = os.stat(parent)
        return after.st_mtime_ns != _OLD, after.st_ctime_ns > before.st_ctime_ns

    on_both(sides, scenario, expect=(True, True))


def test_rename_across_directories_updates_both_parents(sides):
    def scenario(d: Path):
        src, dst = _dir(d / "src"), _dir(d / "dst")
        _file(src / "f", b"x")
        for p in (src, dst):
            os.utime(p, ns=(_OLD, _OLD))
        tick()
        os.rename(src / "f", dst / "f")
        return os.stat(src).st_mtime_ns != _OLD, os.stat(dst).st_mtime_ns != _OLD

    on_both(sides, scenario, expect=(True, True))


@pytest.mark.parametrize(
    "change, keeps_mtime",
    [
        (lambda f: os.chmod(f, 0o600), True),
        (lambda f: os.chown(f, 65534, 65534), True),
        (lambda f: os.link(f, str(f) + ".link"), True),
        (lambda f: os.rename(f, str(f) + ".moved"), True),
        (lambda f: os.setxattr(f, "user.k", b"v"), True),
        (lambda f: os.utime(f, ns=(_OLD, _OLD)), False),
    ],
    ids=["chmod", "chown", "link", "rename", "setxattr", "utime"],
)
def test_an_inode_change_updates_ctime(sides, change, keeps_mtime):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        os.utime(f, ns=(_OLD, 2 * _OLD))
        before = os.stat(f)
        tick()
        change(f)
        moved = Path(str(f) + ".moved")
        after = os.stat(moved if moved.exists() else f)
        return after.st_ctime_ns > before.st_ctime_ns, after.st_mtime_ns == before.st_mtime_ns

    on_both(sides, scenario, expect=(True, keeps_mtime))


@pytest.mark.parametrize(
    "change",
    [
        lambda fd: os.write(fd, b"more"),
        lambda fd: os.pwrite(fd, b"far", 50_000),
        lambda fd: os.ftruncate(fd, 1),
        lambda fd: os.ftruncate(fd, 10_000),
    ],
    ids=["write", "pwrite-past-end", "truncate-down", "truncate-up"],
)
def test_writes_and_truncates_update_mtime_and_ctime(sides, change):
    def scenario(d: Path):
        f = _file(d / "f", b"content")
        os.utime(f, ns=(_OLD, _OLD))
        before = os.stat(f)
        tick()
        fd = os.open(f, os.O_WRONLY)
        try:
            change(fd)
            during = os.fstat(fd)
        finally:
            os.close(fd)
        after = os.stat(f)
        return (
            during.st_mtime_ns != _OLD,
            during.st_ctime_ns > before.st_ctime_ns,
            after.st_mtime_ns == during.st_mtime_ns,
        )

    on_both(sides, scenario, expect=(True, True, True))


def test_the_mtime_of_a_file_is_its_last_write_not_its_upload(sides):
    def scenario(d: Path):
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"data")
            written = os.fstat(fd).st_mtime_ns
            time.sleep(0.2)
        finally:
            os.close(fd)
        return os.stat(d / "f").st_mtime_ns == written

    on_both(sides, scenario, expect=True)


def test_write_and_namespace_changes_update_times(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        old = 1_000_000_000
        os.utime(f, ns=(old, old))
        os.utime(d, ns=(old, old))
        c0 = os.stat(f).st_ctime_ns
        with open(f, "ab") as fh:
            fh.write(b"more")
        st = os.stat(f)
        d_before = os.stat(d)
        os.link(f, d / "g")
        d_after = os.stat(d)
        return (
            st.st_mtime_ns != old,
            st.st_ctime_ns >= c0,
            d_before.st_mtime_ns == old,
            d_after.st_mtime_ns != old,
            d_after.st_ctime_ns >= d_before.st_ctime_ns,
            os.stat(f).st_ctime_ns >= st.st_ctime_ns,
        )

    on_both(sides, scenario, expect=(True, True, True, True, True, True))


# ------------------------------------------------------------------ xattrs


def test_missing_xattr_is_enodata(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        os.setxattr(f, "user.present", b"v")
        return (
            outcome(os.getxattr, f, "user.missing"),
            outcome(os.removexattr, f, "user.missing"),
            outcome(os.setxattr, f, "user.missing", b"v", os.XATTR_REPLACE),
            outcome(os.setxattr, f, "user.present", b"v", os.XATTR_CREATE),
            outcome(os.getxattr, f, "user.present"),
            outcome(os.listxattr, f),
        )

    on_both(
        sides,
        scenario,
        expect=(
            ("err", "ENODATA"),
            ("err", "ENODATA"),
            ("err", "ENODATA"),
            ("err", "EEXIST"),
            ("ok", b"v"),
            ("ok", ["user.present"]),
        ),
    )


def test_xattr_names_the_kernel_and_ext4_refuse(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        return (
            outcome(os.setxattr, f, b"user.", b"v"),  # empty name in the namespace
            outcome(os.setxattr, f, b"unknown.ns", b"v"),  # no such namespace
            outcome(os.setxattr, f, b"user." + b"n" * 251, b"v"),  # 256 bytes: ERANGE
            outcome(os.listxattr, f),
        )

    on_both(
        sides,
        scenario,
        expect=(("err", "EINVAL"), ("err", "ENOTSUP"), ("err", "ERANGE"), ("ok", [])),
    )


def test_setting_an_xattr_changes_ctime(sides):
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        c0 = os.stat(f).st_ctime_ns
        tick()
        os.setxattr(f, "user.k", b"v1")
        c1 = os.stat(f).st_ctime_ns
        tick()
        os.removexattr(f, "user.k")
        c2 = os.stat(f).st_ctime_ns
        return c1 > c0, c2 > c1

    on_both(sides, scenario, expect=(True, True))


def test_setting_an_xattr_to_the_value_it_has(sides):
    # ext4 treats it as no change (ctime stays); tmpfs stamps ctime anyway:
    # chunkfs must do what the local reference does.
    def scenario(d: Path):
        f = _file(d / "f", b"x")
        os.setxattr(f, "user.k", b"same")
        c0 = os.stat(f).st_ctime_ns
        tick()
        os.setxattr(f, "user.k", b"same")
        c1 = os.stat(f).st_ctime_ns
        tick()
        os.setxattr(f, "user.k", b"same", os.XATTR_REPLACE)
        return c1 != c0, os.stat(f).st_ctime_ns != c1

    on_both(sides, scenario)


# --------------------------------------------------------- special files


def test_mkfifo_makes_a_fifo(sides):
    def scenario(d: Path):
        os.mkfifo(d / "fifo", 0o640)
        st = os.lstat(d / "fifo")
        fd = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)  # a working pipe
        try:
            w = os.open(d / "fifo", os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b"through the pipe")
            os.close(w)
            data = os.read(fd, 100)
        finally:
            os.close(fd)
        return stat.S_ISFIFO(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_size, data

    on_both(sides, scenario, expect=(True, "0o640", 0, b"through the pipe"))


@pytest.mark.parametrize(
    "kind, dev",
    [
        (stat.S_IFCHR, (1, 3)),
        (stat.S_IFBLK, (7, 0)),
        (stat.S_IFCHR, (250, 70000)),
        (stat.S_IFSOCK, (0, 0)),
    ],
)
def test_mknod_keeps_type_and_rdev(sides, kind, dev):
    def scenario(d: Path):
        os.mknod(d / "node", kind | 0o600, os.makedev(*dev))
        st = os.lstat(d / "node")
        return (
            stat.S_IFMT(st.st_mode) == kind,
            oct(stat.S_IMODE(st.st_mode)),
            (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind != stat.S_IFSOCK else dev,
        )

    on_both(sides, scenario, expect=(True, "0o600", dev))


def test_mknod_of_a_device_by_another_uid_is_eperm(sides):
    def scenario(d: Path):
        os.chmod(d, 0o777)
        return as_user(
            d, lambda: outcome(os.mknod, "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        ), listing(d)

    on_both(sides, scenario, expect=(("err", "EPERM"), []))
