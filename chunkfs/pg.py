"""PostgreSQL access for trio code: the only module that sees asyncio.

asyncpg runs on asyncio; chunkfs runs on trio. ``open_database`` opens a
trio-asyncio loop and an asyncpg pool inside it, and ``Database`` offers
trio-facing ``fetch`` / ``execute`` / ``transaction``. A transaction body is a
coroutine function that receives an asyncpg connection and runs on the
asyncio side, so a whole transaction costs one trio/asyncio crossing.

A DSN may list several hosts (``postgresql://h1:5432,h2:5432/db``, as libpq
takes it); new connections go to whichever of them answers first as a
read-write primary, so every process follows a failover of a replicated
PostgreSQL (Patroni) without a restart. A call that finds no primary is
tried again until ``command_timeout``; one that reached the server is
repeated only when it is known not to have committed (see ``Database``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import asyncpg
import trio
import trio_asyncio

from . import metrics
from .errors import ChunkfsError, MetadataUnavailable

log = logging.getLogger(__name__)
# The pool warns, with a traceback, at every failed attempt to reconnect;
# Database logs an outage once, when it begins, and when it ends.
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

T = TypeVar("T")
Record: TypeAlias = asyncpg.Record
Connection: TypeAlias = asyncpg.Connection
UniqueViolationError = asyncpg.UniqueViolationError

# Errors after which the same transaction, run again, may well succeed.
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
# Runs of one statement in all, while it keeps meeting those errors.
_STATEMENT_RETRIES = 8
# Refusals that mean the server is no longer the primary (a demoted one
# still answering): nothing was applied, and the connection is dropped.
_NOT_PRIMARY = (asyncpg.ReadOnlySQLTransactionError,)
# Errors that mean the server is gone or did not answer in time.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    *_NOT_PRIMARY,
)
# asyncpg's refusals to send on a connection that is no longer usable.
_UNUSABLE = re.compile("connection is closed|another operation .* is in progress")
# Connection errors that mean the network to the server is not up yet.
_NO_ROUTE = (errno.EHOSTUNREACH, errno.ENETUNREACH)
# Backoff between attempts to reach a primary (seconds).
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0


class NoPrimary(ConnectionError):
    """None of the DSN's hosts answered as a read-write primary."""


class _NotApplied(Exception):
    """A call failed and is known to have changed nothing: no connection
    could be had, or a transaction was cut off before its COMMIT.
    """


class _InDoubt(Exception):
    """A transaction's COMMIT was sent and its answer lost: it may have
    committed. ``xid`` is its transaction id (``txid_current()``), which it
    recorded in its connection's row of ``commit_marks``, keyed by ``mark``
    (see ``Database._fate``); ``result`` is what its body returned.
    """

    def __init__(self, xid: int, mark: uuid.UUID, result: Any) -> None:
        super().__init__(xid)
        self.xid = xid
        self.mark = mark
        self.result = result


# A transaction's first statement: its id, recorded in its connection's row
# of commit_marks (schema.sql), which commits or vanishes with it.
_MARK = """INSERT INTO commit_marks (conn, xid) VALUES ($1, txid_current())
           ON CONFLICT (conn) DO UPDATE SET xid = EXCLUDED.xid, at = now()
           RETURNING xid"""


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***`` (for logs, fsname)."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password=)\S+", r"\1***", dsn)


# What tells one running PostgreSQL server from another, or from itself
# restarted: what was committed asynchronously on one is made durable only
# by a synchronous commit on the same.
_SERVER = """SELECT concat_ws(' ', inet_server_addr(), inet_server_port(),
                              pg_postmaster_start_time())"""


@dataclass(frozen=True)
class Lease:
    """A connection taken from the pool: ``mark``, its key in
    ``commit_marks`` (new for each, so never shared by two connections on
    any server), and ``server``, the server it reached (``_SERVER``).
    """

    mark: uuid.UUID
    server: str


class _Connections:
    """Connections of an asyncpg pool, handed out on the trio side.

    Going through ``Pool.acquire`` / ``release`` for every statement costs
    more than the statement itself (measured: ~0.9 ms against ~0.6 ms per
    primary-key SELECT across trio-asyncio), so a connection, once taken from
    the pool, stays here between statements; at most ``size`` are in use at
    once. A connection that failed or was interrupted mid-statement is
    closed and goes back to the pool, which makes a new one; one that was
    refused a statement stays.
    """

    def __init__(self, pool: asyncpg.Pool, size: int, release_timeout: float) -> None:
        self.pool = pool
        self._release_timeout = release_timeout
        self._idle: list[Connection] = []
        self._slots = trio.Semaphore(size)
        self.leases: dict[Connection, Lease] = {}
        # Idle connections found closed by the server: it may have gone.
        self.found_closed = 0

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if not _usable(conn):
                    self.found_closed += 1
                    await self._give_back(conn)
                    conn = None
            if conn is None:
                try:
                    conn = await trio_asyncio.aio_as_trio(self._acquire)()
                except _UNAVAILABLE as exc:
                    raise _NotApplied(exc) from exc
            try:
                yield conn
            except BaseException as exc:
                # A refusal by the server leaves the connection fine; a lost
                # connection, a timeout or a cancellation may not, and a
                # server past its deadline is not asked to clean up.
                refused = isinstance(exc, (ChunkfsError, asyncpg.PostgresError))
                await self._put_back(conn, keep=refused and not isinstance(exc, _UNAVAILABLE))
                raise
            await self._put_back(conn, keep=True)

    async def _acquire(self) -> Connection:
        """A connection from the pool, with its ``Lease`` (asyncio side)."""
        conn = await self.pool.acquire()
        try:
            server = await conn.fetchval(_SERVER)
        except BaseException:
            conn.terminate()
            await self.pool.release(conn)
            raise
        self.leases[conn] = Lease(uuid.uuid4(), server)
        return conn

    async def _put_back(self, conn: Connection, *, keep: bool) -> None:
        if keep and _usable(conn):
            self._idle.append(conn)
        else:
            # Closed first: the pool would take back a connection still busy
            # with the statement that failed (seen in a switchover: "another
            # operation is in progress" at its next use).
            await self._give_back(conn, close=True)

    async def _give_back(self, conn: Connection, *, close: bool = False) -> None:
        self.leases.pop(conn, None)
        with trio.CancelScope(shield=True):
            try:
                if close:
                    conn.terminate()
                await trio_asyncio.aio_as_trio(self.pool.release)(
                    conn, timeout=self._release_timeout
                )
            except Exception as exc:  # noqa: BLE001 - the pool replaces it either way
                log.debug("releasing a broken connection: %s", exc)

    async def discard_idle(self) -> None:
        """Close every idle connection. After one connection failed, the
        others (to the same server) are suspect: a server cut off by the
        network leaves them open and silent, and each would cost a caller
        a whole timeout to find out.
        """
        while self._idle:
            await self._give_back(self._idle.pop(), close=True)

    async def close(self) -> None:
        while self._idle:
            await self._give_back(self._idle.pop())
        # asyncpg's close waits for every connection to come back, one being
        # made included (seen once, after a million files through one pool);
        # past the bound, the rest are cut.
        with trio.move_on_after(self._release_timeout + 5):
            await trio_asyncio.aio_as_trio(self.pool.close)()
            return
        log.warning("PostgreSQL connections did not close in time: cut")
        self.pool.terminate()


def _usable(conn: Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False  # the pool took it back itself when the server closed it


class Database:
    """A pool of asyncpg connections, used from trio.

    Every method raises ``MetadataUnavailable`` (EIO) when PostgreSQL is
    down or a call (one statement, or a whole transaction) does not finish
    within ``command_timeout`` seconds; a
    ``ChunkfsError`` raised inside a transaction body propagates unchanged
    after the rollback.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        durable: asyncpg.Pool | None = None,
        *,
        size: int = 8,
        durable_size: int = 2,
        command_timeout: float = 30.0,
    ) -> None:
        self._pool = _Connections(pool, size, command_timeout)
        self._durable = (
            _Connections(durable, durable_size, command_timeout)
            if durable is not None
            else self._pool
        )
        self.dsn = dsn
        self.command_timeout = command_timeout
        self._unavailable = False  # calls find PostgreSQL gone (logged once)
        self._gave_up = False  # and some failed for it (logged once)
        self._lost_calls = 0
        # Asynchronous calls that may have written, numbered; and per server
        # (Lease.server) the number of the last one there that no
        # synchronous commit on that server has made durable since.
        self._async_writes = 0
        self._undurable: dict[str, int] = {}

    @property
    def outages(self) -> int:
        """Times a call found the server gone or silent, or an idle
        connection closed by it. What was committed asynchronously before
        may have been lost with it (a crash or a failover), so callers
        compare counts across such a change.
        """
        return (
            self._lost_calls
            + self._pool.found_closed
            + (self._durable.found_closed if self._durable is not self._pool else 0)
        )

    async def _on_connection(
        self,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        durable: bool = False,
        read: bool = False,
    ) -> T:
        """``fn(conn)``, run on the asyncio side with a connection of the
        chosen pool; ``command_timeout`` bounds it all, the attempts to reach
        a primary included. ``read``: ``fn`` writes nothing. With
        ``durable``, a result other than None means ``fn`` wrote, so its
        synchronous commit made durable all that went to that server before.

        A call that did not reach the server, or reached one that is no
        longer the primary, is tried again (backing off up to 1 s) until
        the deadline. A transaction whose COMMIT went unanswered is looked
        up by its transaction id on the primary found next: committed, its
        result is returned; not committed, it runs again. Any other call
        cut off mid-way may or may not have been applied: it raises.
        """
        # The deadline is kept here rather than by asyncpg's command_timeout,
        # whose asyncio timer per statement costs, through trio-asyncio, about
        # a fifth of a statement's CPU time (measured: ~340 -> ~270 us).
        metrics.PG_ROUND_TRIPS.inc()
        connections = self._durable if durable else self._pool
        began = self._async_writes
        in_doubt: _InDoubt | None = None
        delay = _RETRY_FIRST
        try:
            with trio.fail_after(self.command_timeout):
                while True:
                    try:
                        if in_doubt is not None:
                            fate, server = await self._fate(connections, in_doubt)
                            if fate == "committed":
                                result = in_doubt.result
                                self._account(connections, server, result, began, read)
                                break
                            if fate == "in progress":
                                raise _NotApplied(f"transaction {in_doubt.xid} still in progress")
                            in_doubt = None  # it did not commit: run it again
                        async with connections.connection() as conn:
                            result = await trio_asyncio.aio_as_trio(fn)(conn)
                            server = connections.leases[conn].server
                        self._account(connections, server, result, began, read)
                        break
                    except _InDoubt as exc:
                        in_doubt = exc
                        await self._lost(exc.__cause__ or exc)
                    except (_NotApplied, *_NOT_PRIMARY) as exc:
                        await self._lost(exc)
                    except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                        # Raised before anything is sent: the connection was
                        # closed, or is still taking in the server's last
                        # words (an idle connection the server ended).
                        if not _UNUSABLE.search(str(exc)):
                            raise
                        await self._lost(exc)
                    await trio.sleep(delay)
                    delay = min(2 * delay, _RETRY_MAX)
        except _UNAVAILABLE as exc:
            await self._lost(exc)
            raise self._down(f"PostgreSQL unavailable at {redact_dsn(self.dsn)}: {exc}") from exc
        except trio.TooSlowError:
            await self._lost(None)
            doubt = " (a commit may or may not have been applied)" if in_doubt else ""
            raise self._down(
                f"PostgreSQL at {redact_dsn(self.dsn)} did not answer within "
                f"{self.command_timeout:g} s{doubt}"
            ) from None
        if self._unavailable:
            self._unavailable = self._gave_up = False
            log.warning("PostgreSQL at %s answers again", redact_dsn(self.dsn))
        return result

    def _account(
        self, connections: _Connections, server: str, result: object, began: int, read: bool
    ) -> None:
        """Keep ``_undurable`` after a call that succeeded on ``server``
        (see ``_on_connection``); ``began``: ``_async_writes`` when it began.
        """
        if self._durable is self._pool or read:
            return  # every commit is synchronous, or this one wrote nothing
        if connections is self._pool:
            self._async_writes += 1
            self._undurable[server] = self._async_writes
        elif result is not None and self._undurable.get(server, began + 1) <= began:
            del self._undurable[server]

    async def _lost(self, exc: BaseException | None) -> None:
        """A call found the server gone or silent (``exc``; None: it did not
        answer in time). Counted in ``outages``, logged once until a call
        succeeds again, and the idle connections of both pools are closed:
        they lead to the same server.
        """
        self._lost_calls += 1
        if not self._unavailable:
            self._unavailable = True
            log.warning(
                "PostgreSQL at %s: %s: looking for the primary",
                redact_dsn(self.dsn),
                exc or "no answer",
            )
        await self._pool.discard_idle()
        if self._durable is not self._pool:
            await self._durable.discard_idle()

    @staticmethod
    async def _fate(connections: _Connections, doubt: _InDoubt) -> tuple[str, str]:
        """What became of the transaction ``doubt`` on the primary:
        'committed', 'aborted' or 'in progress' (a backend of a server that
        lost its clients may still be finishing it), and that primary's
        ``Lease.server``. Raises ``_NotApplied`` while no primary answers.

        ``txid_status`` alone cannot tell: a standby promoted before the
        transaction's WAL reached it hands the same id out again, and
        another client's transaction may commit under it. Only the
        transaction's own row of ``commit_marks`` holding its id says it
        committed; FOR SHARE waits for a writer of that row still running.
        """

        async def fate(conn: Connection) -> str:
            try:
                status = await conn.fetchval("SELECT txid_status($1)", doubt.xid)
            except asyncpg.InvalidParameterValueError:
                return "aborted"  # an id past the server's: it never saw it
            if status == "in progress":
                return status
            mark = await conn.fetchval(
                "SELECT xid FROM commit_marks WHERE conn = $1 FOR SHARE", doubt.mark
            )
            return "committed" if mark == doubt.xid else "aborted"

        async with connections.connection() as conn:
            return await trio_asyncio.aio_as_trio(fate)(conn), connections.leases[conn].server

    def _down(self, message: str) -> MetadataUnavailable:
        """The error for a call that gave up on PostgreSQL; the first of an
        outage is logged.
        """
        if not self._gave_up:
            self._gave_up = True
            log.warning("%s: operations fail with EIO until it answers", message)
        return MetadataUnavailable(message)

    async def _call(
        self, method: str, *args: Any, durable: bool = False, read: bool = False
    ) -> Any:
        """``Connection.<method>(*args)``: one statement, run again (up to
        ``_STATEMENT_RETRIES`` times in all) after a serialization failure
        or deadlock, which rolled all of it back.
        """

        async def call(conn: Connection) -> Any:
            for attempt in range(_STATEMENT_RETRIES):
                try:
                    return await getattr(conn, method)(*args)
                except _RETRYABLE:
                    if attempt == _STATEMENT_RETRIES - 1:
                        raise
                    log.debug("running a statement again after a conflict (%d)", attempt)
            raise AssertionError("unreachable")

        return await self._on_connection(call, durable=durable, read=read)

    # A single statement is atomic on its own: it needs no BEGIN / COMMIT.
    # ``read=True`` says it writes nothing, so a failover after it cannot
    # lose it (see ``sync``); a statement that may write leaves it out.

    async def fetch(self, sql: str, *args: Any, read: bool = False) -> list[Record]:
        """Run a query; return all its rows."""
        return await self._call("fetch", sql, *args, read=read)

    async def fetchrow(
        self, sql: str, *args: Any, durable: bool = False, read: bool = False
    ) -> Record | None:
        """Run a query; return its first row or None. With ``durable``, its
        commit is on disk when this returns, whatever the pool's commit mode,
        and a row returned must mean that it wrote (see ``_on_connection``).
        """
        return await self._call("fetchrow", sql, *args, durable=durable, read=read)

    async def sync(self) -> None:
        """Make every transaction committed so far durable: a synchronous
        commit flushes the write-ahead log up to itself (and waits for a
        synchronous standby to have it), so everything committed before it
        too. PostgreSQL waits only for a commit that wrote WAL, so it bumps
        this backend's row of ``sync_marks`` (schema.sql).

        That holds on one server only. When asynchronous commits went to
        another (the primary before a failover, or this one before a
        restart), they may be lost, and this raises ``MetadataUnavailable``
        once, as fsync(2) reports a lost write once.
        """
        began = self._async_writes

        async def bump(conn: Connection) -> str:
            await conn.execute(
                """INSERT INTO sync_marks (pid, n) VALUES (pg_backend_pid(), 1)
                   ON CONFLICT (pid) DO UPDATE SET n = sync_marks.n + 1"""
            )
            return self._durable.leases[conn].server

        await self._on_connection(bump, durable=True)
        # What is left from before it went to servers this sync did not reach.
        lost = [server for server, n in self._undurable.items() if n <= began]
        for server in lost:
            del self._undurable[server]
        if lost:
            raise MetadataUnavailable(
                "PostgreSQL's primary changed (a failover or a restart): changes "
                "committed asynchronously before it may have been lost"
            )

    async def fetchval(self, sql: str, *args: Any, read: bool = False) -> Any:
        """Run a query; return the first column of its first row, or None."""
        return await self._call("fetchval", sql, *args, read=read)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run a statement; return its status tag (e.g. ``'UPDATE 1'``)."""
        return await self._call("execute", sql, *args)

    async def run(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``body(conn)`` on one connection, outside any transaction: each
        of its statements commits on its own (one trio/asyncio crossing for
        them all). Use ``transaction`` when they must be atomic together.
        """
        return await self._on_connection(body)

    async def transaction(
        self,
        body: Callable[[Connection], Awaitable[T]],
        *,
        retries: int = 8,
    ) -> T:
        """Run ``body(conn)`` in one transaction and return its result.

        The body runs on the asyncio side and may be run again (up to
        ``retries`` times) after a serialization failure or deadlock, and
        after a lost connection when the transaction did not commit, so it
        must have no effect outside the database. Each transaction first
        records its id in its connection's row of ``commit_marks`` (one more
        statement), which is what tells, after a COMMIT whose answer was
        lost, whether it committed.
        """

        async def run(conn: Connection) -> T:
            mark = self._pool.leases[conn].mark
            for attempt in range(retries):
                tx = conn.transaction()
                await tx.start()
                try:
                    xid = await conn.fetchval(_MARK, mark)
                    result = await body(conn)
                except asyncio.CancelledError:
                    raise  # the connection is closed, which rolls back
                except BaseException as exc:
                    if _usable(conn):
                        with contextlib.suppress(*_UNAVAILABLE):
                            await tx.rollback()
                    if isinstance(exc, _RETRYABLE) and attempt < retries - 1:
                        log.debug("retrying transaction after conflict (%d)", attempt)
                        continue
                    if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, _NOT_PRIMARY):
                        raise _NotApplied(exc) from exc  # cut off before COMMIT
                    raise
                try:
                    await tx.commit()
                except _RETRYABLE:
                    if attempt == retries - 1:
                        raise
                    continue
                except _UNAVAILABLE as exc:
                    raise _InDoubt(xid, mark, result) from exc
                return result
            raise AssertionError("unreachable")

        return await self._on_connection(run)

    async def close(self) -> None:
        """Close every connection of the pools."""
        await self._pool.close()
        if self._durable is not self._pool:
            await self._durable.close()


def host_dsns(dsn: str) -> list[str]:
    """``dsn`` once per host it lists:
    ``postgresql://u@h1:5432,h2:5433/db?x=y`` gives
    ``[postgresql://u@h1:5432/db?x=y, postgresql://u@h2:5433/db?x=y]``.
    A DSN with one host, or in ``key=value`` form, gives ``[dsn]``.
    """
    match = re.match(r"^(postgres(?:ql)?://)([^/?#]*)(.*)$", dsn, re.DOTALL)
    if match is None:
        return [dsn]
    scheme, netloc, rest = match.groups()
    userinfo, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return [dsn]
    return [f"{scheme}{userinfo}{at}{host}{rest}" for host in hosts.split(",")]


async def _connect_primary(dsn: str, **kwargs: Any) -> Connection:
    """asyncpg's ``connect`` for a DSN that may list several hosts: all of
    them are tried at once, each within ``timeout``, and the first that
    accepts the login and meets ``target_session_attrs`` (read-write: the
    primary) wins; the others are closed. Tried one after another, as
    asyncpg does, a host whose link is cut would use up the whole timeout
    before the primary is asked. Raises ``NoPrimary`` naming each host's
    error.
    """
    hosts = host_dsns(dsn)
    if len(hosts) == 1:
        return await asyncpg.connect(dsn, **kwargs)

    def close_late(task: asyncio.Future[Connection]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().terminate()

    tasks = {asyncio.ensure_future(asyncpg.connect(h, **kwargs)): h for h in hosts}
    failures: list[str] = []
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    winner = task.result()
                    for other in done - {task}:
                        close_late(other)
                    return winner
                host = tasks[task].partition("://")[2].rpartition("@")[2].split("/")[0]
                if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
                    failures.append(f"{host}: not as target_session_attrs asks (a standby?)")
                else:
                    failures.append(f"{host}: {exc or type(exc).__name__}")
    finally:
        for task in pending:
            task.cancel()
            task.add_done_callback(close_late)
    raise NoPrimary("no host answered as a usable server: " + "; ".join(failures))


async def _no_reset(conn: Connection) -> None:
    """chunkfs keeps no session state (no SET, LISTEN or session locks) and
    every transaction ends inside ``Database.transaction``, so a connection
    returned to the pool needs no reset round trips.
    """


@asynccontextmanager
async def open_database(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    connect_timeout: float = 10.0,
    command_timeout: float = 30.0,
    async_commit: bool = False,
    client: str = "chunkfs",
) -> AsyncIterator[Database]:
    """Open a trio-asyncio loop and a connection pool to ``dsn``, whose
    connections name themselves ``client`` (PostgreSQL's application_name:
    ``pg_stat_activity`` and the server's log tell a mount from a node).

    With ``async_commit``, transactions commit without waiting for the
    write-ahead log to reach the disk (PostgreSQL's synchronous_commit=off:
    a crash of the server may lose the last few hundred milliseconds, never
    tear a transaction), except those run with ``durable=True`` and
    ``Database.sync``, which use a second, small pool of synchronous
    connections. Timeouts are in seconds. Raises ``MetadataUnavailable``
    with a one-line message when the server does not answer or refuses the
    login; after ``command_timeout`` seconds of no host answering as the
    primary (a DSN that lists several) or of no route to the server.
    """
    async with trio_asyncio.open_loop():

        async def create(size: int, settings: dict[str, str]) -> asyncpg.Pool:
            settings = {"application_name": client, **settings}
            return await asyncpg.create_pool(
                dsn,
                connect=_connect_primary,
                min_size=min(min_size, size),
                max_size=size,
                timeout=connect_timeout,
                # Idle connections wait in _Connections; the pool's own idle
                # timer would put an asyncio timer in every loop iteration.
                max_inactive_connection_lifetime=0,
                # asyncpg replaces a connection after 50,000 queries by
                # default, the new one made in the background: a mount pays a
                # login now and then, and a pool closed while one is being
                # made waited for it for ever (seen after a million files).
                max_queries=1 << 62,
                reset=_no_reset,
                server_settings=settings,
            )

        async def create_pools() -> tuple[asyncpg.Pool, asyncpg.Pool]:
            if not async_commit:
                pool = await create(max_size, {})
                return pool, pool
            pool = await create(max_size, {"synchronous_commit": "off"})
            try:
                return pool, await create(2, {"synchronous_commit": "on"})
            except BaseException:
                pool.terminate()
                raise

        # While none of the hosts of a replicated PostgreSQL is the primary (a
        # failover), or the network to the server is not up yet (no route),
        # it is asked again, for up to command_timeout, as a call would be.
        # A refusal (no server there, a wrong password) is final.
        patience = trio.current_time() + command_timeout
        delay = _RETRY_FIRST
        while True:
            try:
                with trio.fail_after(2 * connect_timeout + 1):
                    pool, durable = await trio_asyncio.aio_as_trio(create_pools)()
                break
            except OSError as exc:
                transient = isinstance(exc, NoPrimary) or exc.errno in _NO_ROUTE
                if transient and trio.current_time() + delay < patience:
                    await trio.sleep(delay)
                    delay = min(2 * delay, _RETRY_MAX)
                    continue
                failure: BaseException = exc
            except (trio.TooSlowError, *_UNAVAILABLE, asyncpg.PostgresError, ValueError) as exc:
                failure = exc
            raise MetadataUnavailable(
                f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: "
                f"{failure or type(failure).__name__}"
            ) from None
        db = Database(
            pool,
            dsn,
            durable if durable is not pool else None,
            size=max_size,
            durable_size=2,
            command_timeout=command_timeout,
        )
        try:
            yield db
        finally:
            with trio.CancelScope(shield=True):
                await db.close()
