"""Every worker sweeps once a second: on a large ledger, each sweep statement reads only the
rows it may act on, through an index, never a whole table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from coupon_devtools.bench.plans import capture, explain
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory

ROWS = 20_000
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
WHOLE_TABLES = ("Seq Scan on events", "Seq Scan on entities", "Seq Scan on rejected_events")


@pytest.fixture
def large_ledger(clean_ledger: Engine) -> Engine:
    """Twenty thousand events at rest, each with an issued entity, and as many rejections
    already announced; a few events still processing; statistics up to date."""
    with clean_ledger.begin() as conn:
        conn.execute(text("""
            INSERT INTO events (event_id, event_type, customer_key, customer, series_ids,
                                metadata, payload, fingerprint, issue_ref, source, state)
            SELECT 'large-' || n, 'tier_upgrade', 'id:' || n, '{}', ARRAY[1], '{}', '{}',
                   'f', 'r' || n, 'bus', CASE WHEN n % 5000 = 0 THEN 'processing'
                                              ELSE 'completed' END
            FROM generate_series(1, :rows) AS n"""), {"rows": ROWS})
        conn.execute(text("""
            INSERT INTO entities (event_id, series_id, customer_key, state, attempts)
            SELECT 'large-' || n, 1, 'id:' || n, 'issued', 1
            FROM generate_series(1, :rows) AS n"""), {"rows": ROWS})
        conn.execute(text("""
            INSERT INTO rejected_events (source, reason, raw, size_bytes, dead_published_at)
            SELECT 'bus', 'not JSON', '\\x00', 1, now() FROM generate_series(1, :rows)"""),
            {"rows": ROWS})
    with clean_ledger.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("ANALYZE events, entities, rejected_events"))
    return clean_ledger


def _plans_of_sweep_statements(engine: Engine) -> list[tuple[str, list[str]]]:
    """The sweep's statements that read events or rejections, and the plan of each."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sql_unit_of_work_factory(engine)() as uow:
            uow.ledger.repair_event_states(now=NOW, limit=500)
            uow.ledger.unpublished_dead_letters(limit=500)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in seen:
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append((statement, [row[0] for row in cursor.fetchall()]))
        raw.rollback()
    finally:
        raw.close()
    return plans


def test_the_sweep_reads_no_whole_table_on_a_large_ledger(large_ledger: Engine) -> None:
    plans = _plans_of_sweep_statements(large_ledger)
    # Read through the partial indexes of 0007 (an index walked in full with a filter would
    # read the whole table as surely as a sequential scan).
    for table, index in (("events", "ix_events_processing"),
                         ("rejected_events", "ix_rejected_events_unannounced")):
        plan = next(p for statement, p in plans if f"FROM {table} " in statement)
        assert any(index in line for line in plan), "\n".join(plan)
    for statement, plan in plans:
        scans = [line.strip() for line in plan if line.strip().lstrip("-> ").startswith(
            WHOLE_TABLES)]
        assert not scans, f"{statement}\n" + "\n".join(plan)


def test_events_left_processing_are_still_found_and_repaired(large_ledger: Engine) -> None:
    with sql_unit_of_work_factory(large_ledger)() as uow:
        repaired = uow.ledger.repair_event_states(now=NOW, limit=500)
        uow.commit()
    # Their entities are all issued, so the events are completed now.
    assert sorted(repaired) == sorted(f"large-{n}" for n in range(5000, ROWS + 1, 5000))
    with large_ledger.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM events WHERE state = 'processing'")) == 0


def test_a_sweep_looks_at_a_bounded_share_of_the_events_waiting_and_still_finds_the_stuck(
        clean_ledger: Engine) -> None:
    # Given 3,000 events processing, each with an entity waiting for a retry, and three stuck
    # ones (processing, although their entity is issued)
    with clean_ledger.begin() as conn:
        conn.execute(text("""
            INSERT INTO events (event_id, event_type, customer_key, customer, series_ids,
                                metadata, payload, fingerprint, issue_ref, source, state)
            SELECT 'wait-' || md5(n::text), 'tier_upgrade', 'id:' || n, '{}', ARRAY[1], '{}',
                   '{}', 'f', 'r' || n, 'bus', 'processing'
            FROM generate_series(1, 3003) AS n"""))
        conn.execute(text("""
            INSERT INTO entities (event_id, series_id, customer_key, state, attempts)
            SELECT 'wait-' || md5(n::text), 1, 'id:' || n,
                   CASE WHEN n > 3000 THEN 'issued' ELSE 'retry_wait' END, 1
            FROM generate_series(1, 3003) AS n"""))
    with clean_ledger.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("ANALYZE events, entities"))
    stuck = {f"wait-{md5}" for md5 in _md5s(clean_ledger, (3001, 3002, 3003))}

    # When the sweep repairs with a batch of 100, Then each time it reads a batch's worth of
    # the events processing, not all 3,003 (the planner may pick a scan that stops at the
    # limit; it passes over the rows its filter drops on the way: up to twice the batch)
    with capture(clean_ledger) as seen, sql_unit_of_work_factory(clean_ledger)() as uow:
        uow.ledger.repair_event_states(now=NOW, limit=100)  # rolled back
    plans = explain(clean_ledger, seen.statements)
    read = [(node.get("Index Name"), node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
             + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0))
            for plan in plans for node in _nodes(plan["Plan"])
            if node.get("Relation Name") == "events"]
    assert read and all(rows <= 200 for _, rows in read), read
    # And sweep after sweep, every stuck event is found (a different share each time)
    found: set[str] = set()
    for _ in range(600):
        if found == stuck:
            break
        with sql_unit_of_work_factory(clean_ledger)() as uow:
            found |= set(uow.ledger.repair_event_states(now=NOW, limit=100))
            uow.commit()
    assert found == stuck
    with clean_ledger.connect() as conn:
        assert conn.scalar(text(
            "SELECT count(*) FROM events WHERE state = 'processing'")) == 3000


def _md5s(engine: Engine, numbers: tuple[int, ...]) -> list[str]:
    with engine.connect() as conn:
        return [str(conn.scalar(text("SELECT md5(CAST(:n AS text))"), {"n": n}))
                for n in numbers]


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", ()) for n in _nodes(child))]
