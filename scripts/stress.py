"""A stress workload for any directory: several processes doing random
writes, truncates and appends, with a close every few operations, on files of
up to 256 MiB, for a bounded time.

Each process (a real OS process, spawned) owns ``files_per_process`` files
under ``ROOT/pN/`` and loops until its time is up or it has done ``max_ops``
operations: it opens one of its files, does 1 to 8 operations on it, closes
it, and picks another. An operation is

- a ``pwrite`` of 4 KiB..8 MiB (log-uniform) at a random offset, inside the
  file or a little past its end (leaving a hole);
- an append of 4 KiB..8 MiB (``lseek(SEEK_END)`` and ``write``), never past
  the maximum size;
- an ``ftruncate`` to a random size, down (within the current size) or up
  (up to the maximum).

The data are slices of one random 8 MiB buffer per process, at random
offsets, each stamped with the process, file and operation number in its
first 16 bytes, so chunks differ while the generator costs next to no CPU.
Each process keeps a model of its files (sizes, and up to 64 probes per file:
short byte ranges whose expected content it tracks through later writes and
truncates); at the end it checks every file's size, reads every file whole,
and checks the probes. Every failure is recorded as an error, not raised.

``python scripts/stress.py DIR --seconds 30`` runs it on DIR (the files are
removed afterwards unless ``--keep``) and prints the figures, one per line
(``name value unit``). ``disk_usage(path)`` gives the bytes allocated under a
directory (``st_blocks``), e.g. a storage node's data directory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import math
import multiprocessing
import os
import random
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
BUFFER = 8 * MiB  # the largest write or append, and the random buffer's size
MIN_IO = 4 * KiB
PROBES_PER_FILE = 64
PROBE_BYTES = 32
READ_BLOCK = 1 * MiB
MAX_ERRORS = 20  # a process stops after this many errors
# Operation mix: the share of writes and appends; the rest are truncates.
P_WRITE = 0.5
P_APPEND = 0.3


@dataclass
class StressResult:
    """What a stress run did. Byte counts in bytes, ``elapsed`` in seconds
    (the longest process's operation loop, closes included, checks not).
    ``kernel_write_bytes``: what the kernel accounted as written to storage by
    the processes (``/proc/self/io``: ``write_bytes - cancelled_write_bytes``),
    meaningful on a local disk only. ``errors``: one list per process; a
    clean run has none.
    """

    processes: int
    files: int
    app_bytes_written: int = 0
    writes: int = 0
    truncates: int = 0
    appends: int = 0
    closes: int = 0
    elapsed: float = 0.0
    live_bytes: int = 0
    allocated_bytes: int = 0
    read_back_bytes: int = 0
    kernel_write_bytes: int = 0
    close_seconds: float = 0.0
    close_max: float = 0.0
    errors: list[list[str]] = field(default_factory=list)

    @property
    def ops(self) -> int:
        """Writes, truncates and appends (closes are not counted)."""
        return self.writes + self.truncates + self.appends

    @property
    def ops_per_s(self) -> float:
        """Operations per second of the run."""
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def close_mean(self) -> float:
        """Mean seconds a close took."""
        return self.close_seconds / self.closes if self.closes else 0.0

    @property
    def error_count(self) -> int:
        """Errors over all processes (0 in a good run)."""
        return sum(len(e) for e in self.errors)

    def figures(self) -> dict[str, tuple[float, str]]:
        """Every figure as name -> (value, unit), in print order."""
        return {
            "app_written": (self.app_bytes_written / MiB, "MiB"),
            "app_bytes_written": (self.app_bytes_written, "B"),
            "ops": (self.ops, "ops"),
            "writes": (self.writes, "ops"),
            "truncates": (self.truncates, "ops"),
            "appends": (self.appends, "ops"),
            "closes": (self.closes, "closes"),
            "close_mean": (self.close_mean * 1000, "ms"),
            "close_max": (self.close_max * 1000, "ms"),
            "elapsed": (self.elapsed, "s"),
            "ops_per_s": (self.ops_per_s, "ops/s"),
            "live": (self.live_bytes / MiB, "MiB"),
            "allocated": (self.allocated_bytes / MiB, "MiB"),
            "read_back": (self.read_back_bytes / MiB, "MiB"),
            "kernel_written": (self.kernel_write_bytes / MiB, "MiB"),
            "errors": (self.error_count, "errors"),
        }


@dataclass
class _Job:
    """One process's share of the run (picklable)."""

    index: int
    root: str
    seconds: float
    max_ops: int
    max_file_bytes: int
    files: int
    ops_per_close: tuple[int, int]
    seed: int


@dataclass
class _Outcome:
    """What one process reports back."""

    index: int
    writes: int = 0
    truncates: int = 0
    appends: int = 0
    closes: int = 0
    app_bytes: int = 0
    loop_seconds: float = 0.0
    close_seconds: float = 0.0
    close_max: float = 0.0
    read_back: int = 0
    kernel_write_bytes: int = 0
    errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------- the model


class _Model:
    """A file's expected size, and probes: offset -> the bytes expected there."""

    def __init__(self) -> None:
        self.size = 0
        self.probes: dict[int, bytes] = {}

    def write(self, off: int, data: memoryview, rng: random.Random) -> None:
        """Account for ``data`` written at byte ``off``; may add a probe."""
        end = off + len(data)
        if off > self.size:  # the hole reads as zeros
            self._probe_zeros(self.size, off, rng)
        for p, expected in list(self.probes.items()):
            if p < end and p + len(expected) > off:
                lo, hi = max(p, off), min(p + len(expected), end)
                new = bytearray(expected)
                new[lo - p : hi - p] = data[lo - off : hi - off]
                self.probes[p] = bytes(new)
        self.size = max(self.size, end)
        p = off + rng.randrange(len(data))
        self._add(p, bytes(data[p - off : p - off + PROBE_BYTES]), rng)

    def truncate(self, size: int, rng: random.Random) -> None:
        """Account for a truncate to ``size`` bytes (probes cut; zeros past the old end)."""
        for p, expected in list(self.probes.items()):
            if p >= size:
                del self.probes[p]
            elif p + len(expected) > size:
                self.probes[p] = expected[: size - p]
        if size > self.size:
            self._probe_zeros(self.size, size, rng)
        self.size = size

    def forget(self, size: int) -> None:
        """After an error: the content is unknown, the size is what stat says."""
        self.size = size
        self.probes.clear()

    def _probe_zeros(self, start: int, end: int, rng: random.Random) -> None:
        p = rng.randrange(start, end)
        self._add(p, bytes(min(PROBE_BYTES, end - p)), rng)

    def _add(self, p: int, expected: bytes, rng: random.Random) -> None:
        if len(self.probes) >= PROBES_PER_FILE and p not in self.probes:
            del self.probes[rng.choice(list(self.probes))]
        self.probes[p] = expected


# --------------------------------------------------------------- workers

_stop: Event | None = None


def _init_worker(stop: Event) -> None:
    global _stop
    _stop = stop


def _io_written() -> int:
    """Bytes the kernel accounts as written to storage by this process so far."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name} ({exc.strerror})"


def _io_size(rng: random.Random, limit: int) -> int:
    """A size of 4 KiB..8 MiB, log-uniform, at most ``limit`` (>= 1)."""
    return min(limit, int(2 ** rng.uniform(math.log2(MIN_IO), math.log2(BUFFER))))


def _full_pwrite(fd: int, data: memoryview, off: int) -> None:
    while data:
        n = os.pwrite(fd, data, off)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote {n} bytes")
        data, off = data[n:], off + n


def _full_write(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        if n <= 0:
            raise OSError(errno.EIO, f"write wrote {n} bytes")
        data = data[n:]


def _worker(job: _Job) -> _Outcome:
    """One process's loop, then its checks."""
    out = _Outcome(job.index)
    rng = random.Random(f"{job.seed}/{job.index}")
    buf = bytearray(rng.randbytes(BUFFER))
    view = memoryview(buf)
    top = Path(job.root) / f"p{job.index}"
    paths = [top / f"f{i}" for i in range(job.files)]
    models = [_Model() for _ in paths]
    io0 = _io_written()

    def failed(what: str, j: int, exc: OSError) -> None:
        out.errors.append(f"p{job.index} {what} {paths[j].name}: {_describe(exc)}")
        try:
            models[j].forget(os.stat(paths[j]).st_size)
        except OSError as exc2:
            out.errors.append(f"p{job.index} stat {paths[j].name}: {_describe(exc2)}")

    try:
        top.mkdir(parents=True, exist_ok=True)
        for p in paths:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as exc:
        out.errors.append(f"p{job.index} create: {_describe(exc)}")
        return out

    start = time.monotonic()
    deadline = start + job.seconds
    ops = 0
    while ops < job.max_ops and time.monotonic() < deadline and len(out.errors) < MAX_ERRORS:
        if _stop is not None and _stop.is_set():
            break
        j = rng.randrange(len(paths))
        try:
            fd = os.open(paths[j], os.O_RDWR)
        except OSError as exc:
            failed("open", j, exc)
            continue
        m = models[j]
        what = "open"
        try:
            for _ in range(rng.randint(*job.ops_per_close)):
                if ops >= job.max_ops or time.monotonic() >= deadline:
                    break
                ops += 1
                r = rng.random()
                room = job.max_file_bytes - m.size
                if r < P_WRITE + P_APPEND and (r < P_WRITE or room > 0):
                    n = _io_size(rng, min(job.max_file_bytes, room if r >= P_WRITE else BUFFER))
                    s = rng.randrange(BUFFER - max(n, 16) + 1)
                    buf[s : s + 16] = struct.pack("<IIQ", job.index, j, ops)
                    data = view[s : s + n]
                    if r < P_WRITE:
                        off = rng.randint(0, max(0, min(m.size + n, job.max_file_bytes - n)))
                        what = "pwrite"
                        _full_pwrite(fd, data, off)
                        out.writes += 1
                    else:
                        what = "append"
                        off = os.lseek(fd, 0, os.SEEK_END)
                        if off != m.size:
                            raise OSError(errno.EIO, f"lseek(SEEK_END) {off} != size {m.size}")
                        _full_write(fd, data)
                        out.appends += 1
                    out.app_bytes += n
                    m.write(off, data, rng)
                else:
                    what = "ftruncate"
                    if rng.random() < 0.5:
                        size = rng.randint(0, m.size)
                    else:
                        size = rng.randint(m.size, max(m.size, job.max_file_bytes))
                    os.ftruncate(fd, size)
                    out.truncates += 1
                    m.truncate(size, rng)
        except OSError as exc:
            failed(what, j, exc)
        finally:
            t0 = time.monotonic()
            try:
                os.close(fd)
                out.closes += 1
            except OSError as exc:
                failed("close", j, exc)
            took = time.monotonic() - t0
            out.close_seconds += took
            out.close_max = max(out.close_max, took)
    out.loop_seconds = time.monotonic() - start
    out.kernel_write_bytes = _io_written() - io0
    for j, path in enumerate(paths):
        _check(path, models[j], out)
    return out


def _check(path: Path, m: _Model, out: _Outcome) -> None:
    """The file's size, a whole read, and the probes."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != m.size:
                out.errors.append(f"{path.parent.name} {path.name}: size {size}, expected {m.size}")
            total = 0
            while chunk := f.read(READ_BLOCK):
                total += len(chunk)
            out.read_back += total
            if total != size:
                out.errors.append(f"{path.parent.name} {path.name}: read {total} of {size} bytes")
            for p, expected in sorted(m.probes.items()):
                got = os.pread(f.fileno(), len(expected), p)
                if got != expected:
                    out.errors.append(
                        f"{path.parent.name} {path.name}: {len(expected)} bytes at {p} differ"
                    )
    except OSError as exc:
        out.errors.append(f"{path.parent.name} {path.name} check: {_describe(exc)}")


# ------------------------------------------------------------------ runs


def run_stress(
    root: Path,
    *,
    processes: int = 4,
    seconds: float = 60.0,
    max_file_bytes: int = 256 * MiB,
    files_per_process: int = 4,
    ops_per_close: tuple[int, int] = (1, 8),
    max_ops: int = 100_000,
    seed: int = 0,
) -> StressResult:
    """Run the stress under ``root`` (made if missing; the files ``root/pN/fM``
    are created or emptied) and return what it did. The files stay.
    ``max_ops`` bounds each process's operations. The processes are spawned,
    so the caller's main module must be importable without side effects
    (``if __name__ == "__main__"``).
    """
    if processes < 1 or files_per_process < 1 or max_file_bytes < 1:
        raise ValueError("processes, files_per_process and max_file_bytes must be positive")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        _Job(
            i,
            str(root),
            seconds,
            max_ops,
            max_file_bytes,
            files_per_process,
            ops_per_close,
            seed,
        )
        for i in range(processes)
    ]
    result = StressResult(processes, processes * files_per_process)
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    stop = ctx.Event()
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_worker, initargs=(stop,)
    )
    try:
        futures = [pool.submit(_worker, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            try:
                o = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed process is an error
                result.errors.append([f"p{job.index} crashed: {type(exc).__name__}: {exc}"])
                continue
            result.writes += o.writes
            result.truncates += o.truncates
            result.appends += o.appends
            result.closes += o.closes
            result.app_bytes_written += o.app_bytes
            result.elapsed = max(result.elapsed, o.loop_seconds)
            result.close_seconds += o.close_seconds
            result.close_max = max(result.close_max, o.close_max)
            result.read_back_bytes += o.read_back
            result.kernel_write_bytes += o.kernel_write_bytes
            result.errors.append(o.errors)
    finally:
        stop.set()  # on an interrupt, the processes stop at their next operation
        pool.shutdown(wait=True, cancel_futures=True)
    for i in range(processes):
        for j in range(files_per_process):
            with contextlib.suppress(OSError):
                st = os.stat(root / f"p{i}" / f"f{j}")
                result.live_bytes += st.st_size
                result.allocated_bytes += st.st_blocks * 512
    return result


def remove_files(root: Path, processes: int) -> None:
    """Remove what ``run_stress`` made under ``root`` (not ``root`` itself)."""
    for i in range(processes):
        shutil.rmtree(root / f"p{i}", ignore_errors=True)


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (``st_blocks`` x 512 of everything in it,
    itself included, hard links once), as ``du -s`` counts; entries that vanish
    during the walk are skipped.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        total += os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
    stack = [os.fspath(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total


# ------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Run the stress on a directory and print its figures; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="where the files go (made if missing)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the processes run")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--files-per-process", type=int, default=4)
    p.add_argument("--max-file-mib", type=int, default=256, help="largest file")
    p.add_argument("--max-ops", type=int, default=100_000, help="operations per process at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="leave the files")
    args = p.parse_args(argv)
    made = not args.dir.exists()
    try:
        result = run_stress(
            args.dir,
            processes=args.processes,
            seconds=args.seconds,
            max_file_bytes=args.max_file_mib * MiB,
            files_per_process=args.files_per_process,
            max_ops=args.max_ops,
            seed=args.seed,
        )
    except KeyboardInterrupt:
        print("stress: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            remove_files(args.dir, args.processes)
            if made:
                with contextlib.suppress(OSError):
                    args.dir.rmdir()
    for name, (value, unit) in result.figures().items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name} {shown} {unit}")
    for errors in result.errors:
        for e in errors:
            print(f"stress: error: {e}", file=sys.stderr)
    return 1 if result.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
