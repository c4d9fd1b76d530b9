"""What on-call reads from the ledger at every scrape: right values, and one index probe each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from worker.adapters.postgres.circuit import CircuitGate, Permit
from worker.adapters.postgres.ratelimit import PostgresRateLimiter
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.adapters.postgres.vitals import _AGES, read_vitals
from worker.domain.model import Verdict
from worker.domain.policy import CircuitPolicy
from worker.usecases.deps import utcnow

ROWS = 20_000


def _event(conn: Connection, event_id: str) -> None:
    conn.execute(text(
        "INSERT INTO events (event_id, event_type, customer_key, customer, series_ids, "
        "metadata, payload, fingerprint, issue_ref, source) VALUES (:e, 't', 'id:1', '{}', "
        "ARRAY[1], '{}', '{}', 'f', 'r', 'bus')"), {"e": event_id})


def _entity(conn: Connection, event_id: str, series: int, state: str,
            **columns: object) -> None:
    names = ", ".join(["event_id", "series_id", "customer_key", "state", *columns])
    values = ", ".join([":event_id", ":series", "'id:1'", ":state", *(f":{c}" for c in columns)])
    conn.execute(text(f"INSERT INTO entities ({names}) VALUES ({values})"),
                 {"event_id": event_id, "series": series, "state": state, **columns})


def test_ages_of_the_oldest_retry_unknown_outcome_and_dead_letter(clean_ledger: Engine) -> None:
    # Given an empty ledger: nothing waits, nothing is unknown, nothing is dead
    empty = read_vitals(clean_ledger)
    assert (empty.oldest_retry_s, empty.oldest_unknown_past_settle_s, empty.oldest_dead_s) == (
        None, None, None)
    assert empty.circuits == () and empty.buckets == ()
    # When entities wait, are unknown and died at known times (database clock)
    now = datetime.now(UTC)
    with clean_ledger.begin() as conn:
        _event(conn, "e1")
        _entity(conn, "e1", 1, "retry_wait", first_attempt_at=now - timedelta(minutes=30),
                attempts=1)
        _entity(conn, "e1", 2, "queued", first_attempt_at=now - timedelta(minutes=10),
                attempts=1)
        # unknown: its call may land until settles_at; the older one is past it by 5 minutes
        _entity(conn, "e1", 3, "retry_wait", needs_reconcile=True, attempts=1,
                first_attempt_at=now, settles_at=now - timedelta(minutes=5))
        _entity(conn, "e1", 4, "retry_wait", needs_reconcile=True, attempts=1,
                first_attempt_at=now, settles_at=now + timedelta(minutes=1))
        # reconciled already (issued), or dead: not unknown any more
        _entity(conn, "e1", 5, "issued", needs_reconcile=True,
                settles_at=now - timedelta(hours=5))
        _entity(conn, "e1", 6, "dead", dead_at=now - timedelta(hours=2))
        _entity(conn, "e1", 7, "dead", dead_at=now - timedelta(hours=1))
    vitals = read_vitals(clean_ledger)
    # Then each age is the oldest one's, within the test's own duration
    assert vitals.oldest_retry_s == pytest.approx(1800, abs=30)
    assert vitals.oldest_unknown_past_settle_s == pytest.approx(300, abs=30)
    assert vitals.oldest_dead_s == pytest.approx(7200, abs=30)


def test_time_in_state_counts_from_opening_and_closing_whoever_writes(
        clean_ledger: Engine) -> None:
    gate = CircuitGate(sql_unit_of_work_factory(clean_ledger), CircuitPolicy(open_s=0.01),
                       clock=utcnow, probe_timeout_s=5)

    def since() -> datetime:
        with clean_ledger.connect() as conn:
            found: datetime = conn.execute(text(
                "SELECT state_since FROM circuit_breakers WHERE name = 'capillary'")).scalar_one()
            return found

    # Given a circuit a failure opened
    gate.failure(Permit(), Verdict.OUTAGE, "401")
    opened = since()
    (circuit,) = read_vitals(clean_ledger).circuits
    assert circuit.state == "open" and circuit.in_state_s < 60
    # When a probe half-opens it and fails, re-opening it: still the same outage
    permit = wait_for_probe(gate)
    gate.failure(permit, Verdict.OUTAGE, "401 again")
    assert since() == opened
    # When someone closes it by hand (any writer: here plain SQL), it counts from then
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE circuit_breakers SET state = 'closed'"))
    assert since() > opened
    assert read_vitals(clean_ledger).circuits[0].state == "closed"


def wait_for_probe(gate: CircuitGate) -> Permit:
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while datetime.now(UTC) < deadline:
        permit = gate.permit()
        if isinstance(permit, Permit) and permit.probe:
            return permit
    raise AssertionError("no probe won")


def test_buckets_say_how_long_a_retry_after_holds_calls(clean_ledger: Engine) -> None:
    limiter = PostgresRateLimiter(clean_ledger, per_minute=600, burst=10)
    limiter.reserve()
    limiter.penalise(30)
    (bucket,) = read_vitals(clean_ledger).buckets
    assert bucket.name == "bulk_issue"
    assert bucket.blocked_s == pytest.approx(30, abs=5)
    assert limiter.spec.available(bucket.tokens, bucket.since_refill_s) < 0, "callers in line"


def test_the_ages_read_indexes_not_the_entities_table(clean_ledger: Engine) -> None:
    # Given a large ledger of entities at rest, and a few waiting, unknown and dead
    with clean_ledger.begin() as conn:
        conn.execute(text("""
            INSERT INTO events (event_id, event_type, customer_key, customer, series_ids,
                                metadata, payload, fingerprint, issue_ref, source, state)
            SELECT 'large-' || n, 't', 'id:' || n, '{}', ARRAY[1], '{}', '{}', 'f', 'r' || n,
                   'bus', 'completed' FROM generate_series(1, :rows) AS n"""), {"rows": ROWS})
        conn.execute(text("""
            INSERT INTO entities (event_id, series_id, customer_key, state, attempts,
                                  needs_reconcile, first_attempt_at, settles_at, dead_at)
            SELECT 'large-' || n, 1, 'id:' || n,
                   CASE WHEN n % 2000 = 0 THEN 'retry_wait' WHEN n % 2000 = 1 THEN 'dead'
                        ELSE 'issued' END, 1, n % 4000 = 0, now(), now(),
                   CASE WHEN n % 2000 = 1 THEN now() END
            FROM generate_series(1, :rows) AS n"""), {"rows": ROWS})
    with clean_ledger.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE entities"))
        plan = "\n".join(str(row[0]) for row in conn.execute(text(f"EXPLAIN {_AGES.text}")))
    # Then each age is an index probe
    assert "Seq Scan" not in plan, plan
    for index in ("ix_entities_waiting_retry", "ix_entities_unknown_outcome",
                  "ix_entities_dead"):
        assert index in plan, plan
