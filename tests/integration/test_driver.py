"""One statement on a bare pooled connection (the hot path's way): its errors mean what the
session's do, and the pool never hands out a connection it left broken or in autocommit."""

from __future__ import annotations

import random
import socket
import string
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

from worker.adapters.postgres.driver import run_alone
from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.config import Settings
from worker.domain.errors import LedgerError, LedgerUnavailable


@pytest.fixture
def one_connection(settings: Settings, clean_ledger: Engine) -> Iterator[Engine]:
    """A pool of exactly one connection, so every call gets the one the last call left."""
    engine = make_engine(settings.database_url, pool_size=1, peak=0,
                         limits=ConnectionLimits(statement_timeout_s=0.5))
    yield engine
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    return int(run_alone(engine, "SELECT pg_backend_pid()", {})[0][0])


def test_a_statement_runs_alone_and_is_committed(one_connection: Engine,
                                                 clean_ledger: Engine) -> None:
    rows = run_alone(one_connection, "INSERT INTO circuit_breakers (name, state) "
                     "VALUES (%(name)s, 'closed') RETURNING name", {"name": "driver-test"})
    assert rows == [("driver-test",)]
    # Committed without a COMMIT: another connection sees it at once.
    with clean_ledger.connect() as other:
        assert other.scalar(text(
            "SELECT count(*) FROM circuit_breakers WHERE name = 'driver-test'")) == 1


def test_a_statement_that_returns_no_rows_gives_none(one_connection: Engine) -> None:
    assert run_alone(one_connection, "UPDATE circuit_breakers SET state = 'closed' "
                     "WHERE name = %(name)s", {"name": "nobody"}) == []
    assert run_alone(one_connection, "SELECT name FROM circuit_breakers "
                     "WHERE name = %(name)s", {"name": "nobody"}) == []
    assert run_alone(one_connection, "SELECT 1, 2", {}) == [(1, 2)]


def test_the_connection_goes_back_ready_for_a_transaction(one_connection: Engine) -> None:
    run_alone(one_connection, "SELECT 1", {})
    with one_connection.connect() as conn:
        conn.execute(text("SELECT 1"))
        # Not autocommit: the session's statements run inside BEGIN ... COMMIT.
        assert conn.scalar(text("SELECT now() = statement_timestamp()")) is False


def test_a_session_after_a_statement_run_alone_still_rolls_back(
        one_connection: Engine) -> None:
    # Given the one connection, just used (in autocommit) by a statement run alone
    run_alone(one_connection, "SELECT 1", {})
    # When a session writes and rolls back, nothing was committed
    session = Session(one_connection)
    try:
        session.execute(text("INSERT INTO circuit_breakers (name, state) "
                             "VALUES ('rolled-back', 'closed')"))
        session.rollback()
    finally:
        session.close()
    assert run_alone(one_connection, "SELECT count(*) FROM circuit_breakers "
                     "WHERE name = 'rolled-back'", {}) == [(0,)]


def test_an_autocommit_connection_asked_for_stays_autocommit(one_connection: Engine) -> None:
    run_alone(one_connection, "SELECT 1", {})
    with one_connection.connect() as conn:
        conn.execute(text("SELECT 1"))
    with one_connection.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        assert conn.scalar(text("SELECT now() = statement_timestamp()")) is True
    # ...and goes back to the pool turned off again, SQLAlchemy's own way
    with one_connection.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert conn.scalar(text("SELECT now() = statement_timestamp()")) is False


def test_a_connection_handed_back_inside_a_transaction_is_rolled_back(
        one_connection: Engine) -> None:
    # Given the one connection, used outside SQLAlchemy's transactions and handed back with
    # a write neither committed nor rolled back
    pooled = one_connection.raw_connection()
    cursor = pooled.cursor()
    cursor.execute("INSERT INTO circuit_breakers (name, state) VALUES ('uncommitted', 'closed')")
    cursor.close()
    pooled.close()
    # Then the pool rolled it back: the next user finds it idle, and the write gone
    assert run_alone(one_connection, "SELECT count(*) FROM circuit_breakers "
                     "WHERE name = 'uncommitted'", {}) == [(0,)]


def test_an_error_in_the_statement_is_a_ledger_error_and_the_connection_is_kept(
    one_connection: Engine,
) -> None:
    pid = _backend_pid(one_connection)
    with pytest.raises(LedgerError) as raised:
        run_alone(one_connection, "SELECT 1 / 0", {})
    assert not isinstance(raised.value, LedgerUnavailable)
    assert _backend_pid(one_connection) == pid


def test_a_statement_cut_by_the_timeout_is_unavailable_and_the_connection_kept(
    one_connection: Engine,
) -> None:
    pid = _backend_pid(one_connection)
    with pytest.raises(LedgerUnavailable, match="statement timeout"):
        run_alone(one_connection, "SELECT pg_sleep(5)", {})
    assert _backend_pid(one_connection) == pid


def test_a_lost_connection_is_unavailable_and_never_handed_out_again(
    one_connection: Engine, clean_ledger: Engine,
) -> None:
    pid = _backend_pid(one_connection)
    with clean_ledger.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(LedgerUnavailable, match="unavailable"):
        run_alone(one_connection, "SELECT 1", {})
    # The next statement gets a new connection rather than the dead one.
    assert _backend_pid(one_connection) != pid


def test_a_connection_the_server_refuses_is_unavailable(settings: Settings) -> None:
    # Nothing listens on the port: as while PostgreSQL restarts ("the database system is
    # starting up"), the pool's new connection fails before any statement is sent.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = make_url(settings.database_url).set(host="127.0.0.1", port=port)
    engine = make_engine(url.render_as_string(hide_password=False), pool_size=1,
                         limits=ConnectionLimits(connect_timeout_s=1))
    try:
        with pytest.raises(LedgerUnavailable, match="unavailable"):
            run_alone(engine, "SELECT 1", {})
    finally:
        engine.dispose()


def test_a_raw_driver_error_inside_a_unit_of_work_leaves_it_as_ours(
    clean_ledger: Engine,
) -> None:
    # psycopg's own errors can come out around SQLAlchemy (a pooled connection refused): the
    # unit of work still hands them on as the ledger's errors, never as an unexpected one
    unit_of_work = sql_unit_of_work_factory(clean_ledger)
    with pytest.raises(LedgerUnavailable, match="unavailable"), unit_of_work():
        raise psycopg.OperationalError("the database system is starting up")
    with pytest.raises(LedgerError, match="database error"), unit_of_work():
        raise psycopg.DataError("invalid input")


def test_data_over_a_postgresql_limit_is_a_ledger_error_not_an_outage(
        one_connection: Engine) -> None:
    # An index entry over PostgreSQL's limit: psycopg calls it operational, but no wait fixes it
    pid = _backend_pid(one_connection)
    with pytest.raises(LedgerError) as raised:
        run_alone(one_connection, "INSERT INTO circuit_breakers (name, state) VALUES "
                  "(%(name)s, 'closed')", {"name": "".join(
                      random.Random(3).choices(string.ascii_letters, k=10_000))})
    assert not isinstance(raised.value, LedgerUnavailable)
    assert "ProgramLimitExceeded" in str(raised.value)
    # ...and the connection, which is fine, is kept
    assert _backend_pid(one_connection) == pid


def test_a_thread_that_finds_every_connection_busy_waits_the_connect_timeout_then_it_is_an_outage(
        settings: Settings, clean_ledger: Engine) -> None:
    # Given a pool of one connection (no overflow), held by another thread of the process
    engine = make_engine(settings.database_url, pool_size=1, peak=0,
                         limits=ConnectionLimits(connect_timeout_s=2))
    held = engine.raw_connection()
    try:
        # When a thread asks for one: it waits as long as connecting may take, not 30 s
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="no ledger connection free"):
            run_alone(engine, "SELECT 1", {})
        assert 1.5 < time.monotonic() - started < 5.0
    finally:
        held.close()
        engine.dispose()


def test_threads_taking_turns_reuse_the_connections_a_peak_opened(
        settings: Settings, clean_ledger: Engine) -> None:
    # Given a pool sized 2 (4 at a peak) shared by 16 threads, as under the threads pool
    engine = make_engine(settings.database_url, pool_size=2)
    seen: set[int] = set()
    lock = threading.Lock()

    def work() -> None:
        for _ in range(30):
            # pg_sleep keeps the connection long enough for the threads to overlap
            pid = int(run_alone(engine, "SELECT pg_backend_pid() FROM pg_sleep(0.002)", {})[0][0])
            with lock:
                seen.add(pid)

    try:
        threads = [threading.Thread(target=work) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Then the 480 statements ran on at most the 4 connections of the peak, each opened
        # once and kept, never one opened and closed per statement (an overflow is closed as
        # soon as it is handed back to a full pool)
        assert 2 < len(seen) <= 4
        assert engine.pool.checkedin() == len(seen)  # type: ignore[attr-defined]
    finally:
        engine.dispose()
