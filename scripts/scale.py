"""How the metadata scales: a filesystem of many files against an empty one.

Starts a throwaway cluster (PostgreSQL, six nodes), makes a directory of
``--dir-entries`` files and measures ``stat``, ``open`` and ``ls -l`` of it
through the filesystem core with cold caches; then fills the filesystem
with ``--files`` files in ``--dirs`` directories (every ``--data-every``-th
with 1 KiB of data, the rest empty), all made through the core, and
measures the same directory again, then ``fsck`` and ``gc`` over the whole
filesystem with their peak memory. Last, the ring alone: 200 nodes in 20
zones, lookup cost, spread and movement when a zone joins. Prints figures
(``--json FILE`` too); asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cluster as cl
from chunkfs import ring
from chunkfs.core import ROOT, open_filesystem
from chunkfs.meta import ROOT_INO, Ino

FILE_MODE = 0o100644
DIR_MODE = 0o40755
CONCURRENCY = 32  # core calls in flight while filling
READDIR_PAGE = 256


def say(message: str) -> None:
    """A progress line on standard error."""
    print(f"# {message}", file=sys.stderr, flush=True)


async def make_tree(dsn: str, spool: str, dirs: list[bytes], per_dir: int, data_every: int) -> None:
    """Make each directory of ``dirs`` in the root with ``per_dir`` files in
    it (every ``data_every``-th file holds 1 KiB; 0: none), through the core.
    """
    async with open_filesystem(dsn, spool) as fs:
        limiter = trio.CapacityLimiter(CONCURRENCY)
        start, made = time.monotonic(), 0

        async def one(parent: Ino, i: int) -> None:
            async with limiter:
                made = await fs.create(parent, b"f%07d" % i, FILE_MODE, os.O_WRONLY, ROOT)
                if data_every and i % data_every == 0:
                    await fs.write(made.fh, 0, os.urandom(1024))
                await fs.release(made.fh)

        for d, name in enumerate(dirs):
            parent = (await fs.mkdir(ROOT_INO, name, DIR_MODE, ROOT)).ino
            async with trio.open_nursery() as nursery:
                for i in range(per_dir):
                    nursery.start_soon(one, parent, i)
            made += per_dir
            if d % 50 == 49:
                say(f"{made} files made, {made / (time.monotonic() - start):.0f} a second")


async def measure_dir(dsn: str, spool: str, name: bytes) -> dict[str, float]:
    """Microseconds per entry of ``stat``, ``open`` + close and ``ls -l``
    (readdir pages and a stat of each entry) of directory ``name``, each
    with a fresh filesystem (cold caches).
    """
    figures = {}

    async def names() -> list[bytes]:
        async with open_filesystem(dsn, spool) as fs:
            parent = (await fs.lookup(ROOT_INO, name)).ino
            out: list[bytes] = []
            after = 0
            for _ in range(10_000_000):
                page = await fs.readdir(parent, after, READDIR_PAGE)
                if not page:
                    return out
                out += [e.name for e in page]
                after = page[-1].cookie
            return out

    entries = await names()
    async with open_filesystem(dsn, spool) as fs:
        parent = (await fs.lookup(ROOT_INO, name)).ino
        start = time.perf_counter()
        inos = [(await fs.lookup(parent, n)).ino for n in entries]
        figures["stat_us"] = (time.perf_counter() - start) / len(entries) * 1e6
    async with open_filesystem(dsn, spool) as fs:
        start = time.perf_counter()
        for ino in inos:
            opened = await fs.open(ino, os.O_RDONLY, ROOT)
            await fs.release(opened.fh)
        figures["open_us"] = (time.perf_counter() - start) / len(entries) * 1e6
    async with open_filesystem(dsn, spool) as fs:
        start = time.perf_counter()
        parent = (await fs.lookup(ROOT_INO, name)).ino
        after, listed = 0, 0
        for _ in range(10_000_000):
            page = await fs.readdir(parent, after, READDIR_PAGE)
            if not page:
                break
            for e in page:
                await fs.getattr(e.attrs.ino)
            listed += len(page)
            after = page[-1].cookie
        figures["ls_l_us"] = (time.perf_counter() - start) / max(listed, 1) * 1e6
    figures["entries"] = len(entries)
    return figures


def tool_run(dsn: str, *args: str) -> dict[str, Any]:
    """Run ``chunkfs ARGS`` on ``dsn``: seconds, exit code, peak memory (MiB)."""
    code = (
        "import resource, sys\n"
        "from chunkfs.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " file=sys.stderr)\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, dsn],
        capture_output=True,
        text=True,
        timeout=7200,
    )
    rss = next(
        (int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss")),
        0,
    )
    return {
        "seconds": round(time.monotonic() - start, 1),
        "exit": proc.returncode,
        "peak_mib": round(rss / 1024, 1),
        "summary": proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-200:]],
    }


def ring_figures() -> dict[str, Any]:
    """200 nodes in 20 zones, R = 2: lookup cost, spread, movement when a
    zone of 10 nodes joins.
    """
    nodes = [f"{i:016x}" for i in range(1, 201)]
    zones = {n: f"z{i % 20}" for i, n in enumerate(nodes)}
    r = ring.Ring(ring.Vnode(p, n) for n in nodes for p in ring.vnode_positions(n))
    keys = [ring.position(i.to_bytes(8, "big")) for i in range(100_000)]
    start = time.perf_counter()
    placed = [r.owners(k, 2, None, zones) for k in keys]
    lookup_us = (time.perf_counter() - start) / len(keys) * 1e6
    counts = dict.fromkeys(nodes, 0)
    for owners in placed:
        for n in owners:
            counts[n] += 1
    mean = statistics.mean(counts.values())
    new = [f"{i:016x}" for i in range(201, 211)]
    zones2 = {**zones, **dict.fromkeys(new, "z20")}
    r2 = ring.Ring(ring.Vnode(p, n) for n in nodes + new for p in ring.vnode_positions(n))
    moved = onto_new = 0
    for k, before in zip(keys, placed, strict=True):
        after = set(r2.owners(k, 2, None, zones2))
        gone = after - set(before)
        moved += len(gone)
        onto_new += len(gone & set(new))
    return {
        "nodes": 200,
        "zones": 20,
        "lookup_us": round(lookup_us, 1),
        "spread_min": round(min(counts.values()) / mean, 3),
        "spread_max": round(max(counts.values()) / mean, 3),
        "moved_share_when_a_21st_zone_joins": round(moved / (2 * len(keys)), 4),
        "expected_share": round(1 / 21, 4),
        "moved_onto_the_new_zone_only": moved == onto_new,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--dirs", type=int, default=1000)
    parser.add_argument("--dir-entries", type=int, default=10_000)
    parser.add_argument("--data-every", type=int, default=100)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    results: dict[str, Any] = {"ring": ring_figures()}
    say(f"ring: {results['ring']}")
    with tempfile.TemporaryDirectory(prefix="chunkfs-scale-") as work:
        spool = os.path.join(work, "spool")
        os.makedirs(spool)
        cluster = cl.Cluster(Path(work) / "cluster", nodes=6, replicas=2).start()
        try:
            dsn = cluster.dsn
            say(f"a directory of {args.dir_entries} entries in an empty filesystem")
            trio.run(make_tree, dsn, spool, [b"big"], args.dir_entries, 0)
            results["empty"] = trio.run(measure_dir, dsn, spool, b"big")
            say(f"empty: {results['empty']}")
            per_dir = max(args.files // args.dirs, 1)
            start = time.monotonic()
            dirs = [b"d%04d" % d for d in range(args.dirs)]
            trio.run(make_tree, dsn, spool, dirs, per_dir, args.data_every)
            results["fill"] = {
                "files": per_dir * args.dirs,
                "seconds": round(time.monotonic() - start, 1),
            }
            results["full"] = trio.run(measure_dir, dsn, spool, b"big")
            say(f"full: {results['full']}")
            results["ratio_full_to_empty"] = {
                k: round(results["full"][k] / results["empty"][k], 2)
                for k in ("stat_us", "open_us", "ls_l_us")
            }
            results["fsck"] = tool_run(dsn, "fsck")
            say(f"fsck: {results['fsck']}")
            results["gc"] = tool_run(dsn, "gc")
            say(f"gc: {results['gc']}")
        finally:
            cluster.stop()
    results["scale_self_peak_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
