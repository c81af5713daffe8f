"""Fixtures: a real PostgreSQL, real storage-node processes, real FUSE mounts.

PostgreSQL comes from ``CHUNKFS_TEST_DSN`` when set (an existing server on
which each test database is created), else from the machine's binaries (a
throwaway server, fsync off), else from testcontainers when a Docker engine
answers. With none of these the tests fail: they never skip. A missing
/dev/fuse or fusermount3 likewise fails every test that mounts.

- ``pg_server``      (session)  the server; ``new_database()`` / ``drop()``
- ``pg_dsn``         (function) a fresh database on which ``chunkfs mkfs`` has run
- ``empty_dsn``      (function) a fresh database without mkfs
- ``node_factory``   (function) ``node_factory(dsn=None, data_dir=None) -> NodeProcess``
- ``cluster``        (module)   a mkfs'd database with six running nodes
- ``mount_factory``  (function) ``mount_factory(dsn, options=()) -> Mount``
- ``mounted``        (function) a fresh mount of ``cluster``

``cluster`` is shared by the tests of one module, so they should work under
names of their own (e.g. a directory named after the test); a test that
stops one of its nodes must start it again. Everything is stopped and
unmounted at teardown, also when a test fails.

A test fails at teardown when a mount made through the harness (these
fixtures, ``cl.Mount``, ``Cluster.mount``) logged an unexpected exception
while it ran (see ``Mount.unexpected_errors``); what a module-scoped mount
logs as it unmounts fails the module's last test.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import cluster as cl

log = logging.getLogger(__name__)

TEST_DSN_ENV = "CHUNKFS_TEST_DSN"


class PgServer:
    """A PostgreSQL server on which the tests create (and drop) databases."""

    def __init__(self, admin_dsn: str, origin: str) -> None:
        self.admin_dsn = admin_dsn
        self.origin = origin  # where it came from, for messages

    def __repr__(self) -> str:
        return f"<PgServer {self.origin}>"

    def new_database(self, template: str | None = None, prefix: str = "t") -> tuple[str, str]:
        """Create a uniquely named database (a copy of ``template``); return (name, dsn)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        return name, cl.create_database(self.admin_dsn, name, template=template)

    def drop(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still on it; failures are only logged."""
        try:
            cl.drop_database(self.admin_dsn, name)
        except cl.ClusterError as exc:
            log.warning("could not drop test database %s: %s", name, exc)


# ------------------------------------------------------------- safety net


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    # A CI job killed by timeout gets SIGTERM: turn it into Ctrl-C so that
    # pytest still runs the fixture teardowns that stop nodes and unmount.
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # After the fixture teardowns: anything they failed to stop is stopped here.
    cl.stop_all()


# ------------------------------------------------------------- PostgreSQL


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True
    except Exception:  # noqa: BLE001 - no Docker engine answers, whatever the reason
        return False


def _container_server() -> Iterator[PgServer]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the "community" split
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.with_command("postgres -c fsync=off -c synchronous_commit=off -c max_connections=300")
    container.start()
    try:
        yield PgServer(container.get_connection_url(), "testcontainers")
    finally:
        container.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The PostgreSQL server of the test session (see the module docstring)."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        problem = _no_answer(dsn)
        if problem:
            pytest.fail(f"{TEST_DSN_ENV} does not answer: {problem}", pytrace=False)
        yield PgServer(dsn, TEST_DSN_ENV)
        return
    bindir, problem = _pg_bindir()
    if bindir:
        with cl.Postgres(fast=True, bindir=bindir) as pg:
            yield PgServer(pg.dsn, f"throwaway server on port {pg.port}")
    elif _docker_answers():
        yield from _container_server()
    else:
        pytest.fail(
            f"no PostgreSQL for the tests: {problem}; or set {TEST_DSN_ENV}, or run a Docker engine",
            pytrace=False,
        )


def _no_answer(dsn: str) -> str | None:
    """Why ``dsn`` does not answer, or None when it does."""
    try:
        cl.run_sql(dsn, "SELECT 1")
    except cl.ClusterError as exc:
        return str(exc)
    return None


def _pg_bindir() -> tuple[Path | None, str]:
    """The PostgreSQL binaries' directory, or None and why not."""
    try:
        return cl.find_pg_bindir(), ""
    except cl.ClusterError as exc:
        return None, str(exc)


@pytest.fixture(scope="session")
def mkfs_template(pg_server: PgServer) -> Iterator[str]:
    """Name of a database on which mkfs ran once: test databases are copies of it."""
    name, dsn = pg_server.new_database(prefix="chunkfs_template")
    try:
        cl.run_chunkfs("mkfs", dsn)
        yield name
    finally:
        pg_server.drop(name)


@pytest.fixture
def empty_dsn(pg_server: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty database (mkfs not run)."""
    name, dsn = pg_server.new_database()
    yield dsn
    pg_server.drop(name)


@pytest.fixture
def pg_dsn(pg_server: PgServer, mkfs_template: str) -> Iterator[str]:
    """DSN of a fresh database of its own on which ``chunkfs mkfs`` has run (defaults)."""
    name, dsn = pg_server.new_database(template=mkfs_template)
    yield dsn
    pg_server.drop(name)


# ------------------------------------------------------------------ nodes


NodeFactory = Callable[..., cl.NodeProcess]


@pytest.fixture
def node_factory(pg_dsn: str, tmp_path: Path) -> Iterator[NodeFactory]:
    """``node_factory(dsn=None, data_dir=None, **kw) -> NodeProcess``, started and healthy.

    ``dsn`` defaults to ``pg_dsn``, ``data_dir`` to a new dir in tmp_path;
    other keywords go to ``NodeProcess`` (``port``, ``capacity`` ...). Every
    node is stopped at teardown. (It depends on ``pg_dsn`` so that the
    nodes stop before their database is dropped.)
    """
    nodes: list[cl.NodeProcess] = []

    def factory(
        dsn: str | None = None, data_dir: str | os.PathLike[str] | None = None, **kwargs: object
    ) -> cl.NodeProcess:
        data_dir = Path(data_dir) if data_dir else tmp_path / f"node{len(nodes)}"
        node = cl.NodeProcess(dsn or pg_dsn, data_dir, **kwargs)  # type: ignore[arg-type]  # keywords pass through
        nodes.append(node)
        return node.start()

    yield factory
    for node in nodes:
        node.terminate()
    for node in nodes:
        node.wait_stopped()


# ---------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def cluster(
    pg_server: PgServer, mkfs_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[cl.Cluster]:
    """A mkfs'd database (replicas 2) with six running nodes, shared by one test module."""
    name, dsn = pg_server.new_database(template=mkfs_template)
    c = cl.Cluster(tmp_path_factory.mktemp("cluster"), nodes=6, replicas=2, dsn=dsn, mkfs=False)
    try:
        c.start()
        yield c
    finally:
        try:
            c.stop()
        finally:
            pg_server.drop(name)


# ----------------------------------------------------------------- mounts


@pytest.fixture(scope="session")
def fuse_ready() -> None:
    """Fail (never skip) when this machine cannot make FUSE mounts."""
    missing = [
        what
        for what, ok in (
            ("/dev/fuse", os.path.exists("/dev/fuse")),
            ("fusermount3 (Debian package fuse3)", shutil.which("fusermount3") is not None),
        )
        if not ok
    ]
    if missing:
        pytest.fail(
            f"cannot mount: missing {', '.join(missing)} (run scripts/setup)", pytrace=False
        )


# How far each mount's log has been checked (bytes), so a record fails one test only.
_log_checked: dict[cl.Mount, int] = {}


def _fail_on_unexpected_errors() -> None:
    """Fail the running test when a mount logged an unexpected exception
    since the last check, showing each record with its traceback.
    """
    found = []
    for m in cl.mounts_made():
        end = m.log_offset()
        if end == _log_checked.get(m):
            continue
        found += [f"{m.log_path}:\n{r}" for r in m.unexpected_errors(since=_log_checked.get(m))]
        _log_checked[m] = end
    if found:
        pytest.fail("a mount logged an unexpected exception:\n" + "\n".join(found), pytrace=False)


@pytest.fixture(autouse=True)
def mount_logs_clean() -> Iterator[None]:
    """Check the mount logs after each test, once its fixtures have unmounted
    (autouse fixtures are set up first, so they are torn down last).
    """
    yield
    _fail_on_unexpected_errors()


@pytest.fixture(scope="module", autouse=True)
def module_mount_logs_clean() -> Iterator[None]:
    """Check them again after a module's own mounts went at its end."""
    yield
    _fail_on_unexpected_errors()


MountFactory = Callable[..., cl.Mount]


@pytest.fixture
def mount_factory(fuse_ready: None, tmp_path: Path) -> Iterator[MountFactory]:
    """``mount_factory(dsn, options=()) -> Mount``: a new mount point in tmp_path, mounted.

    A ``Mount`` is path-like (``m / "name"`` is a Path inside it) and can be
    unmounted and mounted again. All are unmounted at teardown.
    """
    mounts: list[cl.Mount] = []

    def factory(dsn: str, options: tuple[str, ...] | list[str] = ()) -> cl.Mount:
        name = f"mnt{len(mounts)}"
        m = cl.Mount(
            dsn,
            tmp_path / name,
            options,
            log_path=tmp_path / f"{name}.log",
            cache_dir=tmp_path / f"{name}.cache",
        )
        mounts.append(m)  # before mount(), so a half-made mount is cleaned up too
        return m.mount()

    yield factory
    problems = []
    for m in reversed(mounts):
        try:
            m.unmount()
        except cl.ClusterError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def mounted(cluster: cl.Cluster, mount_factory: MountFactory) -> cl.Mount:
    """A fresh mount of ``cluster`` (for a second one: ``mount_factory(cluster.dsn)``)."""
    return mount_factory(cluster.dsn)
