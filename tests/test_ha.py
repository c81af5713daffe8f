"""chunkfs on a highly available PostgreSQL: three instances under Patroni
(``patroni.py``) on simulated hosts, synchronous replication, and chunkfs
riding through a crash of the primary, the loss of its host's link (and
its return), a freeze of its host (and its waking up), and a planned
switchover, under load.

The load: two mounts write files (fsync, close, rename into place, fsync
of the directory), a third reads what they acknowledged. After each fault every acknowledged
file must be there with its exact bytes and mode, no file may be torn (a
name holds a whole version or nothing), and ``fsck --verify`` is clean.
Each run prints the acknowledged files, the failover time the clients saw
(first failed operation to the first success after it), and the
operations that failed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cluster as cl
from hosts import Host, Network
from patroni import Member, PatroniCluster

# Bounds (seconds). Every loop below stops at one of them.
LOAD_BEFORE_S = 4.0  # load before the fault
LOAD_AFTER_S = 5.0  # load once every client succeeded again
RECOVERY_BOUND_S = 120.0  # fault to every client working again
MAX_FILE = 192 * 1024  # bytes per file, at most
HEAL_SETTLE_S = 15.0  # load once a lost host is back (past Patroni's ttl)


@dataclass
class Written:
    """A file a writer meant to write: its final name, temporary name,
    bytes' SHA-256 and mode, and how far it was acknowledged.
    """

    name: str
    tmp: str
    sha256: bytes
    size: int
    mode: int
    synced: bool = False  # fsync() and close() returned 0
    renamed: bool = False  # and rename() and the directory's fsync() did
    error: str = ""  # the call that failed, and its error


@dataclass
class Client:
    """One load thread's record: operations done and failed, with times."""

    name: str
    ok: int = 0
    failed: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, errno)
    successes: list[float] = field(default_factory=list)
    longest_s: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    def record(self, started: float, error: OSError | None) -> None:
        now = time.monotonic()
        self.longest_s = max(self.longest_s, now - started)
        if error is None:
            self.ok += 1
            self.successes.append(now)
        else:
            self.failed.append((now, error.errno or 0))

    def outage_s(self) -> float:
        """First failed operation to the first success after it (0: none failed)."""
        if not self.failed:
            return 0.0
        first = self.failed[0][0]
        after = [t for t in self.successes if t > first]
        return (after[0] if after else time.monotonic()) - first


class Load:
    """Writers on ``writer_roots`` and a reader on ``reader_root`` (all the
    same filesystem, through different mounts), in threads, until ``stop``.
    """

    def __init__(self, writer_roots: list[Path], reader_root: Path) -> None:
        self.writer_roots = writer_roots
        self.reader_root = reader_root
        self.written: dict[str, list[Written]] = {}
        self.clients: list[Client] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i, root in enumerate(self.writer_roots):
            client = Client(f"writer{i}")
            self.written[client.name] = []
            self._spawn(client, self._write, client, root / client.name)
        reader = Client("reader")
        self._spawn(reader, self._read, reader)

    def _spawn(self, client: Client, target: Callable[..., None], *args: object) -> None:
        self.clients.append(client)
        thread = threading.Thread(target=target, args=args, name=client.name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _write(self, client: Client, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        rng = random.Random(client.name)
        for i in range(100_000):
            if self._stop.is_set():
                return
            data = rng.randbytes(rng.randrange(MAX_FILE))
            mode = rng.choice((0o600, 0o640, 0o644))
            w = Written(f"f{i}", f".f{i}.tmp", hashlib.sha256(data).digest(), len(data), mode)
            self.written[client.name].append(w)
            started = time.monotonic()
            step = "open"
            try:
                fd = os.open(directory / w.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
                try:
                    step = "write"
                    os.write(fd, data)
                    step = "fsync"
                    os.fsync(fd)
                finally:
                    step = "close" if step == "fsync" else step
                    os.close(fd)
                w.synced = True
                step = "rename"
                os.rename(directory / w.tmp, directory / w.name)
                step = "fsync of the directory"
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)  # a rename is durable once its directory is synced
                finally:
                    os.close(dir_fd)
                w.renamed = True
                client.record(started, None)
            except OSError as exc:
                w.error = f"{step}: {exc}"
                client.record(started, exc)

    def _read(self, client: Client) -> None:
        rng = random.Random(7)
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            done = [(name, w) for name, ws in self.written.items() for w in ws[-50:] if w.renamed]
            if not done:
                time.sleep(0.05)
                continue
            writer, w = rng.choice(done)
            started = time.monotonic()
            try:
                data = (self.reader_root / writer / w.name).read_bytes()
            except OSError as exc:
                client.record(started, exc)
                continue
            client.record(started, None)
            if hashlib.sha256(data).digest() != w.sha256:
                client.mismatches.append(f"{writer}/{w.name}")

    def recovered_since(self, t: float) -> bool:
        """True when every client has succeeded after monotonic time ``t``."""
        return all(c.successes and c.successes[-1] > t for c in self.clients)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
            assert not thread.is_alive(), f"{thread.name} did not stop"


def check_files(load: Load, root: Path) -> tuple[int, list[str]]:
    """Compare what the writers wrote with what ``root`` (a fresh mount)
    holds; return (acknowledged files, problems).
    """
    problems = []
    acked = 0
    for writer, ws in load.written.items():
        directory = root / writer
        present = {p.name: p for p in directory.iterdir()} if directory.exists() else {}
        by_name = {n: w for w in ws for n in (w.name, w.tmp)}
        for name, path in present.items():
            w = by_name.get(name)
            if w is None:
                problems.append(f"{writer}/{name}: never written")
                continue
            data = path.read_bytes()
            # A name holds the whole version or, for a file whose first
            # commit failed, the empty file its create made: never a part.
            if data and hashlib.sha256(data).digest() != w.sha256:
                problems.append(f"{writer}/{name}: torn ({len(data)} of {w.size} bytes)")
        for w in ws:
            if not w.synced:
                continue
            acked += 1
            # An acknowledged rename is at its name; one that failed or was
            # not yet synced (it may or may not have been applied) at one of
            # the two.
            names = [w.name] if w.renamed else [w.name, w.tmp]
            found = [n for n in names if n in present]
            if len(found) != 1:
                problems.append(
                    f"{writer}/{w.name}: acknowledged, found at {found} ({w.error or 'no error'})"
                )
                continue
            st = present[found[0]].stat()
            data = present[found[0]].read_bytes()
            if hashlib.sha256(data).digest() != w.sha256 or (st.st_mode & 0o777) != w.mode:
                problems.append(
                    f"{writer}/{found[0]}: acknowledged, has {len(data)} bytes, "
                    f"mode {st.st_mode & 0o777:o} (wrote {w.size}, {w.mode:o})"
                )
    return acked, problems


@dataclass
class HaCluster:
    """PostgreSQL under Patroni on three simulated hosts; six nodes and the
    mounts on a fourth (``app``), on the filesystem ``dsn`` names.
    """

    net: Network
    app: Host
    pg: PatroniCluster
    dsn: str
    tmp: Path
    stack: contextlib.ExitStack

    def host_of(self, member: Member) -> Host:
        """The simulated host a PostgreSQL member runs on."""
        return next(h for h in self.net.hosts.values() if h.netns == member.netns)

    def mount(self, name: str) -> cl.Mount:
        m = cl.Mount(
            self.dsn,
            self.tmp / f"mnt-{name}",
            cache_dir=self.tmp / f"cache-{name}",
            netns=self.app.netns,
        )
        self.stack.callback(m.unmount)
        return m.mount()


@pytest.fixture
def ha(tmp_path: Path, fuse_ready: None) -> Iterator[HaCluster]:
    with Network() as net, contextlib.ExitStack() as stack:
        pg_hosts = [net.add(f"pg{i}") for i in (1, 2, 3)]
        app = net.add("app")
        pg = PatroniCluster(hosts=[(h.address, h.netns) for h in pg_hosts], clients=net.subnet)
        stack.callback(pg.stop)
        pg.start()
        cl.call_in_netns(app.netns, lambda: cl.run_sql(pg.dsn, "CREATE DATABASE chunkfs"))
        dsn = pg.dsn_for("chunkfs")
        cl.run_chunkfs("mkfs", dsn, netns=app.netns)
        for i in range(6):
            node = cl.NodeProcess(dsn, tmp_path / f"node{i}", netns=app.netns)
            stack.callback(node.stop)
            node.start()
        yield HaCluster(net, app, pg, dsn, tmp_path, stack)


def run_fault(
    ha: HaCluster,
    fault: Callable[[], None],
    what: str,
    heal: Callable[[], None] | None = None,
) -> None:
    """Load, ``fault()``, load until every client works again, ``heal()``
    (the lost host comes back) and load a while longer, then check.
    """
    mounts = [ha.mount(n) for n in ("w1", "w2", "r")]
    load = Load([mounts[0].path, mounts[1].path], mounts[2].path)
    load.start()
    try:
        time.sleep(LOAD_BEFORE_S)
        old = ha.pg.primary()
        assert old is not None
        fault_at = time.monotonic()
        fault()
        new = ha.pg.wait_new_primary(old, RECOVERY_BOUND_S)
        promoted_s = time.monotonic() - fault_at
        cl.wait_until(
            lambda: load.recovered_since(time.monotonic() - 1.0),
            RECOVERY_BOUND_S,
            "every client working again",
        )
        time.sleep(LOAD_AFTER_S)
        if heal is not None:
            heal()
            time.sleep(HEAL_SETTLE_S)  # the old primary rejoins, under load
    finally:
        load.stop()
    for m in mounts:
        m.unmount()
    fresh = ha.mount("check")
    acked, problems = check_files(load, fresh.path)
    failed = sum(len(c.failed) for c in load.clients)
    errors_seen = Counter(
        w.error.split(":")[0] + ": " + w.error.split("] ")[-1].split(":")[0]
        for ws in load.written.values()
        for w in ws
        if w.error
    )
    print(
        f"\n{what}: {old.name} -> {new.name}, promoted after {promoted_s:.1f} s; "
        f"{acked} acknowledged files, all checked; operations: "
        + "; ".join(
            f"{c.name} {c.ok} ok, {len(c.failed)} failed "
            f"({sorted({e for _, e in c.failed})}), outage {c.outage_s():.1f} s, "
            f"longest {c.longest_s:.1f} s"
            for c in load.clients
        )
        + f"; failed calls of the writers: {dict(errors_seen)}"
    )
    assert not problems, problems[:20]
    assert not [m for c in load.clients for m in c.mismatches]
    assert all(e == errno.EIO for c in load.clients for _, e in c.failed), load.clients
    assert acked > 0 and failed < sum(c.ok for c in load.clients)
    fsck = cl.run_chunkfs("fsck", "--verify", ha.dsn, netns=ha.app.netns, check=False)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr


def test_the_primary_crashing_loses_no_acknowledged_file(ha: HaCluster) -> None:
    def crash() -> None:
        primary = ha.pg.primary()
        assert primary is not None
        ha.pg.kill_server(primary)

    run_fault(ha, crash, "primary's PostgreSQL killed (SIGKILL)")


def run_host_loss(
    ha: HaCluster, lose: Callable[[Member], None], regain: Callable[[Member], None], what: str
) -> None:
    """``run_fault`` where the primary's host is lost (``lose(member)``) and
    comes back under load (``regain(member)``, run also when the run fails).
    """
    lost: list[Member] = []

    def fault() -> None:
        primary = ha.pg.primary()
        assert primary is not None
        lose(primary)
        lost.append(primary)

    def heal() -> None:
        while lost:
            regain(lost.pop())

    try:
        run_fault(ha, fault, what, heal=heal)
    finally:
        heal()


def test_the_primary_host_cut_off_loses_no_acknowledged_file(ha: HaCluster) -> None:
    run_host_loss(
        ha,
        lambda m: ha.net.cut(ha.host_of(m)),
        lambda m: ha.net.restore(ha.host_of(m)),
        "primary's host cut off, then back",
    )


def test_a_frozen_primary_waking_up_loses_no_acknowledged_file(ha: HaCluster) -> None:
    # A paused machine whose Patroni wakes up holding an old view must not
    # take the leadership back (Patroni before 3.0.3 did, and the commits
    # of the new primary were discarded).
    run_host_loss(ha, ha.pg.freeze, ha.pg.thaw, "primary's host frozen, then woken")


def test_a_switchover_loses_nothing(ha: HaCluster) -> None:
    def switchover() -> None:
        roles = ha.pg.roles()
        candidate = next(n for n, r in roles.items() if r.startswith("sync_standby"))
        ha.pg.switchover(ha.pg.member(candidate))

    run_fault(ha, switchover, "patronictl switchover")
