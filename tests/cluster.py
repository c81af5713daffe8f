"""Throwaway chunkfs clusters for the demo, the benchmark and the tests.

Not part of the installed package: the tests, scripts/demo.py and
scripts/bench.py import it as ``cluster`` from this directory. Synchronous
helpers built on subprocesses (SQL goes through ``chunkfs.pg``):

- ``Postgres``: a temporary PostgreSQL server made from the machine's
  binaries (initdb / pg_ctl), on 127.0.0.1, trust auth, superuser
  ``postgres``; run as the ``postgres`` user when the caller is root.
- ``NodeProcess``: one ``chunkfs node`` process with its log in a file.
- ``Mount``: one ``chunkfs mount`` (the background form) and its unmount.
- ``Cluster``: all of them together: PostgreSQL, mkfs, N nodes, mounts.

Every wait is bounded (timeouts are in seconds) and raises ``ClusterError``
when it runs out. Each object stops what it started; ``stop_all`` (also run
at interpreter exit) stops whatever this process started and left running,
mounts first, then nodes, then servers.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio
from prometheus_client.parser import text_string_to_metric_families

from chunkfs import errors, pg
from chunkfs.nodeclient import tls_context

log = logging.getLogger(__name__)

T = TypeVar("T")

HOST = "127.0.0.1"
# Seconds a node may take from exec to a healthy /v1/health.
NODE_READY_TIMEOUT = 20.0
# Seconds `chunkfs mount` may take to return (it returns once mounted).
MOUNT_TIMEOUT = 60.0
# Seconds any other `chunkfs` command (mkfs, status, info ...) may take.
COMMAND_TIMEOUT = 120.0

# Loopback traffic must not go through an HTTP proxy set in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ClusterError(RuntimeError):
    """A cluster component failed to start, stop or answer in time."""


# ------------------------------------------------------------------ helpers


def chunkfs_command(*args: str) -> list[str]:
    """The argv that runs ``chunkfs ARGS`` with this interpreter (PATH-independent)."""
    return [sys.executable, "-m", "chunkfs", *args]


def in_netns(argv: list[str], netns: str | None) -> list[str]:
    """``argv`` run in the network namespace ``netns`` (``ip netns`` name;
    None: this one). nsenter changes only the network namespace, so FUSE
    mounts stay visible (``ip netns exec`` would give a mount namespace of
    its own).
    """
    return argv if netns is None else ["nsenter", f"--net=/run/netns/{netns}", *argv]


_CLONE_NEWNET = 0x40000000


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in the network namespace ``netns`` (None: here). It runs in
    a thread of its own, since ``setns`` moves only the calling thread.
    """
    if netns is None:
        return fn()

    def entered() -> T:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns to {netns} failed")
        finally:
            os.close(fd)
        return fn()

    return _in_thread(entered)


def run_chunkfs(
    *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``chunkfs ARGS`` to completion (in network namespace ``netns``,
    if given) and capture its output (text).

    Raises ``ClusterError`` carrying the last line of stderr when it exits
    non-zero (unless ``check`` is false), or when it runs over ``timeout``.
    Not for ``mount``, whose daemon would hold the output pipes open.
    """
    argv = in_netns(chunkfs_command(*args), netns)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`chunkfs {' '.join(args)}` ran over {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise ClusterError(
            f"`chunkfs {pg.redact_dsn(' '.join(args))}` exited {proc.returncode}: "
            f"{_last_line(proc.stderr or proc.stdout)}"
        )
    return proc


def chunkfs_json(*args: str, timeout: float = COMMAND_TIMEOUT) -> Any:
    """Run ``chunkfs ARGS`` (which must print JSON) and return the parsed output."""
    out = run_chunkfs(*args, timeout=timeout).stdout
    try:
        return json.loads(out)
    except ValueError:
        raise ClusterError(f"`chunkfs {args[0]}` printed no JSON: {out[:200]!r}") from None


def free_ports(count: int = 1, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (they may be taken later)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it holds; raise ``ClusterError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _child_env() -> dict[str, str]:
    """The environment for child processes: unbuffered output, no stray PG* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _tail(path: Path, lines: int = 15, start: int = 0) -> str:
    """The last ``lines`` lines of a log file from byte ``start`` on ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _pdeathsig_setup() -> Callable[[], None] | None:
    """A preexec_fn that makes a child get SIGTERM when this process dies.

    Linux delivers it when the forking *thread* exits, so it is only set up
    from the main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG

    return setup


def _spawn(
    argv: list[str], log_path: Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log_path`` (a file, not a
    pipe: a daemon it leaves behind inherits it) in a session of its own, so
    Ctrl-C reaches only us and we stop what we started in order.
    """
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
            preexec_fn=preexec_fn,
        )


def _stat_fields(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...);
    empty when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_pids_gone(pids: Iterable[int], timeout: float, what: str) -> None:
    """Wait for processes that are not our children to exit; SIGTERM, then SIGKILL them."""
    pids = [p for p in pids if _pid_alive(p)]
    for sig, wait in ((None, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            log.warning("%s still running: sending %s", what, sig.name)
            for pid in pids:
                _signal(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return
    raise ClusterError(f"{what} (pids {pids}) survived SIGKILL")


# ------------------------------------------------------------ live objects

# Everything started and not yet stopped, so stop_all can clean up after a crash.
_live: dict[int, Any] = {}


def _register(obj: Any) -> None:
    _live[id(obj)] = obj


def _unregister(obj: Any) -> None:
    _live.pop(id(obj), None)


def stop_all() -> None:
    """Stop every mount, gateway, node and server this process started and left running.

    Mounts go first (they need nodes and PostgreSQL to flush), then gateways, nodes,
    then servers. Never raises: failures are logged.
    """
    objs = list(_live.values())[::-1]
    for kind, method in (
        (Mount, "unmount"), (GatewayProcess, "stop"), (NodeProcess, "stop"), (Postgres, "stop"),
    ):  # fmt: skip
        for obj in objs:
            if isinstance(obj, kind):
                try:
                    getattr(obj, method)()
                except Exception:
                    log.exception("could not stop %r", obj)


atexit.register(stop_all)


# ------------------------------------------------------------- databases


def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a helper thread: a thread of its own can run ``trio.run``
    whatever loop (trio, asyncio) the caller is running.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def run_sql(dsn: str, *statements: str, timeout: float = 30.0) -> list[list[dict[str, Any]]]:
    """Run SQL statements one by one, outside any transaction, on ``dsn``.

    Returns the rows of each statement as dicts (one list per statement).
    Raises ``ClusterError`` (one line) when the server does not answer
    within ``timeout`` seconds (to connect, then per statement) or a
    statement fails.
    """

    failed: list[Exception] = []

    async def run() -> list[list[dict[str, Any]]]:
        async with pg.open_database(
            dsn, min_size=1, max_size=1, connect_timeout=timeout, command_timeout=timeout
        ) as db:
            try:
                return [[dict(r) for r in await db.fetch(s)] for s in statements]
            except Exception as exc:
                # Kept because closing the pool after a statement that ran
                # out of time can raise a ConnectionError in its place.
                failed.append(exc)
                raise

    try:
        return _in_thread(lambda: trio.run(run))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        # MetadataUnavailable when the server does not answer; a refused
        # statement comes as asyncpg's own error (chunkfs.pg exports no base
        # class for those); trio's nurseries may wrap either in a group.
        cause = failed[0] if failed else errors.leaf(exc)
        message = str(cause).strip().partition("\n")[0] or type(cause).__name__
        raise ClusterError(f"SQL on {pg.redact_dsn(dsn)} failed: {message}") from None


def database_dsn(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` (URL or ``key=value`` form)."""
    if "://" in dsn:
        parts = urllib.parse.urlsplit(dsn)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name)))
    if re.search(r"\bdbname\s*=", dsn):
        return re.sub(r"\bdbname\s*=\s*('[^']*'|\S+)", f"dbname={name}", dsn)
    return f"{dsn} dbname={name}".strip()


def _check_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> str:
    """Create database ``name`` (a copy of ``template`` if given) and return its DSN.

    ``admin_dsn`` must allow CREATE DATABASE. Raises ``ClusterError`` on
    failure (e.g. the name exists) and ``ValueError`` for a name that is not
    a plain identifier.
    """
    sql = f'CREATE DATABASE "{_check_ident(name)}"'
    if template:
        sql += f' TEMPLATE "{_check_ident(template)}"'
    run_sql(admin_dsn, sql)
    return database_dsn(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions (PostgreSQL 13+)."""
    run_sql(admin_dsn, f'DROP DATABASE IF EXISTS "{_check_ident(name)}" WITH (FORCE)')


# --------------------------------------------------------------- Postgres


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key of /usr/lib/postgresql/<version>/bin by version number."""
    return tuple(int(p) for p in re.findall(r"\d+", bindir.parent.name)) or (-1,)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))


def find_pg_bindir() -> Path:
    """The directory holding PostgreSQL's initdb, pg_ctl and postgres.

    Looks at ``$CHUNKFS_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, then PATH. Raises ``ClusterError`` with a
    one-line message when none has them.
    """
    candidates: list[Path] = []
    if os.environ.get("CHUNKFS_PG_BINDIR"):
        candidates.append(Path(os.environ["CHUNKFS_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    raise ClusterError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install the Debian "
        "package 'postgresql' (scripts/setup does) or set CHUNKFS_PG_BINDIR"
    )


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ClusterError(
        "running as root, and there is no 'postgres' or 'nobody' user to run PostgreSQL as"
    )


class Postgres:
    """A throwaway PostgreSQL server on ``host`` (127.0.0.1; in network
    namespace ``netns``, if given) with trust auth, from loopback and from
    the network ``clients`` (a CIDR, if given).

    Its data directory, socket directory and log live in one temporary
    directory, which ``stop`` removes. The superuser is ``postgres``. When
    the caller is root the server runs as the ``postgres`` user, since
    PostgreSQL refuses root. ``fast=True`` turns fsync, synchronous_commit
    and full_page_writes off: for tests only, as a crash then loses data.
    """

    def __init__(
        self,
        *,
        fast: bool = False,
        port: int | None = None,
        bindir: Path | None = None,
        max_connections: int = 300,
        timeout: float = 60.0,
        host: str = HOST,
        netns: str | None = None,
        clients: str | None = None,
    ) -> None:
        self.fast = fast
        self.host = host
        self.netns = netns
        self.clients = clients
        self.port = port
        self.max_connections = max_connections
        self.timeout = timeout
        self._bindir = bindir
        self._account: pwd.struct_passwd | None = None
        self.dir: Path | None = None

    def __repr__(self) -> str:
        return f"<Postgres port={self.port} dir={self.dir}>"

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` database (the one to create others from)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """DSN of ``database`` on this server."""
        if self.port is None:
            raise ClusterError("PostgreSQL is not started")
        return f"postgresql://postgres@{self.host}:{self.port}/{urllib.parse.quote(database)}"

    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "postgres.log"

    # -- lifecycle

    def start(self) -> Postgres:
        """initdb a new cluster in a temp dir and start it; returns self.

        Raises ``ClusterError`` (with the server log's tail) when it does
        not come up within ``timeout`` seconds.
        """
        if self.dir is not None:
            return self
        self._bindir = self._bindir or find_pg_bindir()
        self._account = _server_account()
        # Root's TMPDIR may be closed to the postgres user; /tmp never is.
        self.dir = Path(
            tempfile.mkdtemp(prefix="chunkfs-pg-", dir="/tmp" if self._account else None)
        )
        _register(self)
        try:
            if self._account:
                os.chown(self.dir, self._account.pw_uid, self._account.pw_gid)
            self._initdb()
            self._configure()
            self._start_on_free_port()
        except BaseException:
            self._kill()  # e.g. Ctrl-C while pg_ctl was starting it
            self._remove()
            raise
        log.info("PostgreSQL up on %s:%d (%s)", self.host, self.port, self.dir)
        return self

    def _initdb(self) -> None:
        args = [
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if self.fast:
            args.append("--no-sync")
        self._run_bin("initdb", *args)

    def _configure(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": str(self.max_connections),
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        # Appending keeps the file's owner (the server account).
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# chunkfs throwaway cluster\n")
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        if self.clients:
            with open(self.data_dir / "pg_hba.conf", "a") as f:
                f.write(f"host all all {self.clients} trust\n")

    def _start_on_free_port(self, attempts: int = 3) -> None:
        """pg_ctl start; pick another port when the chosen one was taken meanwhile."""
        fixed = self.port is not None
        for attempt in range(attempts):
            if not fixed:
                self.port = free_ports(1)[0]
            try:
                self._pg_ctl("start")
                return
            except ClusterError:
                in_use = "already in use" in _tail(self.log_path, 40)
                if fixed or not in_use or attempt == attempts - 1:
                    raise

    def restart(self) -> None:
        """Fast-shutdown the server and start it again on the same port."""
        if self.dir is None:
            raise ClusterError("PostgreSQL is not started")
        self._pg_ctl("restart", "-m", "fast")

    def pause(self, *, crash: bool = False) -> None:
        """Shut the server down but keep its data: ``resume`` starts it again.
        With ``crash``, stop it as a power cut would (immediate mode: no
        checkpoint; only what the write-ahead log has on disk survives).
        """
        if self.dir is None:
            raise ClusterError("PostgreSQL is not started")
        self._pg_ctl("stop", "-m", "immediate" if crash else "fast")

    def resume(self) -> None:
        """Start a paused server again, on the same port."""
        if self.dir is None:
            raise ClusterError("PostgreSQL is not started")
        self._pg_ctl("start")

    def freeze(self) -> None:
        """Make the server stop answering with its connections left open, as
        a hung host would (SIGSTOP to it and its backends); ``thaw`` undoes it.
        """
        for pid in self.server_pids():
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen server go on."""
        for pid in self.server_pids():
            _signal(pid, signal.SIGCONT)

    def server_pids(self) -> list[int]:
        """The postmaster and its children (backends and helpers) now.
        Raises ``ClusterError`` when the server is not running.
        """
        root = self._postmaster_pid()
        if root is None:
            raise ClusterError("PostgreSQL is not running")
        children = [
            int(entry)
            for entry in filter(str.isdigit, os.listdir("/proc"))
            if _stat_fields(entry)[1:2] == [str(root).encode()]
        ]
        return [root, *children]

    def stop(self) -> None:
        """Fast shutdown, then remove the temp dir. Safe to call twice; never leaves the server up."""
        if self.dir is None:
            return
        try:
            if self._postmaster_pid() is not None:
                self._pg_ctl("stop", "-m", "fast")
        except ClusterError as exc:
            log.warning("pg_ctl stop failed (%s): killing the server", exc)
            self._kill()
        finally:
            self._remove()
        log.info("PostgreSQL on port %s stopped", self.port)

    def _kill(self) -> None:
        pid = self._postmaster_pid()
        if pid is not None:
            _signal(pid, signal.SIGQUIT)  # immediate shutdown of every backend
            with contextlib.suppress(ClusterError):
                _wait_pids_gone([pid], 10.0, "postmaster")

    def _remove(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        _unregister(self)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database ``name`` and return its DSN (see ``create_database``)."""
        return create_database(self.dsn, name, template=template)

    # -- running the binaries

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, AssertionError):
            return None
        return pid if _pid_alive(pid) else None

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run_bin(
            "pg_ctl",
            action,
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(self.timeout)),
            "-o",
            f"-p {self.port}",
            *args,
        )

    def _as_account(self, argv: list[str]) -> tuple[list[str], dict[str, Any]]:
        """``argv`` and Popen keywords that run it as the server account."""
        if not self._account:
            return argv, {}
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
        )
        if runuser:
            return [runuser, "-u", self._account.pw_name, "--", *argv], {}
        acct = self._account
        return argv, {"user": acct.pw_uid, "group": acct.pw_gid, "extra_groups": []}

    def _run_bin(self, name: str, *args: str) -> None:
        """Run a PostgreSQL binary as the server account; raise ``ClusterError`` on failure."""
        assert self._bindir is not None
        argv, kwargs = self._as_account([str(self._bindir / name), *args])
        argv = in_netns(argv, self.netns)
        try:
            # A session of its own keeps Ctrl-C away from the postmaster, so
            # shutdown happens in order (mounts, nodes, then the server).
            proc = subprocess.run(
                argv,
                cwd=self.dir,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=self.timeout + 30,
                start_new_session=True,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{name} {args[0]} ran over {self.timeout + 30:.0f} s") from None
        if proc.returncode != 0:
            detail = _last_line(proc.stdout)
            log_tail = _tail(self.log_path, 5) if self.dir else ""
            raise ClusterError(
                f"{name} {args[0]} failed ({proc.returncode}): {detail}"
                + (f"\n--- {self.log_path} ---\n{log_tail}" if log_tail else "")
            )


# ------------------------------------------------------------ NodeProcess


def node_body_bytes(urls: Iterable[str], token: str, direction: str = "received") -> float:
    """Body bytes the nodes at ``urls`` have ``received`` (or ``sent``) since
    they started, summed from their ``/metrics``
    (``chunkfs_node_<direction>_bytes``). Raises ``OSError`` when a node
    does not answer.
    """
    return node_counter(urls, token, f"chunkfs_node_{direction}_bytes")


def node_counter(urls: Iterable[str], token: str, family_name: str) -> float:
    """A counter of the nodes at ``urls`` (``family_name``, e.g.
    ``chunkfs_node_requests``: every label set) summed over them, from their
    ``/metrics``. Raises ``OSError`` when a node does not answer.
    """
    total = 0.0
    for url in urls:
        request = urllib.request.Request(
            url + "/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        with _OPENER.open(request, timeout=30) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == family_name:
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


class _ChildProcess:
    """A server process the harness started: ``_proc`` (None until it
    runs), its ``port``, and how it is stopped. ``what`` names it in logs.
    """

    what = "process"
    port: int
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id, None before the first start."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: killed by that signal), None while running."""
        return self._proc.poll() if self._proc else None

    def terminate(self) -> None:
        """Send SIGTERM (a clean stop) without waiting."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 10.0) -> int | None:
        """Wait for the process to exit; SIGKILL it after ``timeout`` seconds. Returns its exit code."""
        if self._proc is None:
            return None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s on port %d ignored SIGTERM for %.0f s: killing it",
                self.what,
                self.port,
                timeout,
            )
            self._proc.kill()
            self._proc.wait(10)
        _unregister(self)
        return self._proc.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        self.terminate()
        return self.wait_stopped(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap the process."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(10)
        _unregister(self)


class NodeProcess(_ChildProcess):
    """One ``chunkfs node`` process listening on ``listen_host``:``port``
    (127.0.0.1; in network namespace ``netns``, if given), at ``advertise``
    (default: the listen address over HTTP). An ``https://`` node's
    certificate is checked against ``ca_file``.

    Its stdout and stderr go (appended) to ``log_path``, by default a file
    next to the data directory. ``start`` after ``stop`` or ``kill`` runs
    it again with the same data directory and port, hence the same node id.
    """

    what = "node"

    def __init__(
        self,
        dsn: str,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        capacity: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = NODE_READY_TIMEOUT,
        extra_args: Sequence[str] = (),
        listen_host: str = HOST,
        advertise: str | None = None,
        netns: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.listen_host = listen_host
        self.advertise = advertise
        self.netns = netns
        self.ca_file = ca_file
        self.data_dir = Path(data_dir)
        self.port = port or free_ports(1)[0]
        self.capacity = capacity
        self.log_path = (
            Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        )
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.node_id: str | None = None
        self._log_start = 0  # where this run's part of the log begins (bytes)

    def __repr__(self) -> str:
        return f"<NodeProcess {self.node_id or '?'} {self.url} pid={self.pid}>"

    @property
    def url(self) -> str:
        """Base URL of the node's HTTP API."""
        return self.advertise or f"http://{self.listen_host}:{self.port}"

    def argv(self) -> list[str]:
        """The command line the node runs with."""
        args = [
            "node",
            "--dsn",
            self.dsn,
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"{self.listen_host}:{self.port}",
        ]
        if self.advertise is not None:
            args += ["--advertise", self.advertise]
        if self.capacity is not None:
            args += ["--capacity", str(self.capacity)]
        return in_netns(chunkfs_command(*args, *self.extra_args), self.netns)

    # -- lifecycle

    def start(self, timeout: float | None = None) -> NodeProcess:
        """Run the node and wait until it is healthy; returns self.

        Raises ``ClusterError`` (with the log's tail) when it exits early or
        is not healthy within ``timeout`` seconds (default ``ready_timeout``);
        the process is killed then.
        """
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (see ``wait_ready``)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = _spawn(self.argv(), self.log_path, preexec_fn=_pdeathsig_setup())
        _register(self)
        log.debug("node launched: pid %d on port %d", self._proc.pid, self.port)

    def wait_ready(self, timeout: float | None = None) -> str:
        """Wait until /v1/health answers 200; return (and keep) the node id."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                self._fail(f"exited with code {self.returncode} before it was healthy")
            with contextlib.suppress(OSError, ValueError):
                self.node_id = self.health(timeout=1.0).get("node_id")
                log.info("node %s up at %s", self.node_id, self.url)
                return self.node_id or ""
            if time.monotonic() >= deadline:
                self.kill()
                self._fail(f"not healthy after {timeout:.0f} s")
            time.sleep(0.1)

    def _fail(self, why: str) -> None:
        tail = _tail(self.log_path, 15, self._log_start)
        raise ClusterError(f"node on port {self.port} {why}\n--- {self.log_path} ---\n{tail}")

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        """GET /v1/health as a dict. Raises ``OSError`` (incl. HTTP errors) or ``ValueError``."""
        opener = _OPENER
        if self.url.startswith("https://"):
            tls = tls_context(self.ca_file)
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
            )

        def get() -> dict[str, Any]:
            with opener.open(self.url + "/v1/health", timeout=timeout) as resp:
                return dict(json.loads(resp.read()))

        return call_in_netns(self.netns, get)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess(_ChildProcess):
    """One ``chunkfs gateway`` process on 127.0.0.1:``port``, its output
    appended to ``log_path``; ``extra_args`` go to its command line.
    """

    what = "gateway"

    def __init__(
        self,
        dsn: str,
        log_path: str | os.PathLike[str],
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = NODE_READY_TIMEOUT,
        ca_file: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.port = port or free_ports(1)[0]
        self.log_path = Path(log_path)
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.ca_file = ca_file

    @property
    def url(self) -> str:
        """The gateway's endpoint URL (``https`` when it serves TLS, whose
        certificate ``ca_file`` checks).
        """
        scheme = "https" if "--tls-cert" in self.extra_args else "http"
        return f"{scheme}://{HOST}:{self.port}"

    def start(self) -> GatewayProcess:
        """Run the gateway and wait until its health endpoint answers; returns
        self. Raises ``ClusterError`` (with the log's tail) when it exits or
        does not answer within ``ready_timeout`` seconds.
        """
        argv = chunkfs_command(
            "gateway", self.dsn, "--listen", f"{HOST}:{self.port}", *self.extra_args
        )
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = _spawn(argv, self.log_path, preexec_fn=_pdeathsig_setup())
        _register(self)
        opener = _OPENER
        if self.url.startswith("https://"):
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}),
                urllib.request.HTTPSHandler(context=tls_context(self.ca_file)),
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if not self.running:
                raise ClusterError(
                    f"gateway exited with code {self._proc.poll()}\n{_tail(self.log_path, 15, start)}"
                )
            with (
                contextlib.suppress(OSError),
                opener.open(self.url + "/-/health", timeout=1.0) as resp,
            ):
                if resp.status == 200:
                    return self
            if time.monotonic() >= deadline:
                self.kill()
                raise ClusterError(f"gateway not healthy\n{_tail(self.log_path, 15, start)}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        return super().stop(timeout)


# ----------------------------------------------------------------- Mount


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (no filesystem access)."""
    points: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                points[_unescape_mountinfo(fields[4])] = right.split()[0]
    return points


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True when something is mounted exactly at ``path`` (never touches the mount)."""
    return os.path.abspath(path) in mount_points()


def _is_chunkfs_token(arg: str) -> bool:
    """True for ``chunkfs``, ``/usr/local/bin/chunkfs`` or ``chunkfs.<module>`` (a ``-m`` target)."""
    base = os.path.basename(arg)
    return base == "chunkfs" or arg.startswith("chunkfs.")


def _daemon_pids(mountpoint: str) -> list[int]:
    """Pids of chunkfs processes whose command line names ``mountpoint``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if mountpoint in argv and any(_is_chunkfs_token(a) for a in argv):
            pids.append(int(entry))
    return pids


# A record's first line in a mount's log, as chunkfs.fuse.mount.setup_logging
# formats it ("%(asctime)s %(levelname)s %(name)s: %(message)s"); the lines
# up to the next such line (a traceback) belong to the record.
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ", re.M)
# How a traceback's first line ends (an exception group's too).
_TRACEBACK = "Traceback (most recent call last):"
# Every Mount whose mount() was called, oldest first (see mounts_made).
_mounts_made: list[Mount] = []


def log_records(text: str) -> list[tuple[str, str]]:
    """Split a mount's log into records: (level name, the record's text
    without its final newline), oldest first. Text before the first record
    line (e.g. the mount command's own output) is left out.
    """
    starts = list(_RECORD_START.finditer(text))
    if not starts:
        return []
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return [
        (m["level"], text[m.start() : end].rstrip("\n"))
        for m, end in zip(starts, ends, strict=True)
    ]


def mounts_made() -> list[Mount]:
    """Every ``Mount`` this process has mounted (unmounted ones too), oldest
    first, so that a caller can check their logs (the tests do after each).
    """
    return list(_mounts_made)


def _option_values(options: Sequence[str]) -> dict[str, str]:
    """``key=value`` mount options as a dict (the last one of a key wins)."""
    pairs = (o.partition("=") for opt in options for o in opt.split(","))
    return {key: value for key, _, value in pairs}


class Mount:
    """A chunkfs mount made with ``chunkfs mount DSN MOUNTPOINT [-o OPTS]``.

    Path-like: ``os.fspath(m)`` is the mount point and ``m / "name"`` a
    ``Path`` inside it. The daemon logs to ``log_path`` (mount option
    ``log=``; one given in ``options`` wins over the argument), and the
    mount command's output goes there too; ``unexpected_errors`` reads back
    the exceptions it logged with a traceback. With ``cache_dir`` given, the
    daemon spools there (option ``cache_dir=``), so concurrent mounts never
    share spool files. With ``netns``, the daemon runs in that network
    namespace (the mount itself is seen everywhere).
    """

    def __init__(
        self,
        dsn: str,
        mountpoint: str | os.PathLike[str],
        options: Sequence[str] = (),
        *,
        log_path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: float = MOUNT_TIMEOUT,
        netns: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.netns = netns
        self.path = Path(os.path.abspath(mountpoint))
        self.timeout = timeout
        given = _option_values(options)
        log_path = given.get("log") or log_path
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="chunkfs-mount-", suffix=".log")
            os.close(fd)
        self.log_path = Path(os.path.abspath(log_path))
        self.cache_dir = Path(os.path.abspath(cache_dir)) if cache_dir else None
        extra = [] if "log" in given else [f"log={self.log_path}"]
        if self.cache_dir and "cache_dir" not in given:
            extra.append(f"cache_dir={self.cache_dir}")
        self.options = (*options, *extra)
        self._pids: list[int] = []
        self._log_start: int | None = None  # log size (bytes) at the first mount

    def __repr__(self) -> str:
        return f"<Mount {self.path} mounted={self.mounted}>"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    @property
    def pids(self) -> list[int]:
        """The daemon's process ids (found when it mounted)."""
        return list(self._pids)

    @property
    def mounted(self) -> bool:
        """True while the kernel has a mount at ``path``."""
        return is_mounted(self.path)

    def log_offset(self) -> int:
        """The size of the daemon's log now (bytes; 0 before it exists): pass
        it as ``since`` to ``unexpected_errors`` to see only what comes after.
        """
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def unexpected_errors(self, since: int | None = None) -> list[str]:
        """The exceptions the daemon logged with their traceback at ERROR or
        above (``log.exception``: the FUSE adapter's "unexpected error in
        <handler>" before it answers EIO, a failed ``forget`` ...), each as
        the record's text (its line and the traceback), oldest first.

        Reads the log from byte ``since`` on; by default from where it stood
        when this object first mounted (so a remount's records count too).
        """
        start = since if since is not None else self._log_start or 0
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [
            record
            for level, record in log_records(text)
            if level in ("ERROR", "CRITICAL") and _TRACEBACK in record
        ]

    def argv(self) -> list[str]:
        """The mount command line."""
        args = ["mount", self.dsn, str(self.path)]
        if self.options:
            args += ["-o", ",".join(self.options)]
        return in_netns(chunkfs_command(*args), self.netns)

    def mount(self) -> Mount:
        """Mount and return self once the mount is there.

        Raises ``ClusterError`` with the command's last output line when it
        fails or runs over ``timeout`` seconds.
        """
        if self.mounted:
            raise ClusterError(f"{self.path} is already a mount point")
        self.path.mkdir(parents=True, exist_ok=True)
        start = self.log_offset()
        if self._log_start is None:
            self._log_start = start
            _mounts_made.append(self)
        _register(self)
        rc = self._run_mount_command()
        if rc != 0:
            _unregister(self)
            raise ClusterError(
                f"chunkfs mount {self.path} exited {rc}: {_last_line(_tail(self.log_path, 5, start))}"
            )
        # The command returns once mounted; allow the kernel a moment anyway.
        wait_until(lambda: self.mounted, 10.0, f"the mount at {self.path}", 0.05)
        self._pids = _daemon_pids(str(self.path))
        log.info("mounted %s (daemon pids %s)", self.path, self._pids)
        return self

    def _run_mount_command(self) -> int:
        proc = _spawn(self.argv(), self.log_path)
        try:
            return proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            with contextlib.suppress(ClusterError):
                self.unmount()
            raise ClusterError(f"chunkfs mount {self.path} ran over {self.timeout:.0f} s") from None

    def unmount(self, timeout: float = 30.0) -> None:
        """Unmount and wait (up to ``timeout`` seconds) for the daemon to exit.

        Retries ``fusermount3 -u`` while the mount is busy, then detaches it
        lazily as a last resort; a daemon that does not exit is killed.
        Raises ``ClusterError`` only when the mount cannot be removed at all.
        """
        pids = self._pids or _daemon_pids(str(self.path))
        try:
            if self.mounted:
                self._fusermount()
            _wait_pids_gone(pids, timeout, f"chunkfs daemon of {self.path}")
        finally:
            self._pids = []
            _unregister(self)
        log.info("unmounted %s", self.path)

    def _fusermount(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            out = self._umount_cmd(lazy=False)
            if not self.mounted:
                return
            log.debug("unmount of %s failed (%s); retrying", self.path, out)
            time.sleep(0.2 * (attempt + 1))
        log.warning("%s stays busy: detaching it lazily", self.path)
        out = self._umount_cmd(lazy=True)
        if self.mounted:
            raise ClusterError(f"cannot unmount {self.path}: {out}")

    def _umount_cmd(self, lazy: bool) -> str:
        """Run fusermount3 -u (or umount as root without it); return its output."""
        if shutil.which("fusermount3"):
            argv = ["fusermount3", "-u", *(["-z"] if lazy else []), str(self.path)]
        else:
            argv = ["umount", *(["-l"] if lazy else []), str(self.path)]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        return _last_line(proc.stderr)

    def __enter__(self) -> Mount:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()


# --------------------------------------------------------------- Cluster


class Cluster:
    """PostgreSQL + mkfs + N storage nodes (+ mounts), all throwaway.

    ``workdir`` holds the node data directories (``node0`` ...), their
    logs, and the mounts' logs and spool directories. With ``dsn`` given, that (existing) database is
    used instead of starting PostgreSQL; ``mkfs=False`` then skips mkfs.
    ``fast`` is passed to ``Postgres`` (no fsync: tests only); ``node_args``
    are added to every node's command line.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        nodes: int = 6,
        replicas: int = 2,
        fast: bool = False,
        *,
        dsn: str | None = None,
        mkfs: bool = True,
        max_file_size: int | None = None,
        node_capacity: int | None = None,
        node_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.node_args = tuple(node_args)
        self.node_count = nodes
        self.replicas = replicas
        self.fast = fast
        self.max_file_size = max_file_size
        self.node_capacity = node_capacity
        self._dsn = dsn
        self._mkfs = mkfs
        self.postgres: Postgres | None = None
        self.nodes: list[NodeProcess] = []
        self.mounts: list[Mount] = []

    def __repr__(self) -> str:
        return f"<Cluster {self.workdir} nodes={len(self.nodes)} mounts={len(self.mounts)}>"

    @property
    def dsn(self) -> str:
        """DSN of the filesystem's database."""
        if self._dsn is None:
            raise ClusterError("cluster not started")
        return self._dsn

    def start(self) -> Cluster:
        """Start everything; returns self. On any error, stops what it started and re-raises."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if self._dsn is None:
                self.postgres = Postgres(fast=self.fast).start()
                self._dsn = self.postgres.create_database("chunkfs")
            if self._mkfs:
                self._run_mkfs()
            self._start_nodes()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def _run_mkfs(self) -> None:
        args = ["mkfs", self.dsn, "--replicas", str(self.replicas)]
        if self.max_file_size is not None:
            args += ["--max-file-size", str(self.max_file_size)]
        run_chunkfs(*args)

    def _start_nodes(self) -> None:
        ports = free_ports(self.node_count)
        self.nodes = [
            NodeProcess(
                self.dsn,
                self.workdir / f"node{i}",
                port,
                capacity=self.node_capacity,
                extra_args=self.node_args,
            )
            for i, port in enumerate(ports)
        ]
        for node in self.nodes:  # launch all, then wait: they start in parallel
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        self.wait_nodes_active()

    def wait_nodes_active(self, timeout: float = 30.0) -> None:
        """Wait until ``chunkfs status`` lists every running node as active."""
        want = {n.node_id for n in self.nodes if n.running}

        def all_active() -> bool:
            nodes = self.status().get("nodes", [])
            return want <= {n.get("id") for n in nodes if n.get("status") == "active"}

        wait_until(all_active, timeout, "every node to be active in `chunkfs status`", 0.5)

    def status(self) -> dict[str, Any]:
        """``chunkfs status --json`` of this cluster."""
        return chunkfs_json("status", self.dsn, "--json")

    def node(self, node_id: str) -> NodeProcess:
        """The node with that id. Raises ``KeyError``."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def mount(self, mountpoint: str | os.PathLike[str], options: Sequence[str] = ()) -> Mount:
        """Mount the filesystem at ``mountpoint``; ``stop`` unmounts it."""
        n = len(self.mounts)
        m = Mount(
            self.dsn,
            mountpoint,
            options,
            log_path=self.workdir / f"mount-{n}.log",
            cache_dir=self.workdir / f"cache-{n}",
        )
        self.mounts.append(m)
        return m.mount()

    def stop(self) -> None:
        """Unmount, stop the nodes, stop PostgreSQL; each step runs even if one before failed.

        Raises ``ClusterError`` naming what could not be stopped.
        """
        problems: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - stop the rest whatever fails
                log.error("stopping %s failed: %s", what, exc)
                problems.append(f"{what}: {exc}")

        for m in reversed(self.mounts):
            if m.mounted or m._pids:
                attempt(f"mount {m.path}", m.unmount)
        self.mounts.clear()
        for node in self.nodes:  # SIGTERM all first so they stop in parallel
            attempt(f"node {node.url}", node.terminate)
        for node in self.nodes:
            attempt(f"node {node.url}", node.wait_stopped)
        if self.postgres is not None:
            attempt("PostgreSQL", self.postgres.stop)
        if problems:
            raise ClusterError("; ".join(problems))

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except ClusterError:
            if exc is None:
                raise
            log.exception("cleanup after %s failed", exc_type.__name__ if exc_type else "error")
