"""The chunkfs demo: copy a real tree in with cp -a and rsync -a, and check it.

Starts a throwaway PostgreSQL (the machine's binaries, real fsync), runs
mkfs, starts six storage nodes on loopback and mounts chunkfs in a temp dir.
Copies the Python standard library (thousands of files; site-packages and
dist-packages left out) in with ``cp -a`` and again with ``rsync -a``,
unmounts and mounts again, compares both copies with the source
(``diff -r``), checks in PostgreSQL that every non-empty file has exactly
six chunks tiling it, each on R distinct nodes, that every node holds some,
and cross-checks a few files with ``chunkfs info --json``. Prints a summary.

Everything it started is stopped at the end: on success, on a failed check,
on Ctrl-C or SIGTERM, and when the run goes over ``--timeout`` seconds.
Exit status: 0 all checks passed, 1 a check failed, 2 the cluster could not
be set up, 124 timed out, 130 interrupted.

Run it through ``scripts/demo``, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# The throwaway-cluster harness lives beside the tests, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cluster as cl

log = logging.getLogger("chunkfs.demo")

EXCLUDED = ("site-packages", "dist-packages")  # installed packages, not the stdlib
CHUNKS_PER_FILE = 6
INFO_SAMPLES = 4  # files cross-checked with `chunkfs info --json`


class DemoTimeout(Exception):
    """The run went over its time limit."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP."""


class CheckFailed(Exception):
    """A copy or a check did not give the expected result."""


# ----------------------------------------------------------------- output

_t0 = time.monotonic()


def step(msg: str) -> None:
    """Print a progress line with the time since the start (seconds)."""
    print(f"[{time.monotonic() - _t0:7.1f}s] {msg}", flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- signals


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise DemoTimeout()


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _on_signal_during_cleanup(signum: int, frame: FrameType | None) -> None:
    print("cleaning up, please wait ...", file=sys.stderr, flush=True)


def arm_signals(timeout: float) -> None:
    """Turn Ctrl-C, SIGTERM, SIGHUP and the time limit into exceptions."""
    signal.signal(signal.SIGALRM, _on_alarm)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_stop_signal)
    signal.alarm(max(1, int(timeout)))


def shield_cleanup() -> None:
    """From here on, signals may not interrupt the (bounded) cleanup."""
    signal.alarm(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal_during_cleanup)


# ----------------------------------------------------------------- source


@dataclass
class Tree:
    """What is in the source tree: counts, and the non-empty regular files with their sizes."""

    root: Path
    excluded: tuple[str, ...]
    files: int = 0
    empty_files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # relative path -> size, non-empty files


def default_source() -> tuple[Path, tuple[str, ...]]:
    """The standard library directory and the names in it to leave out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib, tuple(n for n in EXCLUDED if (stdlib / n).exists())


def scan(root: Path, excluded: tuple[str, ...]) -> Tree:
    """Walk ``root`` (without following symlinks, skipping top-level ``excluded``)."""
    tree = Tree(root, excluded)
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in excluded]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                tree.symlinks += 1
            elif stat.S_ISDIR(st.st_mode):
                tree.dirs += 1
            elif stat.S_ISREG(st.st_mode):
                tree.files += 1
                tree.bytes += st.st_size
                if st.st_size:
                    tree.sizes[os.path.relpath(path, root)] = st.st_size
                else:
                    tree.empty_files += 1
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return tree


# ------------------------------------------------------------------ steps


class Deadline:
    """Seconds left until the run's time limit, for subprocess timeouts."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise DemoTimeout()
        return left


def run(argv: list[str], deadline: Deadline, what: str) -> float:
    """Run a command to completion; return its duration in seconds. Raises ``CheckFailed``."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=deadline.left(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DemoTimeout() from None
    if proc.returncode != 0:
        out = "\n".join((proc.stdout + proc.stderr).splitlines()[:20])
        raise CheckFailed(f"{what} exited {proc.returncode}:\n{out}")
    return time.monotonic() - start


def copy_with_cp(tree: Tree, dest: Path, deadline: Deadline) -> float:
    if not tree.excluded:
        return run(["cp", "-a", "--", str(tree.root), str(dest)], deadline, "cp -a")
    dest.mkdir()
    entries = [str(tree.root / e) for e in sorted(os.listdir(tree.root)) if e not in tree.excluded]
    return run(["cp", "-a", "--", *entries, str(dest)], deadline, "cp -a")


def copy_with_rsync(tree: Tree, dest: Path, deadline: Deadline) -> float:
    excludes = [f"--exclude=/{e}" for e in tree.excluded]
    return run(["rsync", "-a", *excludes, f"{tree.root}/", f"{dest}/"], deadline, "rsync -a")


def diff(tree: Tree, copy: Path, deadline: Deadline) -> float:
    excludes = [f"--exclude={e}" for e in tree.excluded]
    return run(
        ["diff", "-r", "--no-dereference", *excludes, str(tree.root), str(copy)],
        deadline,
        f"diff -r {tree.root} {copy}",
    )


# ---------------------------------------------------------- chunk checks


@dataclass
class ChunkReport:
    files_checked: int
    chunk_refs: int
    objects_per_node: dict[str, int]
    problems: list[str]


Children = dict[int, dict[str, int]]  # directory ino -> name -> ino
ChunkMaps = dict[int, list[dict[str, Any]]]  # ino -> its chunk rows


def load_metadata(dsn: str) -> tuple[Children, dict[int, int], ChunkMaps]:
    """Directory entries, file sizes and chunk maps (with their holders) from PostgreSQL."""
    dentries, inodes, chunks = cl.run_sql(
        dsn,
        "SELECT parent, name, ino FROM dentries",
        "SELECT ino, size FROM inodes",
        """SELECT c.ino, c.chunk_index, c."offset", c.length, c.chunk_id,
                  array_remove(array_agg(r.node_id), NULL) AS nodes
           FROM chunks c LEFT JOIN chunk_replicas r USING (chunk_id)
           GROUP BY c.ino, c.chunk_index, c."offset", c.length, c.chunk_id""",
        timeout=300,
    )
    children: Children = {}
    for d in dentries:
        children.setdefault(d["parent"], {})[os.fsdecode(bytes(d["name"]))] = d["ino"]
    sizes = {r["ino"]: r["size"] for r in inodes}
    maps: ChunkMaps = {}
    for c in chunks:
        maps.setdefault(c["ino"], []).append(c)
    return children, sizes, maps


def resolve(children: Children, rel: str) -> int | None:
    """The inode of ``rel`` (a path inside the mount), walking dentries from the root."""
    ino = 1
    for part in Path(rel).parts:
        child = children.get(ino, {}).get(part)
        if child is None:
            return None
        ino = child
    return ino


def check_chunk_map(rel: str, size: int, chunks: list[dict[str, Any]], replicas: int) -> str | None:
    """What is wrong with one file's chunk map, or None."""
    chunks = sorted(chunks, key=lambda c: c["chunk_index"])
    if [c["chunk_index"] for c in chunks] != list(range(CHUNKS_PER_FILE)):
        return f"{rel}: chunk indexes {[c['chunk_index'] for c in chunks]}"
    offset = 0
    for c in chunks:
        if c["offset"] != offset:
            return f"{rel}: chunk {c['chunk_index']} at offset {c['offset']}, expected {offset}"
        offset += c["length"]
        if c["chunk_id"] is None:  # a hole: zeros, stored on no node
            continue
        if len(set(c["nodes"])) != replicas:
            return f"{rel}: chunk {c['chunk_index']} on {len(set(c['nodes']))} nodes, expected {replicas}"
    if offset != size:
        return f"{rel}: chunks cover {offset} bytes of {size}"
    return None


def check_chunks(dsn: str, tree: Tree, copies: list[str], replicas: int) -> ChunkReport:
    """Every non-empty file of every copy: the right size and six chunks on R
    nodes each (a hole on none).
    """
    children, sizes, maps = load_metadata(dsn)
    problems: list[str] = []
    holders: Counter[str] = Counter()  # node id -> distinct chunk objects it holds
    seen_chunks: set[bytes] = set()
    checked = refs = 0
    for copy in copies:
        for rel, size in tree.sizes.items():
            path = os.path.join(copy, rel)
            ino = resolve(children, path)
            if ino is None:
                problems.append(f"{path}: not in the dentries table")
                continue
            if sizes.get(ino) != size:
                problems.append(
                    f"{path}: size {sizes.get(ino)} in PostgreSQL, {size} in the source"
                )
            problem = check_chunk_map(path, size, maps.get(ino, []), replicas)
            if problem:
                problems.append(problem)
            checked += 1
            for c in maps.get(ino, []):
                refs += 1
                if c["chunk_id"] not in seen_chunks:  # identical content shares objects
                    seen_chunks.add(c["chunk_id"])
                    holders.update(c["nodes"])
    return ChunkReport(checked, refs, dict(holders), problems)


def cross_check_with_info(mount: cl.Mount, tree: Tree, copies: list[str]) -> list[str]:
    """Compare ``chunkfs info --json`` (the user-facing contract) on a few files."""
    rels = sorted(tree.sizes, key=lambda r: tree.sizes[r])
    sample = {rels[-1], rels[0]} | set(random.Random(7).sample(rels, min(INFO_SAMPLES, len(rels))))
    problems = []
    for rel in sorted(sample):
        for copy in copies:
            path = mount / copy / rel
            info = cl.chunkfs_json("info", str(path), "--json")
            chunks = info.get("chunks", [])
            if info.get("size") != tree.sizes[rel] or len(chunks) != CHUNKS_PER_FILE:
                problems.append(
                    f"chunkfs info {path}: size {info.get('size')}, {len(chunks)} chunks"
                )
            elif sum(c["length"] for c in chunks) != info["size"] or not all(
                c["nodes"] or c["hole"] for c in chunks
            ):
                problems.append(
                    f"chunkfs info {path}: chunks do not tile the file or have no nodes"
                )
    return problems


# ----------------------------------------------------------------- report


@dataclass
class Copy:
    name: str
    dest: str
    seconds: float = 0.0
    diff_seconds: float = 0.0


def print_summary(
    tree: Tree,
    copies: list[Copy],
    report: ChunkReport,
    c: cl.Cluster,
    status: dict[str, Any],
    checks: list[tuple[str, bool, str]],
) -> None:
    print()
    print(
        f"source   {tree.root}"
        + (f"  (without {', '.join(tree.excluded)})" if tree.excluded else "")
    )
    print(
        f"         {tree.files:,} files ({tree.empty_files:,} empty), {tree.dirs:,} directories, "
        f"{tree.symlinks:,} symlinks, {human_bytes(tree.bytes)}"
    )
    print(f"cluster  {len(c.nodes)} storage nodes, {c.replicas} replicas, PostgreSQL with fsync on")
    print()
    print(
        f"{'copy':<10} {'files':>8} {'bytes':>10} {'seconds':>8} {'MB/s':>7}   "
        f"{'read back (diff -r)':>20}"
    )
    for cp in copies:
        rate = tree.bytes / 1e6 / cp.seconds if cp.seconds else 0.0
        read_rate = tree.bytes / 1e6 / cp.diff_seconds if cp.diff_seconds else 0.0
        print(
            f"{cp.name:<10} {tree.files:>8,} {human_bytes(tree.bytes):>10} {cp.seconds:>8.1f} "
            f"{rate:>7.2f}   {cp.diff_seconds:>8.1f} s {read_rate:>7.2f} MB/s"
        )
    print()
    nodes_by_id = {n.get("id"): n for n in status.get("nodes", [])}
    print(f"{'node':<18} {'url':<24} {'chunk objects':>14} {'used':>10}")
    for node in c.nodes:
        info = nodes_by_id.get(node.node_id, {})
        objects = report.objects_per_node.get(node.node_id or "", 0)
        print(
            f"{node.node_id or '?':<18} {node.url:<24} {objects:>14,} "
            f"{human_bytes(info.get('used_bytes', 0)):>10}"
        )
    print()
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
    print()


# ------------------------------------------------------------------- main


def demo(args: argparse.Namespace, workdir: Path, deadline: Deadline) -> bool:
    """The demo proper; returns True when every check passed."""
    source, excluded = (Path(args.source), ()) if args.source else default_source()
    step(f"scanning {source}")
    tree = scan(source, excluded)
    if not tree.sizes:
        raise CheckFailed(f"{source} has no non-empty files to copy")
    step(
        f"{tree.files:,} files, {human_bytes(tree.bytes)}; starting PostgreSQL, mkfs, "
        f"{args.nodes} storage nodes"
    )
    c = cl.Cluster(workdir, nodes=args.nodes, replicas=args.replicas, fast=False)
    with _cluster(c):
        mount = c.mount(workdir / "mnt")
        step(f"mounted at {mount.path}")
        copies = [Copy("cp -a", "cp"), Copy("rsync -a", "rsync")]
        step("copying with cp -a ...")
        copies[0].seconds = copy_with_cp(tree, mount / "cp", deadline)
        step(f"cp -a done in {copies[0].seconds:.1f} s; copying with rsync -a ...")
        copies[1].seconds = copy_with_rsync(tree, mount / "rsync", deadline)
        step(f"rsync -a done in {copies[1].seconds:.1f} s; unmounting and mounting again")
        mount.unmount()
        mount.mount()
        checks: list[tuple[str, bool, str]] = []
        for cp in copies:
            step(f"diff -r {source} {mount / cp.dest}")
            try:
                cp.diff_seconds = diff(tree, mount / cp.dest, deadline)
                checks.append((f"diff -r of the {cp.name} copy (after a remount)", True, ""))
            except CheckFailed as exc:
                checks.append((f"diff -r of the {cp.name} copy (after a remount)", False, ""))
                print(exc, file=sys.stderr)
        step("checking chunk maps in PostgreSQL")
        report = check_chunks(c.dsn, tree, [cp.dest for cp in copies], args.replicas)
        checks.append(
            (
                f"six chunks per non-empty file, each on {args.replicas} distinct nodes",
                not report.problems,
                f"{report.files_checked:,} files, {report.chunk_refs:,} chunks"
                + (
                    f"; {len(report.problems)} problems, e.g. {report.problems[0]}"
                    if report.problems
                    else ""
                ),
            )
        )
        empty_nodes = [
            n.node_id for n in c.nodes if not report.objects_per_node.get(n.node_id or "")
        ]
        checks.append(
            (
                "every node holds chunks",
                not empty_nodes,
                f"none on {', '.join(map(str, empty_nodes))}" if empty_nodes else "",
            )
        )
        step("cross-checking with chunkfs info --json")
        info_problems = cross_check_with_info(mount, tree, [cp.dest for cp in copies])
        checks.append(
            ("chunkfs info --json agrees", not info_problems, "; ".join(info_problems[:3]))
        )
        status = c.status()
        step("done; unmounting and stopping the cluster")
        shield_cleanup()
    print_summary(tree, copies, report, c, status, checks)
    return all(ok for _, ok, _ in checks)


class _cluster:
    """Start a cluster; on leaving, stop it (also after errors and signals)."""

    def __init__(self, c: cl.Cluster) -> None:
        self.c = c

    def __enter__(self) -> cl.Cluster:
        return self.c.start()

    def __exit__(self, *exc: object) -> None:
        shield_cleanup()
        try:
            self.c.stop()
        except cl.ClusterError as err:
            print(f"demo: cleanup: {err}", file=sys.stderr)


def remove_workdir(workdir: Path) -> None:
    """Remove the temp dir, unless something is still mounted in it (never delete through a mount)."""
    inside = [p for p in cl.mount_points() if p == str(workdir) or p.startswith(f"{workdir}/")]
    if inside:
        print(
            f"demo: left {workdir} in place: still mounted at {', '.join(inside)}", file=sys.stderr
        )
        return
    shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    p.add_argument("--source", help="tree to copy (default: the Python standard library)")
    p.add_argument("--nodes", type=int, default=6, help="storage nodes (default 6)")
    p.add_argument("--replicas", type=int, default=2, help="copies of each chunk (default 2)")
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("CHUNKFS_DEMO_TIMEOUT", 3600)),
        help="seconds the whole run may take (default 3600, or $CHUNKFS_DEMO_TIMEOUT)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the cluster helpers do")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for tool in ("cp", "rsync", "diff", "fusermount3"):
        if not shutil.which(tool):
            print(f"demo: {tool} is missing (run scripts/setup)", file=sys.stderr)
            return 2
    deadline = Deadline(args.timeout)
    arm_signals(args.timeout)
    workdir = Path(tempfile.mkdtemp(prefix="chunkfs-demo-"))
    try:
        ok = demo(args, workdir, deadline)
    except cl.ClusterError as exc:
        print(f"demo: cluster: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except DemoTimeout:
        print(f"demo: timed out after {args.timeout:.0f} s", file=sys.stderr)
        return 124
    except Interrupted as exc:
        print(f"demo: interrupted ({exc})", file=sys.stderr)
        return 130
    finally:
        shield_cleanup()
        cl.stop_all()  # anything the cluster's own stop could not reach
        remove_workdir(workdir)
    print("demo: all checks passed" if ok else "demo: FAILED: see the checks above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
