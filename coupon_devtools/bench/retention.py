"""How long ``prune`` takes on a generated ledger: the figure docs/retention.md quotes.

    python -m coupon_devtools.bench.retention --events 100000 [--batch-size 1000]

Makes a database of its own (dropped afterwards) and fills it in SQL: ``--events`` settled
events 100 days old, two issued entities each, their coupons, two history rows per entity and
one call per event, plus one failed event (a dead letter) in fifty; then times a dry run and a
prune of everything older than 30 days, and a second prune that finds nothing left to do.
"""

from __future__ import annotations

import argparse
import time
import uuid

from sqlalchemy import create_engine, text

from coupon_devtools.harness.databases import create_migrated, drop_database
from worker.adapters.postgres.retention import RetentionStore
from worker.usecases.retention import RetentionPolicy, prune

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DAY_S = 86_400.0

FILL = [
    """INSERT INTO events (event_id, event_type, customer_key, customer, series_ids, metadata,
                           payload, fingerprint, issue_ref, source, received_at, updated_at,
                           state)
       SELECT 'e' || g, 'tier_upgrade', 'id:' || g, jsonb_build_object('id', g::text),
              ARRAY[1, 2], '{}', jsonb_build_object('eventId', 'e' || g, 'note', repeat('x', 300)),
              md5(g::text) || md5(g::text), 'cw:' || g, 'bus',
              now() - interval '100 days' + g * interval '10 ms',
              now() - interval '100 days' + g * interval '10 ms',
              CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END
       FROM generate_series(1, :n) AS g""",
    """INSERT INTO entities (event_id, series_id, customer_key, state, attempts, issued_at,
                             dead_at, created_at, updated_at)
       SELECT 'e' || g, s, 'id:' || g,
              CASE WHEN g % 50 = 0 AND s = 2 THEN 'dead' ELSE 'issued' END, 1, now(),
              CASE WHEN g % 50 = 0 AND s = 2 THEN now() - interval '100 days' END, now(), now()
       FROM generate_series(1, :n) AS g CROSS JOIN unnest(ARRAY[1, 2]) AS s""",
    """INSERT INTO coupons (entity_id, event_id, series_id, customer_key, code, raw, recorded_via)
       SELECT id, event_id, series_id, customer_key, 'CODE' || id, '{}', 'issue'
       FROM entities WHERE state = 'issued'""",
    """INSERT INTO entity_history (entity_id, kind, state, attempt)
       SELECT id, k, 'issued', 1
       FROM entities CROSS JOIN unnest(ARRAY['claimed', 'issued']) AS k""",
    """INSERT INTO api_calls (event_id, entity_ids, series_ids, operation, latency_ms, outcome,
                              started_at)
       SELECT event_id, array_agg(id), array_agg(series_id), 'bulk_issue', 80, 'ok', now()
       FROM entities GROUP BY event_id""",
    "VACUUM ANALYZE",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    name = f"cw_retention_bench_{uuid.uuid4().hex[:8]}"
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    create_migrated(url)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")  # for VACUUM
    ledger = create_engine(url)
    try:
        started = time.monotonic()
        with engine.connect() as conn:
            for statement in FILL:
                conn.execute(text(statement), {"n": args.events})
            rows = conn.execute(text(
                "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM entities) + "
                "(SELECT count(*) FROM coupons) + (SELECT count(*) FROM entity_history) + "
                "(SELECT count(*) FROM api_calls)")).scalar_one()
        print(f"generated {args.events} events, {rows} rows in {time.monotonic() - started:.1f} s")
        store = RetentionStore(ledger)
        policy = RetentionPolicy(older_than_s=30 * DAY_S, event_id_window_s=400 * DAY_S,
                                 audit_days=730, batch_size=args.batch_size)
        for label, dry_run in (("dry run", True), ("prune", False), ("second prune", False)):
            report = prune(store, policy, dry_run=dry_run)
            removed = report.entities + report.coupons + report.history + report.calls
            rate = removed / report.duration_s if report.duration_s else 0.0
            print(f"{label}: {report.events} events, {removed} child rows in "
                  f"{report.duration_s:.2f} s ({rate:,.0f} rows/s, {report.batches} batches); "
                  f"kept {report.kept}")
    finally:
        ledger.dispose()
        engine.dispose()
        drop_database(ADMIN_URL, name)


if __name__ == "__main__":
    main()
