"""What an event's path costs the database beyond its two statements.

An issued event opens no SQLAlchemy session (its statements run alone, on the driver). The
circuit's state and the fleet's Retry-After pause are each read about once a second, between
an event's claim and its call: each read is one round trip on that event's path (at full load
a round trip waits for the database's process to be scheduled), counted from the wire (libpq's
trace), as the benchmark counts an event's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine

from coupon_devtools.bench.probes import count_traces, trace_connections
from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    SqlUnitOfWork,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps


@pytest.fixture(params=["direct", "pgbouncer", "prepared-per-transaction"])
def traced(request: pytest.FixtureRequest, settings: Settings, clean_ledger: Engine,
           tmp_path: Path) -> Iterator[Engine]:
    """An engine whose connections' wire traffic is written to ``tmp_path/*.trace``: connected
    directly; through PgBouncer in transaction mode with the worker's timeouts (set with
    each hot-path statement, in the same round trip); or as for a pooler that keeps prepared
    statements (the timeouts and the statement prepared, pipelined), on a direct connection."""
    if request.param == "pgbouncer":
        pooled = request.getfixturevalue("pooled_settings_factory")()
        engine = make_engine(pooled.database_url, pool_size=1,
                             limits=ConnectionLimits.from_settings(pooled))
    elif request.param == "prepared-per-transaction":
        kept = settings.model_copy(update={"db_pooler": "transaction",
                                           "db_prepared_statements": "on"})
        engine = make_engine(settings.database_url, pool_size=1,
                             limits=ConnectionLimits.from_settings(kept))
    else:
        engine = make_engine(settings.database_url, pool_size=1)
    handles = trace_connections(engine, tmp_path)
    yield engine
    engine.dispose()
    for handle in handles:
        handle.close()


def _round_trips(tmp_path: Path) -> int:
    return count_traces(tmp_path).round_trips


def test_the_circuit_is_read_in_one_round_trip(traced: Engine, tmp_path: Path) -> None:
    gate = CircuitGate(sql_unit_of_work_factory(traced), CircuitPolicy(),
                       clock=lambda: datetime.now(UTC), probe_timeout_s=60)
    assert gate.state(fresh=True).state == "closed"  # connects, prepares the statement
    before = _round_trips(tmp_path)
    for _ in range(5):
        assert gate.state(fresh=True).state == "closed"
    assert _round_trips(tmp_path) - before == 5


def test_the_fleets_retry_after_pause_is_read_in_one_round_trip(
        traced: Engine, tmp_path: Path) -> None:
    gate = RetryAfterGate(traced, refresh_s=0)
    gate.penalise(30.0)
    gate.reserve()  # prepares the statement
    before = _round_trips(tmp_path)
    waits = [gate.reserve() for _ in range(5)]
    assert _round_trips(tmp_path) - before == 5
    assert all(25.0 < wait <= 30.0 for wait in waits)


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
def test_an_issued_event_opens_no_session(request: pytest.FixtureRequest, through: str,
                                          clean_ledger: Engine) -> None:
    if through == "pgbouncer":
        clean_ledger = request.getfixturevalue("pooled_engine")
    opened: list[Connection] = []

    def session() -> Connection:
        opened.append(clean_ledger.connect())
        return opened[-1]

    def uow() -> SqlUnitOfWork:
        return SqlUnitOfWork(session, clean_ledger)

    deps = Deps(
        uow=uow, api=FakeCapillary(), publisher=FakePublisher(),
        limiter=RetryAfterGate(clean_ledger),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                            probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")
    event = parse_event_data({"eventId": "no-session", "customer": {"id": "566881933"},
                              "seriesIds": [544770, 553379]})
    assert issue.issue_event(event, source="bus", deps=deps).issued == 2
    assert opened == []
