"""Real tools on a real mount: git, sqlite, tar, rsync -aHAX, cp -a."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path

TIMEOUT = 600


def run(*argv: str | os.PathLike[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd or "/tmp")},
    )
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def special_tree(root: Path) -> Path:
    """Files, hard links, symlinks, a FIFO, a device node, xattrs, odd modes and times."""
    src = root / "special"
    (src / "d" / "e").mkdir(parents=True)
    (src / "file").write_bytes(os.urandom(5000))
    os.link(src / "file", src / "d" / "hardlink")
    os.symlink("../file", src / "d" / "symlink")
    os.symlink("dangling-target", src / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    os.setxattr(src / "file", "user.colour", b"blue")
    os.setxattr(src / "d", "user.dir", b"\x00\x01")
    (src / "d" / "e" / "exec").write_text("#!/bin/sh\n")
    os.chmod(src / "d" / "e" / "exec", 0o4755)
    os.chown(src / "d" / "e", 65534, 65534)
    # Times in the past, with nanoseconds: a time in the current second looks
    # "unchanged" to rsync, which then leaves the copy's time alone.
    entries = sorted(src.rglob("*"), key=lambda p: -len(p.parts))
    for i, p in enumerate([*entries, src]):
        os.utime(
            p,
            ns=(1_000_000_000_123_456_789 + i, 1_100_000_000_987_654_321 + i),
            follow_symlinks=False,
        )
    return src


def stat_fields(root: Path) -> dict[str, tuple]:
    """Every entry's type, mode, owner, size, link count and mtime (ns), by path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mtime = st.st_mtime_ns if not stat.S_ISLNK(st.st_mode) else None
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                st.st_nlink,
                mtime,
                st.st_rdev,
            )
    return out


def contents(root: Path) -> dict[str, bytes]:
    """Regular files' bytes and symlinks' targets, by path (diff -r balks at FIFOs)."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = os.readlink(p).encode()
            elif p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            out[str(p.relative_to(root))] = {a: os.getxattr(p, a) for a in os.listxattr(p)}
    return out


def test_cp_a_keeps_links_special_files_xattrs_and_every_stat_field(mounted, tmp_path):
    src = special_tree(tmp_path)
    run("cp", "-a", src, mounted / "copy")
    assert contents(mounted / "copy") == contents(src)
    assert stat_fields(mounted / "copy") == stat_fields(src)
    assert xattrs(mounted / "copy") == xattrs(src)
    copy = mounted / "copy"
    assert os.stat(copy / "file").st_ino == os.stat(copy / "d" / "hardlink").st_ino


def test_rsync_aHAX_delete_twice_transfers_nothing_the_second_time(mounted, tmp_path):
    src = special_tree(tmp_path)
    run("rsync", "-aHAX", "--delete", f"{src}/", mounted / "mirror")
    assert contents(mounted / "mirror") == contents(src)
    assert stat_fields(mounted / "mirror") == stat_fields(src)
    assert xattrs(mounted / "mirror") == xattrs(src)
    (mounted / "mirror" / "stray").write_text("deleted by --delete")
    out = run("rsync", "-aHAXi", "--delete", f"{src}/", mounted / "mirror")
    # The stray name changed the directory's mtime, which rsync puts back.
    assert out.splitlines() == ["*deleting   stray", ".d..t...... ./"], out
    out = run("rsync", "-aHAXi", "--delete", f"{src}/", mounted / "mirror")
    assert out.strip() == "", out


def test_tar_x_keeps_times_and_modes(mounted, tmp_path):
    src = special_tree(tmp_path)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="special")
    (mounted / "untar").mkdir()
    run("tar", "-xpf", archive, "-C", mounted / "untar", "--xattrs", "--xattrs-include=user.*")
    (tmp_path / "ref").mkdir()
    run("tar", "-xpf", archive, "-C", tmp_path / "ref", "--xattrs", "--xattrs-include=user.*")
    assert contents(mounted / "untar") == contents(tmp_path / "ref")
    assert stat_fields(mounted / "untar") == stat_fields(tmp_path / "ref")
    assert xattrs(mounted / "untar") == xattrs(tmp_path / "ref")


def test_git_clone_commit_gc_fsck(mounted, tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    git = (
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "-c",
        "init.defaultBranch=main",
    )
    run(*git, "init", "-q", cwd=origin)
    for i in range(30):
        (origin / f"f{i}.txt").write_text(f"line {i}\n" * (i + 1))
    run(*git, "add", ".", cwd=origin)
    run(*git, "commit", "-qm", "first", cwd=origin)
    work = mounted / "work"
    run(*git, "clone", "-q", origin, work, cwd=tmp_path)
    for i in range(10):
        (work / f"new{i}.txt").write_text(f"new {i}\n")
        run(*git, "add", f"new{i}.txt", cwd=work)
        run(*git, "commit", "-qm", f"commit {i}", cwd=work)
    (work / "f3.txt").unlink()
    os.rename(work / "f4.txt", work / "renamed.txt")
    run(*git, "add", "-A", cwd=work)
    run(*git, "commit", "-qm", "rename and delete", cwd=work)
    run(*git, "gc", "-q", "--aggressive", "--prune=now", cwd=work)
    run(*git, "fsck", "--full", "--strict", cwd=work)
    assert run(*git, "status", "--porcelain", cwd=work) == ""
    assert len(run(*git, "log", "--oneline", cwd=work).splitlines()) == 12


def test_sqlite_thousands_of_transactions_and_integrity_check(mounted):
    db = sqlite3.connect(mounted / "test.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    db.commit()
    for i in range(2000):
        db.execute("INSERT INTO t (v) VALUES (?)", (f"value {i}" * (i % 7 + 1),))
        if i % 3 == 0:
            db.execute("UPDATE t SET v = v || '!' WHERE id = ?", (i // 2 + 1,))
        db.commit()
    db.execute("DELETE FROM t WHERE id % 5 = 0")
    db.commit()
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1600
    db.close()
    again = sqlite3.connect(mounted / "test.db")
    assert again.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert again.execute("SELECT count(*) FROM t").fetchone()[0] == 1600
    again.close()
