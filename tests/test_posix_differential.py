"""Differential POSIX tests: the same random operations on a local directory and on the mount.

A hypothesis ``RuleBasedStateMachine`` draws a sequence of system calls
(open with flags, write / pwrite, read / pread, lseek, truncate / ftruncate,
fsync, close, rename with renameat2 flags, link, unlink, mkdir, rmdir,
symlink, readlink, chmod / fchmod, chown, utimensat, xattrs, mkfifo / mknod,
access, listdir, stat, umask) over a small pool of names, so that they
collide, and applies each one to a directory on the machine's own disk (the
reference: ext4 or tmpfs, under pytest's ``tmp_path``) and to a directory
inside a chunkfs mount. Every result must be the same: return values,
errno names, bytes read. After every step both trees are walked (as root)
and compared: listings, file types, mode bits, uid, gid, size, nlink, rdev,
contents, symlink targets, xattrs, which names are hard links of one inode,
and, per name, whether mtime and ctime changed since the previous step.

The operations run in one worker process (``WORKER_SOURCE``, standard
library only) that works in both directories with the same credentials:
as root, and as ``nobody`` (with the supplementary group ``users`` when the
machine has it, so that a chgrp to a group of the caller is possible). The
worker reaches the directories through descriptors its parent opened, so the
unprivileged run needs no access to the path above them.

Normalised on purpose (by design or meaningless for a comparison):
``st_ino``, ``st_dev``, lseek on a directory (its offsets are opaque cookies
whose range is each filesystem's own), absolute timestamps (only "changed / unchanged" is
compared, plus the exact values ``utimensat`` sets), atime except right after
``utimensat``, the size of directories, and ``st_blocks`` except "non-zero for a
file holding non-zero bytes".

``CHUNKFS_DIFF_EXAMPLES`` sets the number of examples per run (default
``DEFAULT_EXAMPLES``), ``CHUNKFS_DIFF_STEPS`` the steps per example.
"""

from __future__ import annotations

import errno
import grp
import os
import pickle
import pwd
import select
import shutil
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

DEFAULT_EXAMPLES = 40
DEFAULT_STEPS = 30
MAX_OPEN = 4  # open descriptors per side at once
WORKER_TIMEOUT = 120.0  # seconds one operation may take before the test gives up

NOBODY = "nobody"
# Operations that change nothing on a local filesystem (but atime): the trees
# are compared after every other operation.
QUERIES = frozenset(
    {
        "read",
        "pread",
        "lseek",
        "fstat",
        "readlink",
        "getxattr",
        "listxattr",
        "access",
        "listdir",
        "stat",
    }
)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# The worker: a loop reading operations from stdin and answering on stdout.
# Also exec'd (without the loop) by the test itself for ``norm_stat``.
WORKER_SOURCE = r'''
import ctypes, errno, os, pickle, stat, struct, sys, time

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
TYPES = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk", stat.S_IFIFO: "fifo",
         stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock"}
DIR_NLINK = True  # compare the nlink of directories (set from argv in the worker)


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def norm_stat(st):
    """The stat fields that must agree between two filesystems."""
    fmt = stat.S_IFMT(st.st_mode)
    d = {"type": TYPES.get(fmt, oct(fmt)), "mode": oct(stat.S_IMODE(st.st_mode)),
         "uid": st.st_uid, "gid": st.st_gid}
    if fmt != stat.S_IFDIR:
        d["size"] = st.st_size
        d["nlink"] = st.st_nlink
    elif DIR_NLINK:
        d["nlink"] = st.st_nlink
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d


class Skip(Exception):
    pass


def errname(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


def main():
    global DIR_NLINK
    libc = ctypes.CDLL(None, use_errno=True)
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    libc.access.argtypes = [ctypes.c_char_p, ctypes.c_int]

    def check(rc):
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    base = {"local": int(sys.argv[1]), "mount": int(sys.argv[2])}
    DIR_NLINK = sys.argv[3] == "1"
    cur = {}
    fds = {"local": {}, "mount": {}}
    umask0 = 0o022
    os.umask(umask0)

    def spec(t):
        if t[0] == "now":
            return timespec(0, UTIME_NOW)
        if t[0] == "omit":
            return timespec(0, UTIME_OMIT)
        return timespec(t[1] // 10**9, t[1] % 10**9)

    def describe(t, before, after, now):
        if t is None or t[0] == "now":
            return "now" if abs(after - now) < 10 * 10**9 else ("not now", after)
        if t[0] == "omit":
            return "unchanged" if before == after else ("changed", after)
        return after

    # ---- operations: (side, *args) -> value; run in the side's directory
    def op_open(side, slot, path, flags, mode):
        extra = 0
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None:
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                raise Skip("device node: not opened")
            if stat.S_ISFIFO(st.st_mode):
                extra = os.O_NONBLOCK  # never block on a FIFO without a peer
        fds[side][slot] = os.open(path, flags | extra | os.O_CLOEXEC, mode)
        return "fd"

    def op_close(side, slot):
        os.close(fds[side].pop(slot))

    def op_write(side, slot, data):
        return os.write(fds[side][slot], data)

    def op_pwrite(side, slot, data, off):
        return os.pwrite(fds[side][slot], data, off)

    def op_read(side, slot, n):
        return os.read(fds[side][slot], n)

    def op_pread(side, slot, n, off):
        return os.pread(fds[side][slot], n, off)

    def op_lseek(side, slot, off, whence):
        if stat.S_ISDIR(os.fstat(fds[side][slot]).st_mode):
            # a directory's offsets are opaque cookies, and their range is the
            # filesystem's own (ext4: up to LLONG_MAX, tmpfs: no SEEK_END)
            raise Skip("lseek on a directory")
        return os.lseek(fds[side][slot], off, whence)

    def op_ftruncate(side, slot, n):
        os.ftruncate(fds[side][slot], n)

    def op_fsync(side, slot):
        os.fsync(fds[side][slot])

    def op_fstat(side, slot):
        return norm_stat(os.fstat(fds[side][slot]))

    def op_fchmod(side, slot, mode):
        os.fchmod(fds[side][slot], mode)

    def op_truncate(side, path, n):
        os.truncate(path, n)

    def op_rename(side, src, dst, flags):
        if flags == 0:
            os.rename(src, dst)
        else:
            check(libc.renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags))

    def op_link(side, src, dst, follow):
        os.link(src, dst, follow_symlinks=follow)

    def op_unlink(side, path):
        os.unlink(path)

    def op_mkdir(side, path, mode):
        os.mkdir(path, mode)

    def op_rmdir(side, path):
        os.rmdir(path)

    def op_symlink(side, target, path):
        os.symlink(target, path)

    def op_readlink(side, path):
        return os.readlink(path)

    def op_chmod(side, path, mode):
        os.chmod(path, mode)

    def op_chown(side, path, uid, gid, follow):
        os.chown(path, uid, gid, follow_symlinks=follow)

    def op_utime(side, path, atime, mtime, follow):
        flags = 0 if follow else AT_SYMLINK_NOFOLLOW
        try:
            before = os.stat(path, follow_symlinks=follow)
        except OSError:
            before = None
        if atime is None:
            check(libc.utimensat(AT_FDCWD, path, None, flags))
        elif atime[0] == "set" and mtime[0] == "set":
            os.utime(path, ns=(atime[1], mtime[1]), follow_symlinks=follow)
        else:
            times = (timespec * 2)(spec(atime), spec(mtime))
            check(libc.utimensat(AT_FDCWD, path, ctypes.byref(times), flags))
        after = os.stat(path, follow_symlinks=follow)
        now = time.time_ns()
        b = before or after
        return {"atime": describe(atime, b.st_atime_ns, after.st_atime_ns, now),
                "mtime": describe(mtime, b.st_mtime_ns, after.st_mtime_ns, now)}

    def op_setxattr(side, path, name, value, flags, follow):
        os.setxattr(path, name, value, flags, follow_symlinks=follow)

    def op_getxattr(side, path, name, follow):
        return os.getxattr(path, name, follow_symlinks=follow)

    def op_listxattr(side, path, follow):
        return sorted(os.listxattr(path, follow_symlinks=follow))

    def op_removexattr(side, path, name, follow):
        os.removexattr(path, name, follow_symlinks=follow)

    def op_mkfifo(side, path, mode):
        os.mkfifo(path, mode)

    def op_mknod(side, path, mode, major, minor):
        os.mknod(path, mode, os.makedev(major, minor))

    def op_access(side, path, mode):
        check(libc.access(path, mode))

    def op_listdir(side, path):
        return sorted(os.listdir(path))

    def op_stat(side, path, follow):
        return norm_stat(os.stat(path, follow_symlinks=follow))

    ops = {k[3:]: v for k, v in locals().items() if k.startswith("op_")}

    def reset():
        for side in fds:
            for fd in fds[side].values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            fds[side].clear()
        for fd in cur.values():
            os.close(fd)
        cur.clear()
        os.umask(umask0)

    def handle(msg):
        kind = msg[0]
        if kind == "enter":
            reset()
            for side in base:
                cur[side] = os.open(msg[1], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                    dir_fd=base[side])
            return ("ok", None)
        if kind == "reset":
            reset()
            return ("ok", None)
        if kind == "umask":
            return ("ok", oct(os.umask(msg[1])))
        if kind == "fdstat":  # every open descriptor: stat fields and (mtime, ctime)
            out = {}
            for side in fds:
                for slot, fd in fds[side].items():
                    try:
                        st = os.fstat(fd)
                        out[side, slot] = (norm_stat(st), st.st_mtime_ns, st.st_ctime_ns)
                    except OSError as exc:
                        out[side, slot] = (errname(exc), 0, 0)
            return ("ok", out)
        if kind == "whoami":
            return ("ok", (os.getuid(), os.getgid(), sorted(os.getgroups())))
        side, name, args = msg[1], msg[2], msg[3]
        os.fchdir(cur[side])
        try:
            return ("ok", ops[name](side, *args))
        except Skip as exc:
            return ("skip", str(exc))
        except OSError as exc:
            return ("err", errname(exc))
        except Exception as exc:
            return ("exception", type(exc).__name__)

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        msg = pickle.loads(inp.read(struct.unpack("<I", head)[0]))
        if msg[0] == "exit":
            reset()
            return
        reply = pickle.dumps(handle(msg))
        out.write(struct.pack("<I", len(reply)) + reply)
        out.flush()


if __name__ == "__main__":
    main()
'''

_shared: dict[str, Any] = {"__name__": "posix_worker"}
exec(compile(WORKER_SOURCE, "<posix worker>", "exec"), _shared)
norm_stat = _shared["norm_stat"]


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


# ----------------------------------------------------------------- worker


def _python_for(credentials: dict[str, Any]) -> str:
    """A Python interpreter that the worker's uid may run (the venv's may sit
    under a directory only root can enter); the worker needs only the standard
    library.
    """
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        "/usr/bin/python3",
        "/usr/local/bin/python3",
        shutil.which("python3") or "",
    ]
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            ok = (
                subprocess.run(
                    [python, "-I", "-S", "-c", "import ctypes, pickle"],
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=60,
                    **credentials,
                ).returncode
                == 0
            )
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python
    pytest.fail(
        f"no Python interpreter that the worker's uid may run among {candidates}", pytrace=False
    )


class Worker:
    """The process that runs the operations on both sides with one set of credentials."""

    def __init__(
        self,
        local_base: Path,
        mount_base: Path,
        *,
        user: int | None,
        group: int | None,
        extra_groups: list[int] | None,
        dir_nlink: bool,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user, group=group, extra_groups=extra_groups or [])
        python = _python_for(kwargs)
        self.fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (local_base, mount_base)]
        try:
            self.proc = subprocess.Popen(
                [
                    python,
                    "-I",
                    "-S",
                    "-c",
                    WORKER_SOURCE,
                    str(self.fds[0]),
                    str(self.fds[1]),
                    "1" if dir_nlink else "0",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=self.fds,
                cwd="/",
                **kwargs,
            )
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            raise

    def call(self, *msg: Any) -> tuple:
        data = pickle.dumps(msg)
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        head = self._read(4)
        return pickle.loads(self._read(struct.unpack("<I", head)[0]))

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout
        out = self.proc.stdout
        buf = b""
        deadline = time.monotonic() + WORKER_TIMEOUT
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise AssertionError(
                    f"the worker did not answer within {WORKER_TIMEOUT:.0f} s (an operation hangs)"
                )
            chunk = os.read(out.fileno(), n - len(buf))
            if not chunk:
                raise AssertionError(f"the worker died (exit status {self.proc.wait(5)})")
            buf += chunk
        return buf

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin
                data = pickle.dumps(("exit",))
                self.proc.stdin.write(struct.pack("<I", len(data)) + data)
                self.proc.stdin.close()
                self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        finally:
            for fd in self.fds:
                os.close(fd)


# --------------------------------------------------------------- snapshots


@dataclass
class Snapshot:
    """One side's tree: comparable entries, and (ino, mtime, ctime) per path."""

    entries: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    times: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)

    def link_groups(self) -> list[list[bytes]]:
        by_ino: dict[int, list[bytes]] = {}
        for path, (ino, _, _) in self.times.items():
            by_ino.setdefault(ino, []).append(path)
        return sorted(sorted(v) for v in by_ino.values() if len(v) > 1)

    def max_ctime(self) -> int:
        return max((c for _, _, c in self.times.values()), default=0)


def _xattrs(full: bytes) -> dict[str, Any] | str:
    try:
        return {
            n: os.getxattr(full, n, follow_symlinks=False)
            for n in sorted(os.listxattr(full, follow_symlinks=False))
        }
    except OSError as exc:
        return errname(exc)


def snapshot(root: bytes, max_depth: int = 8) -> Snapshot:
    """Walk ``root`` (as root, never following symlinks) and record what must agree."""
    snap = Snapshot()

    def visit(rel: bytes, depth: int) -> None:
        full = root + b"/" + rel if rel else root
        try:
            st = os.lstat(full)
        except OSError as exc:
            snap.entries[rel] = {"lstat": errname(exc)}
            return
        ent = norm_stat(st)
        snap.times[rel] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        snap.entries[rel] = ent
        if stat.S_ISDIR(st.st_mode):
            ent["xattrs"] = _xattrs(full)
            try:
                names = sorted(os.listdir(full))
            except OSError as exc:
                ent["listing"] = errname(exc)
                return
            ent["listing"] = names
            if depth < max_depth:
                for name in names:
                    visit(rel + b"/" + name if rel else name, depth + 1)
        elif stat.S_ISREG(st.st_mode):
            ent["xattrs"] = _xattrs(full)
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as exc:
                ent["content"] = errname(exc)
                return
            ent["content"] = data
            if data.count(0) < len(data):
                # The meaningful part of st_blocks: a file holding real data
                # has blocks (du must not say 0). Files of zeros may be holes,
                # and an empty file may have blocks for its xattrs on ext4.
                ent["blocks"] = "0" if st.st_blocks == 0 else ">0"
        elif stat.S_ISLNK(st.st_mode):
            try:
                ent["target"] = os.readlink(full)
            except OSError as exc:
                ent["target"] = errname(exc)

    visit(b"", 0)
    return snap


def _short(value: Any) -> str:
    if isinstance(value, bytes) and len(value) > 64:
        return f"<{len(value)} bytes: {value[:24]!r}...{value[-24:]!r}>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value)


def _first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return (
                f"first difference at offset {i}: local {a[i : i + 16]!r} chunkfs {b[i : i + 16]!r}"
            )
    return f"lengths differ: local {len(a)} bytes, chunkfs {len(b)} bytes"


def _show_path(p: bytes) -> str:
    return repr(p) if p else "'.' (the test directory)"


# ------------------------------------------------------------ strategies

COMMON_NAMES = [b"a", b"b", b"c", b"d", b"r", b"s"]
ODD_NAMES = [b"sp ace", b"new\nline", b"\xff\xfe-bin", b"x" * 255, b"y" * 256]
names = st.sampled_from(COMMON_NAMES * 6 + ODD_NAMES)
# Mostly names in the test directory or in one of its directories (d and s
# exist at the start), so that operations meet each other's results.
parents = st.sampled_from([b"d", b"s", b"d/d", b"c", b"d", b"s", b"a", b"nodir"])
paths = st.builds(
    lambda parts, slash: b"/".join(parts) + slash,
    st.one_of(
        st.tuples(names),
        st.tuples(names),
        st.tuples(names),
        st.tuples(parents, names),
        st.tuples(parents, names),
    ),
    st.sampled_from([b""] * 15 + [b"/"]),
)
symlink_targets = st.one_of(
    paths,
    st.sampled_from([b"nowhere", b"d/nowhere/x", b"t" * 4095, b"t" * 4096]),
)
offsets = st.one_of(
    st.integers(0, 64),
    st.sampled_from([4095, 4096, 65535, 65536, 131072, 1 << 20]),
    st.integers(0, 300_000),
)
lengths = st.one_of(offsets, offsets, offsets, st.just(-1))
write_data = st.one_of(
    st.binary(min_size=0, max_size=48),
    st.builds(lambda c, n: bytes([c]) * n, st.integers(0, 255), st.integers(1, 70_000)),
)
file_modes = st.one_of(
    st.sampled_from(
        [
            0o644,
            0o600,
            0o666,
            0o755,
            0o777,
            0o000,
            0o4755,
            0o2755,
            0o2745,
            0o1777,
            0o6777,
            0o7777,
            0o444,
        ]
    ),
    st.integers(0, 0o7777),
)
timestamps = st.sampled_from(
    [
        0,
        1,
        999_999_999,
        1_234_567_890_123_456_789,
        1_700_000_000_000_000_001,
        -1_000_000_000_500,
        4_102_444_800_000_000_001,
    ]
)
time_specs = st.one_of(st.just(("now",)), st.just(("omit",)), st.tuples(st.just("set"), timestamps))
xattr_names = st.sampled_from(
    [b"user.a", b"user.b"] * 4
    + [
        b"user." + b"n" * 250,
        b"user." + b"n" * 251,
        b"bogus.ns",
        b"user.",
        b"trusted.t",
        b"security.s",
    ]
)
xattr_values = st.one_of(st.binary(max_size=16), st.just(b"v" * 1000))
uids = st.sampled_from([-1, 0, 65534, 1000])
gids = st.sampled_from([-1, 0, 65534, 100])


def _flag_names(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}[flags & 3]
    rest = [
        n
        for n in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_DIRECTORY", "O_NOFOLLOW")
        if flags & getattr(os, n)
    ]
    return "|".join([acc, *rest])


# --------------------------------------------------------------- machine


@dataclass
class Env:
    worker: Worker
    local_base: bytes
    mount_base: bytes
    owner_uid: int  # who owns the test directory (the worker's uid)
    owner_gid: int
    counter: int = 0


def _populate(root: bytes, env: Env) -> None:
    """The same starting tree on both sides (made by root): every common name
    exists, some owned by ``nobody``, some by root; two hard links (b, d/a), a
    symlink to a directory (c -> d), a sticky world-writable directory (s).
    """
    nobody = pwd.getpwnam(NOBODY)
    os.mkdir(root, 0o755)
    os.chown(root, env.owner_uid, env.owner_gid)
    os.chmod(root, 0o755)

    def file(rel: bytes, data: bytes, mode: int, uid: int, gid: int) -> None:
        p = root + b"/" + rel
        with open(p, "wb") as f:
            f.write(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    def mkdir(rel: bytes, mode: int, uid: int, gid: int) -> None:
        p = root + b"/" + rel
        os.mkdir(p)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    file(b"a", b"hello\n", 0o644, nobody.pw_uid, nobody.pw_gid)
    mkdir(b"d", 0o755, nobody.pw_uid, nobody.pw_gid)
    file(b"d/a", b"two links", 0o664, nobody.pw_uid, nobody.pw_gid)
    os.link(root + b"/d/a", root + b"/b")
    mkdir(b"d/d", 0o755, nobody.pw_uid, nobody.pw_gid)
    os.symlink(b"d", root + b"/c")
    os.chown(root + b"/c", nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    file(b"r", b"root\n", 0o644, 0, 0)
    mkdir(b"s", 0o1777, 0, 0)
    file(b"s/a", b"sa", 0o666, 0, 0)
    file(b"s/b", b"sb", 0o644, nobody.pw_uid, nobody.pw_gid)


class PosixDifferential(RuleBasedStateMachine):
    """Each rule is one system call, run on both sides and compared."""

    env: ClassVar[Env]
    fds = Bundle("fds")

    def __init__(self) -> None:
        super().__init__()
        env = self.env
        env.counter += 1
        self.name = f"ex{env.counter}".encode()
        self.roots = {
            "local": env.local_base + b"/" + self.name,
            "mount": env.mount_base + b"/" + self.name,
        }
        for root in self.roots.values():
            _populate(root, env)
        assert env.worker.call("enter", self.name) == ("ok", None)
        self.history: list[str] = []
        self.open_slots: set[int] = set()
        self.next_slot = 0
        self.prev: dict[str, Snapshot] = {}
        self.prev_fdstat: dict[int, tuple] = {}
        self._check_trees("the starting tree")

    def teardown(self) -> None:
        self.env.worker.call("reset")
        problems = []
        for side, root in self.roots.items():
            try:
                shutil.rmtree(root)
            except OSError as exc:
                problems.append(f"{side}: {exc}")
        if problems:
            raise AssertionError("cleanup of the test directory failed: " + "; ".join(problems))

    # ------------------------------------------------------------ driver

    def _wait_for_new_timestamps(self) -> None:
        # ext4 stamps files from the coarse clock: wait until it has moved past
        # the last ctime we saw, so that "did mtime/ctime change" is observable.
        last = self.prev["local"].max_ctime() if self.prev else 0
        last = max([last] + [local[2] for local, _ in self.prev_fdstat.values()])
        deadline = time.monotonic() + 0.1
        while time.clock_gettime_ns(5) <= last and time.monotonic() < deadline:  # REALTIME_COARSE
            time.sleep(0.001)

    def _run(self, text: str, op: str, *args: Any) -> Any:
        """Run one operation on both sides, compare the results and the trees."""
        self._wait_for_new_timestamps()
        self.history.append(text)
        local = self.env.worker.call("op", "local", op, args)
        mount = self.env.worker.call("op", "mount", op, args)
        if local != mount:
            self._fail(f"results differ:\n  local  : {_short(local)}\n  chunkfs: {_short(mount)}")
        if op not in QUERIES:
            # (a query that changed something shows at the next step's check)
            self._check_trees(text)
        return local

    def _fail(self, what: str) -> None:
        steps = "\n".join(f"  {i + 1:3d}. {h}" for i, h in enumerate(self.history[-60:]))
        raise AssertionError(
            f"chunkfs differs from the local filesystem after step {len(self.history)}: "
            f"{self.history[-1] if self.history else '(setup)'}\n{what}\n"
            f"operations so far (test directory {self.name.decode()}):\n{steps}"
        )

    def _check_trees(self, text: str) -> None:
        snaps = {side: snapshot(root) for side, root in self.roots.items()}
        a, b = snaps["local"], snaps["mount"]
        for path in sorted(set(a.entries) | set(b.entries)):
            ea, eb = a.entries.get(path), b.entries.get(path)
            if ea == eb:
                continue
            if ea is None or eb is None:
                self._fail(
                    f"{_show_path(path)} exists only on the "
                    f"{'chunkfs' if ea is None else 'local'} side"
                )
            assert ea is not None and eb is not None
            lines = []
            for key in sorted(set(ea) | set(eb)):
                va, vb = ea.get(key, "(absent)"), eb.get(key, "(absent)")
                if va != vb:
                    lines.append(f"  {key}: local {_short(va)}  chunkfs {_short(vb)}")
                    if key == "content" and isinstance(va, bytes) and isinstance(vb, bytes):
                        lines.append("    " + _first_difference(va, vb))
            self._fail(f"{_show_path(path)} differs:\n" + "\n".join(lines))
        if a.link_groups() != b.link_groups():
            self._fail(
                f"hard links differ (paths sharing one inode):\n"
                f"  local  : {a.link_groups()}\n  chunkfs: {b.link_groups()}"
            )
        fdstat = self.env.worker.call("fdstat")[1]
        for slot in sorted(self.open_slots):
            la, lb = fdstat.get(("local", slot)), fdstat.get(("mount", slot))
            if la is None or lb is None or la[0] != lb[0]:
                self._fail(
                    f"fstat(fd{slot}) differs:\n  local  : {la and la[0]}\n"
                    f"  chunkfs: {lb and lb[0]}"
                )
            old = self.prev_fdstat.get(slot)
            if old is not None:
                rel = [
                    (
                        f"mtime {'changed' if new[1] != was[1] else 'unchanged'}, "
                        f"ctime {'changed' if new[2] != was[2] else 'unchanged'}"
                    )
                    for new, was in ((la, old[0]), (lb, old[1]))
                ]
                if rel[0] != rel[1]:
                    self._fail(
                        f"timestamps of the file open as fd{slot} (fstat) since the "
                        f"previous step:\n  local  : {rel[0]}\n  chunkfs: {rel[1]}"
                    )
        self.prev_fdstat = {
            slot: (fdstat[("local", slot)], fdstat[("mount", slot)]) for slot in self.open_slots
        }
        if self.prev:
            moved = {side: self._time_relations(self.prev[side], snaps[side]) for side in snaps}
            for path in sorted(moved["local"]):
                if moved["local"][path] != moved["mount"].get(path):
                    self._fail(
                        f"timestamps of {_show_path(path)} since the previous step:\n"
                        f"  local  : {moved['local'][path]}\n"
                        f"  chunkfs: {moved['mount'].get(path)}"
                    )
        self.prev = snaps

    @staticmethod
    def _time_relations(before: Snapshot, after: Snapshot) -> dict[bytes, str]:
        out = {}
        for path, (ino, mtime, ctime) in after.times.items():
            old = before.times.get(path)
            if old is None:
                out[path] = "new name"
            elif old[0] != ino:
                out[path] = "another inode"
            else:
                out[path] = (
                    f"mtime {'changed' if mtime != old[1] else 'unchanged'}, "
                    f"ctime {'changed' if ctime != old[2] else 'unchanged'}"
                )
        return out

    # ----------------------------------------------------------- fd rules

    @precondition(lambda self: len(self.open_slots) < MAX_OPEN)
    @rule(
        target=fds,
        path=paths,
        acc=st.sampled_from([os.O_RDWR, os.O_RDONLY, os.O_WRONLY]),
        creat=st.sampled_from([False, True, True]),
        excl=st.sampled_from([False] * 3 + [True]),
        trunc=st.sampled_from([False, False, True]),
        append=st.sampled_from([False, False, True]),
        extra=st.sampled_from([0] * 6 + [os.O_DIRECTORY, os.O_NOFOLLOW]),
        mode=file_modes,
    )
    def open(self, path, acc, creat, excl, trunc, append, extra, mode):
        flags = (
            acc
            | extra
            | (os.O_CREAT if creat else 0)
            | (os.O_EXCL if excl else 0)
            | (os.O_TRUNC if trunc else 0)
            | (os.O_APPEND if append else 0)
        )
        slot = self.next_slot
        self.next_slot += 1
        res = self._run(
            f"fd{slot} = open({path!r}, {_flag_names(flags)}, {mode:#o})",
            "open",
            slot,
            path,
            flags,
            mode,
        )
        if res[0] != "ok":
            return multiple()
        self.open_slots.add(slot)
        return slot

    @precondition(lambda self: len(self.open_slots) < MAX_OPEN)
    @rule(
        target=fds,
        path=paths,
        acc=st.sampled_from([os.O_RDWR, os.O_WRONLY, os.O_RDONLY]),
        excl=st.booleans(),
        trunc=st.booleans(),
        append=st.sampled_from([False, False, True]),
        mode=file_modes,
    )
    def create(self, path, acc, excl, trunc, append, mode):
        return self.open(path, acc, True, excl, trunc, append, 0, mode)

    @rule(fd=consumes(fds))
    def close(self, fd):
        self.open_slots.discard(fd)
        self._run(f"close(fd{fd})", "close", fd)

    @rule(fd=fds, data=write_data)
    def write(self, fd, data):
        self._run(f"write(fd{fd}, {_short(data)})", "write", fd, data)

    @rule(fd=fds, data=write_data, off=offsets)
    def pwrite(self, fd, data, off):
        self._run(f"pwrite(fd{fd}, {_short(data)}, {off})", "pwrite", fd, data, off)

    @rule(fd=fds, n=offsets)
    def read(self, fd, n):
        self._run(f"read(fd{fd}, {n})", "read", fd, n)

    @rule(fd=fds, n=offsets, off=offsets)
    def pread(self, fd, n, off):
        self._run(f"pread(fd{fd}, {n}, {off})", "pread", fd, n, off)

    @rule(fd=fds, off=st.integers(-10, 300_000), whence=st.sampled_from([0, 1, 2]))
    def lseek(self, fd, off, whence):
        self._run(
            f"lseek(fd{fd}, {off}, {['SEEK_SET', 'SEEK_CUR', 'SEEK_END'][whence]})",
            "lseek",
            fd,
            off,
            whence,
        )

    @rule(fd=fds, n=lengths)
    def ftruncate(self, fd, n):
        self._run(f"ftruncate(fd{fd}, {n})", "ftruncate", fd, n)

    @rule(fd=fds)
    def fsync(self, fd):
        self._run(f"fsync(fd{fd})", "fsync", fd)

    @rule(fd=fds)
    def fstat(self, fd):
        self._run(f"fstat(fd{fd})", "fstat", fd)

    @rule(fd=fds, mode=file_modes)
    def fchmod(self, fd, mode):
        self._run(f"fchmod(fd{fd}, {mode:#o})", "fchmod", fd, mode)

    # --------------------------------------------------------- path rules

    @rule(path=paths, n=lengths)
    def truncate(self, path, n):
        self._run(f"truncate({path!r}, {n})", "truncate", path, n)

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE, 3]))
    def rename(self, src, dst, flags):
        fname = {
            0: "rename",
            1: "renameat2 RENAME_NOREPLACE",
            2: "renameat2 RENAME_EXCHANGE",
            3: "renameat2 RENAME_NOREPLACE|RENAME_EXCHANGE",
        }[flags]
        self._run(f"{fname}({src!r}, {dst!r})", "rename", src, dst, flags)

    @rule(src=paths, dst=paths, follow=st.booleans())
    def link(self, src, dst, follow):
        self._run(
            f"link({src!r}, {dst!r}{', AT_SYMLINK_FOLLOW' if follow else ''})",
            "link",
            src,
            dst,
            follow,
        )

    @rule(path=paths)
    def unlink(self, path):
        self._run(f"unlink({path!r})", "unlink", path)

    @rule(path=paths, mode=st.sampled_from([0o755, 0o777, 0o700, 0o2775, 0o1777, 0o000, 0o7777]))
    def mkdir(self, path, mode):
        self._run(f"mkdir({path!r}, {mode:#o})", "mkdir", path, mode)

    @rule(path=paths)
    def rmdir(self, path):
        self._run(f"rmdir({path!r})", "rmdir", path)

    @rule(link_target=symlink_targets, path=paths)
    def symlink(self, link_target, path):
        self._run(f"symlink({_short(link_target)}, {path!r})", "symlink", link_target, path)

    @rule(path=paths, mode=file_modes)
    def chmod(self, path, mode):
        self._run(f"chmod({path!r}, {mode:#o})", "chmod", path, mode)

    @rule(path=paths, uid=uids, gid=gids, follow=st.booleans())
    def chown(self, path, uid, gid, follow):
        self._run(
            f"{'chown' if follow else 'lchown'}({path!r}, {uid}, {gid})",
            "chown",
            path,
            uid,
            gid,
            follow,
        )

    @rule(
        path=paths,
        times=st.one_of(st.none(), st.tuples(time_specs, time_specs)),
        follow=st.booleans(),
    )
    def utime(self, path, times, follow):
        atime, mtime = times if times else (None, None)
        shown = "NULL" if times is None else f"atime={atime}, mtime={mtime}"
        self._run(
            f"utimensat({path!r}, {shown}{'' if follow else ', AT_SYMLINK_NOFOLLOW'})",
            "utime",
            path,
            atime,
            mtime,
            follow,
        )

    @rule(
        path=paths,
        name=xattr_names,
        value=xattr_values,
        flags=st.sampled_from([0, 0, 1, 2]),
        follow=st.booleans(),
    )
    def setxattr(self, path, name, value, flags, follow):
        fl = ["0", "XATTR_CREATE", "XATTR_REPLACE"][flags]
        self._run(
            f"{'' if follow else 'l'}setxattr({path!r}, {_short(name)}, {_short(value)}, {fl})",
            "setxattr",
            path,
            name,
            value,
            flags,
            follow,
        )

    @rule(path=paths, name=xattr_names, follow=st.booleans())
    def removexattr(self, path, name, follow):
        self._run(
            f"{'' if follow else 'l'}removexattr({path!r}, {_short(name)})",
            "removexattr",
            path,
            name,
            follow,
        )

    @rule(
        path=paths,
        kind=st.sampled_from(["mkfifo", "chr", "blk", "sock", "fifo", "reg0"]),
        perm=st.sampled_from([0o644, 0o600, 0o666, 0o2755]),
        dev=st.sampled_from([(1, 3), (1, 5), (7, 0), (250, 70000)]),
    )
    def mknod(self, path, kind, perm, dev):
        if kind == "mkfifo":
            self._run(f"mkfifo({path!r}, {perm:#o})", "mkfifo", path, perm)
            return
        fmt = {
            "chr": stat.S_IFCHR,
            "blk": stat.S_IFBLK,
            "sock": stat.S_IFSOCK,
            "fifo": stat.S_IFIFO,
            "reg0": 0,
        }[kind]
        mode = fmt | perm
        self._run(f"mknod({path!r}, {kind} {perm:#o}, makedev{dev})", "mknod", path, mode, *dev)

    @rule(
        path=st.one_of(paths, st.just(b".")),
        kind=st.sampled_from(
            [
                "stat",
                "lstat",
                "readlink",
                "listdir",
                "access",
                "listxattr",
                "llistxattr",
                "getxattr",
                "lgetxattr",
            ]
        ),
        mode=st.sampled_from([os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK | os.X_OK]),
        name=xattr_names,
    )
    def inspect(self, path, kind, mode, name):
        """One of the calls that only look: (l)stat, readlink, listdir, access,
        (l)listxattr, (l)getxattr."""
        follow = kind not in ("lstat", "llistxattr", "lgetxattr")
        if kind in ("stat", "lstat"):
            self._run(f"{kind}({path!r})", "stat", path, follow)
        elif kind == "readlink":
            self._run(f"readlink({path!r})", "readlink", path)
        elif kind == "listdir":
            self._run(f"listdir({path!r})", "listdir", path)
        elif kind == "access":
            self._run(f"access({path!r}, {mode})", "access", path, mode)
        elif kind.endswith("listxattr"):
            self._run(f"{kind}({path!r})", "listxattr", path, follow)
        else:
            self._run(f"{kind}({path!r}, {_short(name)})", "getxattr", path, name, follow)

    @rule(mask=st.sampled_from([0o022, 0o000, 0o077, 0o027, 0o002]))
    def umask(self, mask):
        self.history.append(f"umask({mask:#o})")
        self.env.worker.call("umask", mask)


# ---------------------------------------------------------------- tests


def _dir_nlink_counts_subdirs(base: Path) -> bool:
    """True when the local filesystem gives directories 2 + subdirectories links (ext4, tmpfs)."""
    probe = base / "nlink-probe"
    (probe / "sub").mkdir(parents=True)
    try:
        return os.stat(probe).st_nlink == 3
    finally:
        shutil.rmtree(probe)


def _settings() -> settings:
    return settings(
        max_examples=int(os.environ.get("CHUNKFS_DIFF_EXAMPLES", DEFAULT_EXAMPLES)),
        stateful_step_count=int(os.environ.get("CHUNKFS_DIFF_STEPS", DEFAULT_STEPS)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        report_multiple_bugs=False,
        # The same examples on every run (CI included), unless
        # CHUNKFS_DIFF_RANDOM=1 asks for fresh ones.
        derandomize=not os.environ.get("CHUNKFS_DIFF_RANDOM"),
        database=None,
        # Every example costs real I/O on the mount: no "explain" phase, so
        # that the time goes to finding and shrinking.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )


def _run_differential(tmp_path: Path, mounted: Any, *, unprivileged: bool) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the differential tests run as root (they chown, mknod and drop privileges)",
            pytrace=False,
        )
    local_base = tmp_path / "local-ref"
    mount_base = Path(mounted) / ("diff-nobody" if unprivileged else "diff-root")
    local_base.mkdir()
    mount_base.mkdir()
    if unprivileged:
        who = pwd.getpwnam(NOBODY)
        uid, gid = who.pw_uid, who.pw_gid
        try:
            extra = [grp.getgrnam("users").gr_gid]
        except KeyError:
            extra = []
    else:
        uid, gid, extra = 0, 0, None
    for base in (local_base, mount_base):
        os.chown(base, uid, gid)
        os.chmod(base, 0o755)
    worker = Worker(
        local_base,
        mount_base,
        user=uid if unprivileged else None,
        group=gid if unprivileged else None,
        extra_groups=extra,
        dir_nlink=_dir_nlink_counts_subdirs(tmp_path),
    )
    try:
        ident = worker.call("whoami")
        assert ident[0] == "ok" and ident[1][0] == uid, ident
        machine = type(
            "PosixDifferentialRun",
            (PosixDifferential,),
            {
                "env": Env(worker, os.fsencode(local_base), os.fsencode(mount_base), uid, gid),
            },
        )
        run_state_machine_as_test(machine, settings=_settings())
    finally:
        worker.close()


def test_differential_as_root(tmp_path, mounted):
    _run_differential(tmp_path, mounted, unprivileged=False)


def test_differential_as_unprivileged_user(tmp_path, mounted):
    _run_differential(tmp_path, mounted, unprivileged=True)
