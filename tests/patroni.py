"""A throwaway highly available PostgreSQL: three instances under Patroni
over a three-member etcd cluster, with synchronous replication.

Not part of the installed package: the HA tests and ``scripts/pg-ha``
import it as ``patroni`` from this directory. Every member is one "host":
an etcd member, a Patroni daemon and the PostgreSQL server Patroni runs,
all on 127.0.0.1 with ports of their own, or each on a simulated host
(``hosts.Host``: its own network namespace and address), where cutting the
host's link takes all three away together, as losing a machine would.

The settings are the ones README.md documents for a real deployment:
``synchronous_mode`` and ``synchronous_mode_strict`` (a commit is
acknowledged once it is on two PostgreSQL hosts, and never on one alone),
``primary_start_timeout: 0`` (a crashed primary fails over to the
synchronous standby at once rather than being restarted in place), a
leader key whose ``ttl`` bounds how long a lost host keeps the leadership,
and pg_rewind so that a former primary rejoins as a standby.

Every wait is bounded (seconds) and raises ``ClusterError``; ``stop`` kills
whatever is left and removes the temporary directory, whether or not a
test passed. Uses etcd from the Debian package ``etcd-server`` and
Patroni 3.0.3 or later from ``PATRONI_BIN`` (scripts/setup installs both).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import (
    HOST,
    ClusterError,
    _child_env,
    _pid_alive,
    _server_account,
    _signal,
    _spawn,
    _stat_fields,
    _tail,
    _wait_pids_gone,
    call_in_netns,
    find_pg_bindir,
    free_ports,
    in_netns,
    wait_until,
)

log = logging.getLogger(__name__)

# The leader key's lifetime (s): how long a host that vanished (power, link)
# keeps the leadership before a standby may take over. Patroni requires
# ttl >= loop_wait + 2 * retry_timeout.
TTL = 10
LOOP_WAIT = 1
RETRY_TIMEOUT = 4
# Seconds the whole cluster may take to bootstrap (initdb, basebackups).
START_TIMEOUT = 120.0

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Patroni 3.0.3 or later, where scripts/setup installs it (Debian bookworm's
# 3.0.2 lets a frozen leader that wakes up take the leadership back and
# discard what the new primary acknowledged meanwhile: patroni#2689).
PATRONI_BIN = Path(os.environ.get("CHUNKFS_PATRONI_BIN", "/opt/chunkfs/patroni/bin"))


def patroni_available() -> str | None:
    """None when Patroni (in ``PATRONI_BIN``) and ``etcd`` are installed,
    else what is missing (one line).
    """
    missing = [
        str(PATRONI_BIN / c)
        for c in ("patroni", "patronictl")
        if not os.access(PATRONI_BIN / c, os.X_OK)
    ]
    if shutil.which("etcd") is None:
        missing.append("etcd (Debian package etcd-server)")
    if missing:
        return f"missing {', '.join(missing)}: run scripts/setup"
    return None


@dataclass
class Member:
    """One PostgreSQL host: its etcd member, Patroni daemon and server.

    ``address`` is 127.0.0.1 or a simulated host's; ``netns`` its network
    namespace (None: this one). Ports are TCP ports on ``address``.
    """

    name: str
    address: str
    netns: str | None
    pg_port: int
    api_port: int
    etcd_port: int
    etcd_peer_port: int
    dir: Path = Path()
    etcd: subprocess.Popen[bytes] | None = None
    patroni: subprocess.Popen[bytes] | None = None

    @property
    def etcd_url(self) -> str:
        return f"http://{self.address}:{self.etcd_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.etcd_peer_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.address}:{self.api_port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def postmaster_pid(self) -> int | None:
        """The PostgreSQL server's pid, or None when it is not running."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def server_pids(self) -> list[int]:
        """The postmaster and its children (backends, walsenders ...), or []."""
        root = self.postmaster_pid()
        if root is None:
            return []
        children = [
            int(e)
            for e in filter(str.isdigit, os.listdir("/proc"))
            if _stat_fields(e)[1:2] == [str(root).encode()]
        ]
        return [root, *children]


@dataclass
class PatroniCluster:
    """Three (``len(hosts)``) PostgreSQL hosts under Patroni; see the module doc.

    ``hosts``: one ``(address, netns)`` per member; the default is three on
    127.0.0.1. ``clients``: a CIDR allowed to log in besides loopback (the
    simulated hosts' subnet). The superuser is ``postgres`` with a random
    password; ``dsn`` lists every host with
    ``target_session_attrs=read-write``.
    """

    hosts: Sequence[tuple[str, str | None]] = ((HOST, None), (HOST, None), (HOST, None))
    clients: str = "127.0.0.1/32"
    scope: str = field(default_factory=lambda: f"chunkfs-{secrets.token_hex(3)}")
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    members: list[Member] = field(default_factory=list)
    dir: Path | None = None

    # -- addresses

    def dsn_for(self, database: str) -> str:
        """A DSN of ``database`` listing every member, for the primary only."""
        hosts = ",".join(f"{m.address}:{m.pg_port}" for m in self.members)
        return (
            f"postgresql://postgres:{self.password}@{hosts}/{database}"
            "?target_session_attrs=read-write"
        )

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    # -- lifecycle

    def start(self) -> PatroniCluster:
        """Start etcd and Patroni on every member; return once a primary and
        a synchronous standby are running. Raises ``ClusterError``.
        """
        missing = patroni_available()
        if missing:
            raise ClusterError(missing)
        account = _server_account()
        self.dir = Path(tempfile.mkdtemp(prefix="chunkfs-ha-", dir="/tmp"))
        atexit.register(self.stop)  # after a crash of the process that started it
        try:
            if account:
                os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._make_members()
            for m in self.members:
                m.dir.mkdir()
                if account:
                    os.chown(m.dir, account.pw_uid, account.pw_gid)
                self._start_etcd(m)
            for m in self.members:
                m.config_path.write_text(json.dumps(self._config(m), indent=1))
                if account:
                    os.chown(m.config_path, account.pw_uid, account.pw_gid)
                self._start_patroni(m)
            self.wait_healthy(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_members(self) -> None:
        for index, (address, netns) in enumerate(self.hosts, 1):
            if netns is None:
                pg, api, etcd, peer = free_ports(4, address)
            else:  # a host of its own: the usual ports
                pg, api, etcd, peer = 5432, 8008, 2379, 2380
            assert self.dir is not None
            self.members.append(
                Member(f"pg{index}", address, netns, pg, api, etcd, peer, self.dir / f"pg{index}")
            )

    def _start_etcd(self, m: Member) -> None:
        cluster = ",".join(f"e{x.name}={x.peer_url}" for x in self.members)
        argv = [
            "etcd",
            f"--name=e{m.name}",
            f"--data-dir={m.dir / 'etcd'}",
            f"--listen-client-urls={m.etcd_url}",
            f"--advertise-client-urls={m.etcd_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-token={self.scope}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        m.etcd = _spawn(in_netns(argv, m.netns), m.dir / "etcd.log")

    def _config(self, m: Member) -> dict[str, Any]:
        socket_dir = str(m.dir)
        return {
            "scope": self.scope,
            "name": m.name,
            "log": {"level": "WARNING"},
            "restapi": {
                "listen": f"{m.address}:{m.api_port}",
                "connect_address": f"{m.address}:{m.api_port}",
            },
            "etcd3": {"hosts": [f"{x.address}:{x.etcd_port}" for x in self.members]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1 << 20,
                    "primary_start_timeout": 0,
                    "synchronous_mode": True,
                    "synchronous_mode_strict": True,
                    "synchronous_node_count": 1,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "max_connections": 300,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"{m.address}:{m.pg_port}",
                "connect_address": f"{m.address}:{m.pg_port}",
                "data_dir": str(m.data_dir),
                "bin_dir": str(find_pg_bindir()),
                "pgpass": str(m.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": self.password},
                    "replication": {"username": "replicator", "password": self.password},
                    "rewind": {"username": "postgres", "password": self.password},
                },
                "parameters": {"unix_socket_directories": socket_dir},
                "pg_hba": [
                    "local all all trust",
                    *(
                        f"host {db} {user} {net} scram-sha-256"
                        for net in dict.fromkeys(["127.0.0.1/32", self.clients])
                        for db, user in (("all", "all"), ("replication", "replicator"))
                    ),
                ],
            },
        }

    def _start_patroni(self, m: Member) -> None:
        argv = [str(PATRONI_BIN / "patroni"), str(m.config_path)]
        account = _server_account()
        if account:
            argv = ["runuser", "-u", account.pw_name, "--", *argv]
        m.patroni = _spawn(in_netns(argv, m.netns), m.dir / "patroni.log")

    def stop(self) -> None:
        """Stop every Patroni (which stops its server) and etcd member, kill
        what is left, remove the temporary directory. Never raises.
        """
        for m in self.members:
            if m.patroni is not None and m.patroni.poll() is None:
                m.patroni.send_signal(signal.SIGTERM)
        for m in self.members:
            with contextlib.suppress(ClusterError):
                if m.patroni is not None:
                    _wait_pids_gone([m.patroni.pid], 30.0, f"patroni {m.name}")
            postmaster = m.postmaster_pid()
            if postmaster is not None:  # left behind by a Patroni that went first
                _signal(postmaster, signal.SIGINT)  # fast shutdown
            with contextlib.suppress(ClusterError):
                _wait_pids_gone(m.server_pids(), 10.0, f"postgres {m.name}")
            if m.etcd is not None and m.etcd.poll() is None:
                m.etcd.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.etcd.wait(10)
                if m.etcd.poll() is None:
                    m.etcd.kill()
            for proc in (m.patroni, m.etcd):
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> PatroniCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state

    def _get(self, m: Member, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET ``path`` from ``m``'s REST API (from inside its namespace):
        (status, parsed JSON), or (0, None) when it does not answer.
        """

        def get() -> tuple[int, Any]:
            try:
                with _OPENER.open(m.api_url + path, timeout=timeout) as resp:
                    return resp.status, json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                with contextlib.suppress(ValueError):
                    return exc.code, json.loads(exc.read() or b"null")
                return exc.code, None
            except (OSError, ValueError):
                return 0, None

        return call_in_netns(m.netns, get)

    def roles(self, exclude: Sequence[str] = ()) -> dict[str, str]:
        """Member name -> role ('leader', 'sync_standby', 'replica' ...) and
        state as Patroni's /cluster reports them, asked of the first member
        not in ``exclude`` that answers ({} if none does).
        """
        for m in self.members:
            if m.name in exclude:
                continue
            status, body = self._get(m, "/cluster")
            if status == 200 and body:
                return {
                    x["name"]: f"{x['role']}:{x.get('state', '')}" for x in body.get("members", [])
                }
        return {}

    def primary(self, exclude: Sequence[str] = ()) -> Member | None:
        """The member running as primary (leader), or None."""
        for name, role in self.roles(exclude).items():
            if role in ("leader:running", "master:running", "primary:running"):
                return self.member(name)
        return None

    def wait_healthy(self, timeout: float) -> Member:
        """Wait for a running leader and a streaming synchronous standby;
        return the leader.
        """
        deadline = time.monotonic() + timeout
        while True:
            roles = self.roles()
            leader = self.primary()
            sync = [n for n, r in roles.items() if r.startswith("sync_standby:")]
            if leader is not None and sync and roles[sync[0]].endswith(("streaming", "running")):
                return leader
            gone = [
                m.name
                for m in self.members
                if m.patroni is not None and m.patroni.poll() is not None
            ]
            if gone or time.monotonic() >= deadline:
                logs = "\n".join(
                    f"--- {m.name} ---\n{_tail(m.dir / 'patroni.log', 8)}" for m in self.members
                )
                why = f"Patroni exited on {gone}" if gone else f"not healthy after {timeout:.0f} s"
                raise ClusterError(f"{why}: {roles}\n{logs}")
            time.sleep(0.5)

    def wait_new_primary(self, old: Member, timeout: float) -> Member:
        """Wait until a member other than ``old`` is the running primary; return it."""
        found: list[Member] = []

        def promoted() -> bool:
            m = self.primary(exclude=[old.name])
            if m is not None and m.name != old.name:
                found.append(m)
                return True
            return False

        wait_until(promoted, timeout, f"a primary other than {old.name}", interval=0.2)
        return found[-1]

    # -- faults and maintenance

    def kill_server(self, m: Member) -> None:
        """SIGKILL ``m``'s PostgreSQL: the postmaster and all its children at once."""
        pids = m.server_pids()
        if not pids:
            raise ClusterError(f"PostgreSQL on {m.name} is not running")
        for pid in pids:
            _signal(pid, signal.SIGKILL)

    def _host_pids(self, m: Member) -> list[int]:
        return [
            *(p.pid for p in (m.patroni, m.etcd) if p is not None and p.poll() is None),
            *m.server_pids(),
        ]

    def freeze(self, m: Member) -> None:
        """Stop every process of ``m``'s host (Patroni, PostgreSQL, etcd)
        where it stands, as a paused virtual machine; ``thaw`` lets them go on.
        """
        for pid in self._host_pids(m):
            _signal(pid, signal.SIGSTOP)

    def thaw(self, m: Member) -> None:
        """Let the processes ``freeze`` stopped on ``m``'s host go on."""
        for pid in self._host_pids(m):
            _signal(pid, signal.SIGCONT)

    def switchover(self, candidate: Member) -> None:
        """``patronictl switchover`` to ``candidate`` (a planned, clean
        change; in synchronous mode only the synchronous standby may take
        over); returns once it is the primary.
        """
        leader = self.primary()
        if leader is None:
            raise ClusterError("no primary to switch over from")
        argv = [
            str(PATRONI_BIN / "patronictl"), "-c", str(leader.config_path), "switchover", self.scope,
            "--leader", leader.name, "--candidate", candidate.name, "--force",
        ]  # fmt: skip
        proc = subprocess.run(
            in_netns(argv, leader.netns),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise ClusterError(f"patronictl switchover failed: {output}")
        try:
            wait_until(
                lambda: getattr(self.primary(), "name", None) == candidate.name,
                60,
                f"{candidate.name} to be the primary",
                interval=0.2,
            )
        except ClusterError as exc:
            raise ClusterError(f"{exc}; patronictl said: {output}") from None
