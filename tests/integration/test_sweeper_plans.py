"""Every worker sweeps once a second: on a large ledger, each sweep statement reads only the
rows it may act on, through an index, never a whole table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

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
