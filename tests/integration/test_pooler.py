"""The ledger behind PgBouncer in transaction mode (``COUPONS_DB_POOLER=transaction``): no
statement prepared on a server connection, no setting left on one, the timeouts still held,
and a pooler that refuses the direct mode's connections named in the error.

Most of these run through a PgBouncer with a single server connection, so that every client
gets the connection the last one left: whatever a client leaves there, the next one finds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.pgbouncer import PgBouncer
from tests.conftest import PG_ADMIN_URL, run_cli
from worker.adapters.postgres import hot_path
from worker.adapters.postgres.driver import PoolerMismatch, run_alone
from worker.adapters.postgres.migrate import (
    current_revision,
    ensure_database,
    schema_status,
    script_directory,
    upgrade,
)
from worker.adapters.postgres.ratelimit import PostgresRateLimiter, RetryAfterGate
from worker.adapters.postgres.schema import Verdict
from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.config import Settings
from worker.domain.errors import LedgerError, LedgerUnavailable
from worker.domain.events import parse_event_data

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
POOLED = ConnectionLimits(statement_timeout_s=0.5, lock_timeout_s=0.3, pooler="transaction")


@pytest.fixture(scope="module")
def one_server(database_url: str, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode with a single server connection for all its clients."""
    bouncer = PgBouncer.start(tmp_path_factory.mktemp("one-server"), database_url, pool_size=1)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def engines(one_server: PgBouncer, database_url: str,
            clean_ledger: Engine) -> Iterator[list[Engine]]:
    """Two workers' engines (the worker's limits, pooler mode) and one with no limits, all
    through ``one_server``."""
    url = one_server.url(database_url)
    made = [make_engine(url, pool_size=1, limits=POOLED),
            make_engine(url, pool_size=1, limits=POOLED),
            make_engine(url, pool_size=1, limits=ConnectionLimits(pooler="transaction"))]
    yield made
    for engine in made:
        engine.dispose()


def _settings_seen(engine: Engine) -> tuple[str, str, int]:
    """statement_timeout, lock_timeout and prepared statements of the server connection."""
    row = run_alone(engine, "SELECT current_setting('statement_timeout'), "
                    "current_setting('lock_timeout'), "
                    "(SELECT count(*) FROM pg_prepared_statements)", {})[0]
    return str(row[0]), str(row[1]), int(row[2])


def test_the_harness_shares_server_connections_so_prepared_statements_break(
    one_server: PgBouncer, database_url: str, clean_ledger: Engine,
) -> None:
    # Given two clients of the one server connection, preparing as the direct mode does
    url = one_server.url(database_url).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as first, \
            psycopg.connect(url, autocommit=True) as second:
        first.execute("SELECT 1", prepare=True)
        try:
            # When the second prepares its first statement under the same name
            # Then the server connection already has it: the failure of issue 21
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                second.execute("SELECT 2", prepare=True)
        finally:
            # The other tests get that server connection next
            second.execute("DEALLOCATE ALL")


def test_the_hot_path_prepares_nothing_and_leaves_no_setting(engines: list[Engine]) -> None:
    first, second, bare = engines
    # Given engines (two with timeouts, one without) running a hot-path statement (more
    # than psycopg's prepare threshold), each time on the same server connection
    for _ in range(8):
        for engine in (first, second, bare):
            assert run_alone(engine, hot_path.CIRCUIT_STATE, {"name": "capillary"}) == []
    # Then no statement is prepared there, and the timeouts of the worker's statements held
    # for their own transaction only: a client without limits finds the server's defaults
    assert _settings_seen(bare) == ("0", "0", 0)


def test_a_session_transaction_leaves_no_setting_and_prepares_nothing(
    engines: list[Engine],
) -> None:
    first, _second, bare = engines
    uow = sql_unit_of_work_factory(first)
    for _ in range(8):
        with uow() as u:
            assert u.ledger.circuit("capillary").state == "closed"
            u.session.execute(text("SELECT count(*) FROM events"))
            seen = u.session.execute(text("SELECT current_setting('statement_timeout'), "
                                          "current_setting('lock_timeout')")).one()
            u.commit()
        # Inside its transaction the session had the worker's limits
        assert tuple(seen) == ("500ms", "300ms")
    assert _settings_seen(bare) == ("0", "0", 0)


def test_the_statement_timeout_holds_on_the_hot_path(engines: list[Engine]) -> None:
    with pytest.raises(LedgerUnavailable, match="statement timeout"):
        run_alone(engines[0], "SELECT pg_sleep(5)", {})
    # And the engine goes on
    assert _settings_seen(engines[2]) == ("0", "0", 0)
    assert run_alone(engines[0], "SELECT 1", {}) == [(1,)]


def test_the_lock_timeout_holds_on_the_hot_path_and_in_a_session(
    engines: list[Engine], clean_ledger: Engine,
) -> None:
    # Given another connection (direct) holding the circuit's table
    with clean_ledger.connect() as holder:
        holder.execute(text("LOCK TABLE circuit_breakers IN ACCESS EXCLUSIVE MODE"))
        # Then the worker's statements give up at the lock timeout, both ways
        with pytest.raises(LedgerUnavailable, match="lock timeout"):
            run_alone(engines[0], hot_path.CIRCUIT_STATE, {"name": "capillary"})
        with pytest.raises(LedgerUnavailable, match="lock timeout"), \
                sql_unit_of_work_factory(engines[1])() as u:
            # (a session without its limits would wait here for as long as the lock is held)
            assert u.session.execute(text("SHOW lock_timeout")).scalar_one() == "300ms"
            u.session.execute(text("SELECT count(*) FROM circuit_breakers"))
        holder.rollback()


def test_an_error_on_the_hot_path_is_the_statements_not_the_settings(
    engines: list[Engine],
) -> None:
    # The statement after the settings fails: its error, not an outage
    with pytest.raises(LedgerError, match="division by zero") as raised:
        run_alone(engines[0], "SELECT 1 / 0", {})
    assert not isinstance(raised.value, LedgerUnavailable)
    # Rows of the statement are returned, not the settings'
    assert run_alone(engines[0], "SELECT %(a)s::int + 1, 'x'", {"a": 41}) == [(42, "x")]


def test_a_direct_mode_connection_refused_by_the_pooler_names_the_setting(
    pgbouncer: PgBouncer, database_url: str,
) -> None:
    # Given the direct mode's engine (its timeouts in the startup packet) through PgBouncer
    url = pgbouncer.url(database_url)
    engine = make_engine(url, pool_size=1,
                         limits=ConnectionLimits(statement_timeout_s=3, lock_timeout_s=1))
    try:
        # Then both ways of running a statement fail with an error that says what to set
        with pytest.raises(PoolerMismatch, match="COUPONS_DB_POOLER=transaction"):
            run_alone(engine, "SELECT 1", {})
        with pytest.raises(PoolerMismatch, match="COUPONS_DB_POOLER=transaction"), \
                sql_unit_of_work_factory(engine)() as u:
            u.session.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    # And so does the worker's start-up check of the schema; with the setting it passes
    with pytest.raises(PoolerMismatch, match="COUPONS_DB_POOLER=transaction"):
        schema_status(url)
    assert schema_status(url, pooler="transaction").verdict is Verdict.CURRENT


@pytest.fixture
def fresh_name() -> Iterator[str]:
    name = f"cw_pooled_mig_{uuid.uuid4().hex[:8]}"
    yield name
    drop_database(PG_ADMIN_URL, name)


def test_migrations_through_the_pooler_bound_their_lock_wait_and_leave_no_setting(
    one_server: PgBouncer, fresh_name: str, tmp_path: Path,
) -> None:
    direct = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{fresh_name}"
    pooled = one_server.url(direct)
    ensure_database(direct)
    upgrade(pooled, "0006")
    holder_engine = make_engine(direct, pool_size=1)
    bare = make_engine(pooled, pool_size=1, limits=ConnectionLimits(pooler="transaction"))
    try:
        # Given a long transaction holding the table the next migration indexes
        with holder_engine.connect() as holder:
            holder.execute(text("LOCK TABLE entities IN ACCESS SHARE MODE"))
            holder.execute(text("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"))
            # When the migration runs through the pooler, it gives up at its lock timeout
            with pytest.raises(LedgerError, match="could not take its lock"):
                upgrade(pooled, lock_retries=0)
            holder.rollback()
        # Then its limits did not stay on the server connection the next client gets
        assert _settings_seen(bare) == ("0", "0", 0)
        # And once the lock is gone it migrates through the pooler
        upgrade(pooled)
        assert current_revision(direct) == script_directory().get_current_head()
        # (nor a prepared statement: the migrations repeat a statement more than psycopg's
        # threshold, as they update alembic_version once each)
        assert _settings_seen(bare) == ("0", "0", 0)
    finally:
        holder_engine.dispose()
        bare.dispose()


def test_the_command_line_runs_through_the_pooler(
    pooled_settings_factory: Callable[..., Settings], clean_ledger: Engine,
) -> None:
    settings = pooled_settings_factory()
    # Given an event in the ledger
    with sql_unit_of_work_factory(clean_ledger)() as u:
        u.ledger.ingest(parse_event_data({"eventId": "cli-pooled", "customer": {"id": "7"},
                                          "seriesIds": [1]}), source="bus", now=NOW)
        u.commit()
    # Then the commands read and migrate the ledger through PgBouncer
    migrated = run_cli(settings, "migrate")
    assert migrated.exit_code == 0, migrated.output
    shown = run_cli(settings, "events", "show", "cli-pooled", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["event_id"] == "cli-pooled"
    # And without the setting, the command says which one to set
    refused = run_cli(pooled_settings_factory(db_pooler="none"), "migrate")
    assert refused.exit_code != 0
    assert "COUPONS_DB_POOLER=transaction" in refused.output


def test_the_fleets_rate_limit_runs_through_the_pooler_and_prepares_nothing(
    engines: list[Engine],
) -> None:
    first, second, bare = engines
    limiters = [PostgresRateLimiter(first, 60_000, burst=100),
                PostgresRateLimiter(second, 60_000, burst=100)]
    gate = RetryAfterGate(first, refresh_s=0)
    for _ in range(8):
        for limiter in limiters:
            assert limiter.reserve() == 0.0
            limiter.cancel()
        gate.penalise(0.0)
        assert gate.reserve() == 0.0
    assert _settings_seen(bare) == ("0", "0", 0)


def test_the_rate_limit_gives_up_at_the_lock_timeout_behind_the_pooler(
    engines: list[Engine], clean_ledger: Engine,
) -> None:
    limiter = PostgresRateLimiter(engines[0], 60_000, burst=100)
    assert limiter.reserve() == 0.0
    with clean_ledger.connect() as holder:
        holder.execute(text("LOCK TABLE rate_limit_buckets IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(LedgerUnavailable, match="lock timeout"):
            limiter.reserve()
        with pytest.raises(LedgerUnavailable, match="lock timeout"):
            RetryAfterGate(engines[1]).penalise(1.0)
        holder.rollback()


def test_a_pooler_that_drops_the_direct_modes_timeouts_is_found_out(
    database_url: str, tmp_path: Path,
) -> None:
    # Given a PgBouncer told to accept the startup parameter carrying the timeouts, and drop it
    bouncer = PgBouncer.start(tmp_path / "ignoring", database_url,
                              ignore_startup_parameters="options")
    try:
        url = bouncer.url(database_url)
        # Then the start-up check of a worker in direct mode says the timeouts are missing
        with pytest.raises(PoolerMismatch, match="COUPONS_DB_POOLER=transaction"):
            schema_status(url)
        # And in transaction mode it passes: the timeouts are set per transaction
        assert schema_status(url, pooler="transaction").verdict is Verdict.CURRENT
    finally:
        bouncer.stop()


@pytest.fixture
def kept_prepared(database_url: str, clean_ledger: Engine) -> Iterator[Engine]:
    """The worker's engine for a pooler that keeps prepared statements per client
    (``COUPONS_DB_PREPARED_STATEMENTS=on``), on a direct connection: PgBouncer 1.18, the one
    installed here, cannot keep them."""
    engine = make_engine(database_url, pool_size=1, limits=ConnectionLimits(
        statement_timeout_s=0.5, lock_timeout_s=0.3, pooler="transaction",
        prepared_statements=True))
    yield engine
    engine.dispose()


def _session_of(engine: Engine) -> tuple[str, str, int]:
    """The settings and prepared statements of ``engine``'s one connection, outside any
    statement of the worker's."""
    pooled = engine.raw_connection()
    try:
        with pooled.cursor() as cursor:
            cursor.execute("SELECT current_setting('statement_timeout'), "
                           "current_setting('lock_timeout'), "
                           "(SELECT count(*) FROM pg_prepared_statements)")
            row = cursor.fetchone()
        pooled.rollback()
    finally:
        pooled.close()
    assert row is not None
    return str(row[0]), str(row[1]), int(row[2])


def test_with_prepared_statements_kept_the_limits_still_hold_per_transaction(
    kept_prepared: Engine, clean_ledger: Engine,
) -> None:
    # Given the hot path's statement run many times: prepared, its limits in its transaction
    for _ in range(6):
        assert run_alone(kept_prepared, hot_path.CIRCUIT_STATE, {"name": "capillary"}) == []
    assert run_alone(kept_prepared, "SELECT current_setting('statement_timeout'), "
                     "current_setting('lock_timeout')", {}) == [("500ms", "300ms")]
    # Then the statement timeout holds
    with pytest.raises(LedgerUnavailable, match="statement timeout"):
        run_alone(kept_prepared, "SELECT pg_sleep(5)", {})
    # And the lock timeout
    with clean_ledger.connect() as holder:
        holder.execute(text("LOCK TABLE circuit_breakers IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(LedgerUnavailable, match="lock timeout"):
            run_alone(kept_prepared, hot_path.CIRCUIT_STATE, {"name": "capillary"})
        holder.rollback()
    # And nothing of them is left on the connection, which holds the prepared statements
    timeout, lock_timeout, prepared = _session_of(kept_prepared)
    assert (timeout, lock_timeout) == ("0", "0") and prepared >= 2
