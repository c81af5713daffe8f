"""chunkfs.pg against real PostgreSQL servers of the test's own: a DSN that
lists several hosts, and calls cut off by a lost server (retried when they
cannot have committed, looked up when they may have, never applied twice).

The failover of a replicated PostgreSQL under Patroni, with mounts under
load, is tests/test_ha.py; these are the mechanisms it rests on.
"""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator

import pytest
import trio

import cluster as cl
from chunkfs import errors
from chunkfs.meta import ROOT_INO, Meta
from chunkfs.meta.namespace import INODE_BLOCK
from chunkfs.pg import Connection, Database, _InDoubt, host_dsns, open_database

FILE = stat.S_IFREG | 0o644


def test_a_dsn_is_split_into_one_per_host() -> None:
    assert host_dsns("postgresql://u:p@h1:1,h2,[::1]:3/db?target_session_attrs=read-write") == [
        "postgresql://u:p@h1:1/db?target_session_attrs=read-write",
        "postgresql://u:p@h2/db?target_session_attrs=read-write",
        "postgresql://u:p@[::1]:3/db?target_session_attrs=read-write",
    ]
    assert host_dsns("postgres://h1:5432,h2:5432") == ["postgres://h1:5432", "postgres://h2:5432"]
    for single in ("postgresql://u@h/db", "host=a,b dbname=x", "postgresql:///db?host=/tmp"):
        assert host_dsns(single) == [single]


@pytest.fixture
def server() -> Iterator[cl.Postgres]:
    with cl.Postgres() as pg:
        cl.run_chunkfs("mkfs", pg.dsn)  # transactions record their ids in commit_marks
        cl.run_sql(pg.dsn, "CREATE TABLE t (id serial PRIMARY KEY, v text)")
        yield pg


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word, as a
    host whose server hangs (or whose replies are lost) does.
    """
    with socket.socket() as s:
        s.bind((cl.HOST, 0))
        s.listen(16)
        yield s.getsockname()[1]


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` (trio and trio-asyncio nest groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _multi(*ports: int | None) -> str:
    """A DSN listing these ports of 127.0.0.1, for a read-write server."""
    hosts = ",".join(f"{cl.HOST}:{p}" for p in ports)
    return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"


async def test_the_primary_is_found_whichever_hosts_come_first(server, silent_port) -> None:
    with cl.Postgres() as standby:
        # A server that is up but read-only stands for a standby.
        cl.run_sql(
            standby.dsn,
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
        )
        refused = cl.free_ports(1)[0]
        dsn = _multi(silent_port, refused, standby.port, server.port)
        # Asked one after another, the silent host would use up the whole
        # connect timeout before the primary was asked.
        async with open_database(dsn, connect_timeout=5, command_timeout=10) as db:
            assert await db.fetchval("SELECT inet_server_port()") == server.port
            assert await db.fetchval("SELECT current_setting('transaction_read_only')") == "off"

        with pytest.raises(BaseExceptionGroup) as info:
            async with open_database(_multi(refused, standby.port), connect_timeout=5):
                pass
        [refusal] = _leaves(info.value)
        assert isinstance(refusal, errors.MetadataUnavailable)
        message = str(refusal)
        assert f"{refused}: [Errno 111]" in message
        assert f"{standby.port}: not as target_session_attrs asks" in message


async def _resume_after(server: cl.Postgres, seconds: float) -> None:
    """Start the paused ``server`` again after ``seconds``."""
    await trio.sleep(seconds)
    await trio.to_thread.run_sync(server.resume)


async def test_a_call_made_while_no_server_answers_waits_for_one(server) -> None:
    async with open_database(server.dsn, command_timeout=30) as db:
        await trio.to_thread.run_sync(server.pause)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_resume_after, server, 2)
            # Started while the server is down: it is tried again until one answers.
            assert await db.fetchval("INSERT INTO t (v) VALUES ('x') RETURNING id") == 1
        assert await db.fetchval("SELECT count(*) FROM t") == 1


async def test_no_server_for_longer_than_the_timeout_is_eio_and_then_it_works(server) -> None:
    async with open_database(server.dsn, command_timeout=2) as db:
        await trio.to_thread.run_sync(server.pause)
        started = trio.current_time()
        with pytest.raises(errors.MetadataUnavailable):
            await db.fetchval("SELECT 1")
        # Refused connections are tried again up to the timeout, not given up at once.
        assert trio.current_time() - started >= 1.5
        await trio.to_thread.run_sync(server.resume)
        assert await db.fetchval("SELECT 1") == 1


async def _terminate_when(db_admin: str, condition: str) -> int:
    """Terminate the backend whose pg_stat_activity row meets ``condition``
    (an SQL expression) once one does; return its pid.
    """
    for _ in range(200):
        rows = await trio.to_thread.run_sync(
            cl.run_sql,
            db_admin,
            f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE {condition}",
        )
        if rows[0]:
            return rows[0][0]["pid"]
        await trio.sleep(0.05)
    raise AssertionError(f"no backend with {condition}")


async def test_a_transaction_cut_off_before_its_commit_runs_again_once(server) -> None:
    runs = 0

    async def body(conn: Connection) -> int:
        nonlocal runs
        runs += 1
        row_id = await conn.fetchval("INSERT INTO t (v) VALUES ('once') RETURNING id")
        if runs == 1:
            await conn.execute("SELECT pg_sleep(30)")
        return row_id

    async with open_database(server.dsn, command_timeout=20) as db:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_when, server.dsn, "wait_event = 'PgSleep'")
            await db.transaction(body)
        assert runs == 2
        assert await db.fetchval("SELECT count(*) FROM t WHERE v = 'once'") == 1


async def test_a_transaction_whose_commit_answer_is_lost_is_looked_up_not_repeated(
    server,
) -> None:
    runs = 0

    async def body(conn: Connection) -> int:
        nonlocal runs
        runs += 1
        return await conn.fetchval("INSERT INTO t (v) VALUES ('in doubt') RETURNING id")

    # With a synchronous standby that never comes, a COMMIT is written
    # locally and then waits; ending that backend loses the answer to a
    # COMMIT that did commit, as a primary dying at that moment would.
    cl.run_sql(
        server.dsn,
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
    )
    async with open_database(server.dsn, command_timeout=20) as db:
        async with trio.open_nursery() as nursery:

            async def cut_off_and_heal() -> None:
                await _terminate_when(server.dsn, "wait_event = 'SyncRep'")
                await trio.to_thread.run_sync(
                    cl.run_sql,
                    server.dsn,
                    "ALTER SYSTEM RESET synchronous_standby_names",
                    "SELECT pg_reload_conf()",
                )

            nursery.start_soon(cut_off_and_heal)
            row_id = await db.transaction(body)
        assert runs == 1
        assert await db.fetch("SELECT id, v FROM t") == [(row_id, "in doubt")]


async def test_a_lost_commit_is_not_taken_for_another_transaction_with_its_id(server) -> None:
    # A standby promoted before a transaction's WAL reached it hands that
    # transaction's id out again, and another client's transaction may
    # commit under it. Here the id of a committed transaction of another
    # connection stands in for such a reused id.
    async with open_database(server.dsn, command_timeout=20) as db:
        await db.transaction(lambda conn: conn.execute("INSERT INTO t (v) VALUES ('ours')"))
        [(mark, ours)] = await db.fetch("SELECT conn, xid FROM commit_marks")
        theirs = await db.fetchval("SELECT txid_current()")  # committed, not ours
        assert await db.fetchval("SELECT txid_status($1)", theirs) == "committed"

        async def fate(xid: int) -> str:
            fate, _ = await db._fate(db._pool, _InDoubt(xid, mark, None))
            return fate

        assert await fate(theirs) == "aborted"
        assert await fate(ours) == "committed"
        assert await fate(theirs + 1_000_000) == "aborted"  # an id the server never gave

        async def running() -> None:
            # A transaction still open (its backend finishing a commit).
            await db.transaction(lambda conn: conn.execute("SELECT pg_sleep(2)"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(running)
            for _ in range(100):
                xid = await db.fetchval(
                    "SELECT backend_xid::text::bigint FROM pg_stat_activity "
                    "WHERE wait_event = 'PgSleep'"
                )
                if xid is not None:
                    break
                await trio.sleep(0.02)
            assert xid is not None
            assert await fate(xid) == "in progress"


async def test_a_conflict_of_single_statements_is_run_again(server) -> None:
    # Two statements that lock the same two rows in opposite orders: one of
    # them is chosen as the deadlock's victim, rolled back whole, and run again.
    cl.run_sql(server.dsn, "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b')")
    both = (
        "WITH first AS (UPDATE t SET v = v || '+' WHERE id = $1 RETURNING id), "
        "pause AS (SELECT pg_sleep(0.5) FROM first) "
        "UPDATE t SET v = v || '+' WHERE id = $2 AND EXISTS (SELECT 1 FROM pause)"
    )
    async with open_database(server.dsn, command_timeout=20) as db:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.execute, both, 1, 2)
            nursery.start_soon(db.execute, both, 2, 1)
        assert await db.fetch("SELECT id, v FROM t ORDER BY id") == [(1, "a++"), (2, "b++")]


async def test_a_single_statement_cut_off_mid_way_is_eio_and_not_repeated(server) -> None:
    async with open_database(server.dsn, command_timeout=20) as db:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_when, server.dsn, "wait_event = 'PgSleep'")
            with pytest.raises(errors.MetadataUnavailable):
                await db.fetchval("INSERT INTO t (v) SELECT 'cut' FROM pg_sleep(30) RETURNING id")
        # Run again, it would have inserted a row: it was not.
        assert await db.fetchval("SELECT count(*) FROM t") == 0
        assert await db.fetchval("SELECT 1") == 1


async def _standby_that_never_comes(db: Database) -> None:
    """Make every commit that waits for its WAL to be safe wait for ever (a
    synchronous standby that never comes); return once one does. The reload
    reaches the server's processes a moment after it returns (the
    checkpointer publishes that a standby is now required).
    """
    await db.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    await db.execute("SELECT pg_reload_conf()")
    for _ in range(100):
        try:
            await db.sync()
        except errors.MetadataUnavailable as exc:
            assert "did not answer" in str(exc)
            return
        await trio.sleep(0.1)
    raise AssertionError("sync() never waited for the synchronous standby")


async def _no_standby(db: Database) -> None:
    await db.execute("ALTER SYSTEM RESET synchronous_standby_names")
    await db.execute("SELECT pg_reload_conf()")


async def test_sync_waits_for_the_commits_before_it_to_be_durable(server) -> None:
    await trio.to_thread.run_sync(cl.run_chunkfs, "mkfs", server.dsn)
    async with open_database(server.dsn, async_commit=True, command_timeout=3) as db:
        try:
            await _standby_that_never_comes(db)
            await db.execute("INSERT INTO t VALUES (1)")  # asynchronous: returns
            with pytest.raises(errors.MetadataUnavailable, match="did not answer"):
                await db.sync()
        finally:
            await _no_standby(db)
        await db.sync()


async def _sync_after_a_crash(server: cl.Postgres, db: Database) -> list[str]:
    """Stop ``server`` as a power cut would, start it again, and ``sync``
    until it succeeds (at most three times); return the errors it gave.
    """
    await trio.to_thread.run_sync(lambda: server.pause(crash=True))
    await trio.to_thread.run_sync(server.resume)
    failures: list[str] = []
    for _ in range(3):
        try:
            await db.sync()
            return failures
        except errors.MetadataUnavailable as exc:
            failures.append(str(exc))  # a statement cut off by the restart, or a loss
    raise AssertionError(failures)


async def test_a_sync_after_the_server_changed_says_once_what_it_cannot_promise(server) -> None:
    async with open_database(server.dsn, async_commit=True, command_timeout=10) as db:
        await db.execute("INSERT INTO t (v) VALUES ('kept')")  # asynchronous
        await db.sync()  # the same server: now durable
        # A restart after a power cut (a failover would do the same): the
        # asynchronous commit may be gone, and no sync on the server now
        # running can make it durable.
        await db.execute("INSERT INTO t (v) VALUES ('maybe lost')")
        failures = await _sync_after_a_crash(server, db)
        assert any("primary changed" in f for f in failures), failures
        await db.execute("INSERT INTO t (v) VALUES ('new')")
        await db.sync()  # reported once; new changes are durable again
        assert "kept" in [r["v"] for r in await db.fetch("SELECT v FROM t")]

        # A synchronous commit that wrote makes what went before it to the
        # same server durable too, and reads write nothing: a restart after
        # them costs nothing.
        await db.execute("INSERT INTO t (v) VALUES ('made durable by the next')")
        await db.fetchrow("INSERT INTO t (v) VALUES ('durable') RETURNING id", durable=True)
        await db.fetchval("SELECT count(*) FROM t", read=True)
        failures = await _sync_after_a_crash(server, db)
        assert not any("primary changed" in f for f in failures), failures


async def test_inode_numbers_are_reserved_durably_a_block_at_a_time(server) -> None:
    await trio.to_thread.run_sync(cl.run_chunkfs, "mkfs", server.dsn)
    async with open_database(server.dsn, async_commit=True, command_timeout=3) as db:
        mount, other = Meta(db), Meta(db)  # two processes' namespaces
        a = await mount.namespace.create(ROOT_INO, b"a", FILE, 0, 0)
        try:
            await _standby_that_never_comes(db)
            # Creates commit asynchronously; numbers come from the reserved block.
            b = await mount.namespace.create(ROOT_INO, b"b", FILE, 0, 0)
            assert b.ino == a.ino + 1
            # A block is reserved durably before any of it is used: this waits.
            with pytest.raises(errors.MetadataUnavailable, match="did not answer"):
                await other.namespace.create(ROOT_INO, b"c", FILE, 0, 0)
        finally:
            await _no_standby(db)
        c = await other.namespace.create(ROOT_INO, b"c", FILE, 0, 0)
        assert not a.ino <= c.ino < a.ino + INODE_BLOCK


async def test_opening_while_no_host_is_the_primary_waits_for_one(server) -> None:
    dsn = _multi(cl.free_ports(1)[0], server.port)
    await trio.to_thread.run_sync(server.pause)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_resume_after, server, 2)
        # A tool or a mount started mid-failover: it waits, as a call would.
        async with open_database(dsn, command_timeout=30) as db:
            assert await db.fetchval("SELECT count(*) FROM t") == 0
