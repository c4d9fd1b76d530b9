"""The worker's ledger connections give up on a stall: a lock held elsewhere or a statement
that runs too long fails within its timeout as LedgerUnavailable (the message goes back),
instead of waiting until Celery's hard time limit kills the task."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    SqlUnitOfWork,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.config import Settings
from worker.domain.errors import LedgerUnavailable
from worker.domain.events import parse_event_data

EVENT = parse_event_data({"eventId": "stalled-1", "customer": {"id": "7"}, "seriesIds": [1]})
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


@pytest.fixture(params=["direct", "pgbouncer"])
def worker_engine(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings],
                  clean_ledger: Engine) -> Iterator[Engine]:
    """An engine configured as the worker's is (statement timeout 3 s, lock timeout 1 s):
    connected directly, or through PgBouncer in transaction mode (``COUPONS_DB_POOLER``)."""
    if request.param == "pgbouncer":
        settings = request.getfixturevalue("pooled_settings_factory")()
    else:
        settings = settings_factory()
    engine = make_engine(settings.database_url, pool_size=1,
                         limits=ConnectionLimits.from_settings(settings))
    yield engine
    engine.dispose()


def _timed(action: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        action()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_a_statement_blocked_by_a_lock_fails_within_the_lock_timeout(
    settings: Settings, clean_ledger: Engine, worker_engine: Engine,
) -> None:
    uow = sql_unit_of_work_factory(worker_engine)

    def ingest() -> None:
        with uow() as u:
            u.ledger.ingest(EVENT, source="bus", now=NOW)
            u.commit()

    # Given another connection holding the events table
    with clean_ledger.connect() as holder:
        holder.execute(text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
        # When the worker's ledger writes an event
        error, elapsed = _timed(ingest)
        holder.rollback()
    # Then it fails after the lock timeout, as an outage (requeue), not a bug
    assert isinstance(error, LedgerUnavailable), error
    assert "lock timeout" in str(error)
    assert settings.db_lock_timeout_s - 0.1 <= elapsed < settings.db_statement_timeout_s
    # And the same connection pool works once the lock is gone
    ingest()
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 1


def test_a_delivery_racing_a_stuck_transaction_on_the_same_event_times_out(
    settings: Settings, clean_ledger: Engine, worker_engine: Engine,
) -> None:
    uow = sql_unit_of_work_factory(worker_engine)

    def ingest() -> None:
        with uow() as u:
            u.ledger.ingest(EVENT, source="bus", now=NOW)
            u.commit()

    # Given another worker's transaction that inserted the same event and hangs uncommitted
    with sql_unit_of_work_factory(clean_ledger)() as stuck:
        stuck.ledger.ingest(EVENT, source="bus", now=NOW)
        # When this delivery inserts it too, it must wait for that row's fate; it gives up
        error, elapsed = _timed(ingest)
    assert isinstance(error, LedgerUnavailable), error
    assert "lock timeout" in str(error)
    assert elapsed < settings.db_statement_timeout_s


def test_a_statement_that_runs_too_long_is_cancelled_at_the_statement_timeout(
    settings: Settings, worker_engine: Engine,
) -> None:
    uow = sql_unit_of_work_factory(worker_engine)

    def slow() -> None:
        with uow() as u:
            assert isinstance(u, SqlUnitOfWork)
            u.session.execute(text("SELECT pg_sleep(30)"))

    error, elapsed = _timed(slow)
    assert isinstance(error, LedgerUnavailable), error
    assert "statement timeout" in str(error)
    assert settings.db_statement_timeout_s - 0.1 <= elapsed < settings.db_statement_timeout_s + 2


def test_every_worker_connection_carries_the_limits(
    settings: Settings, worker_engine: Engine,
) -> None:
    with worker_engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "3s"
        assert conn.execute(text("SHOW lock_timeout")).scalar_one() == "1s"
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert params["connect_timeout"] == "2"
    assert params["keepalives"] == "1"
    assert (params["keepalives_idle"], params["keepalives_interval"],
            params["keepalives_count"]) == ("1", "1", "2")
    assert params["tcp_user_timeout"] == "3000"
