"""How fast the console's pages answer on a large ledger.

Seeds a database of its own with ``--entities`` entities (two series per event, 30 days of
history, 1 % dead with one cause, a coupon per issued entity) using SQL ``generate_series``,
then times each page in process (Starlette's TestClient, logged in as an admin): the median
of ``--repeat`` requests after one warm-up. The target is under 200 ms a page.

    python -m coupon_devtools.bench.console_pages --entities 1000000
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from coupon_devtools.harness.databases import create_migrated, drop_database

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
TARGET_MS = 200.0
DEAD_SERIES = 553379
DEAD_MESSAGE = "refused by Capillary: Series expired"

SEED = """
INSERT INTO events (event_id, event_type, customer_key, customer, series_ids, metadata, payload,
                    fingerprint, issue_ref, source, received_at, state, updated_at)
SELECT 'bench-' || g, 'TierUpgraded', 'id:' || (100000000 + g),
       jsonb_build_object('id', (100000000 + g)::text), ARRAY[544770, 553379], '{}'::jsonb,
       '{}'::jsonb, md5(g::text), substr(md5('r' || g), 1, 16), 'bus',
       now() - ((:events - g) * (30 * 86400.0 / :events)) * interval '1 second',
       CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END,
       now() - ((:events - g) * (30 * 86400.0 / :events)) * interval '1 second'
FROM generate_series(1, :events) AS g;

INSERT INTO entities (event_id, series_id, customer_key, state, attempts, last_error_code,
                      last_error_message, last_request_id, dead_at, issued_at, created_at,
                      updated_at)
SELECT e.event_id, s, e.customer_key, x.state, 1,
       CASE WHEN x.state = 'dead' THEN '712' END,
       CASE WHEN x.state = 'dead' THEN :dead_message END,
       md5(e.event_id), CASE WHEN x.state = 'dead' THEN e.received_at END,
       CASE WHEN x.state = 'issued' THEN e.received_at END, e.received_at, e.received_at
FROM events e CROSS JOIN unnest(e.series_ids) AS s
CROSS JOIN LATERAL (SELECT CASE WHEN e.state = 'failed' AND s = :dead_series
                                THEN 'dead' ELSE 'issued' END AS state) AS x;

INSERT INTO coupons (entity_id, event_id, series_id, customer_key, code, raw, recorded_via,
                     valid_till, issued_at)
SELECT id, event_id, series_id, customer_key, upper(substr(md5(id::text), 1, 10)),
       '{}'::jsonb, 'issue', issued_at + interval '30 days', issued_at
FROM entities WHERE state = 'issued';

INSERT INTO entity_history (entity_id, at, kind, state, attempt, error_code, message, request_id)
SELECT id, updated_at, CASE WHEN state = 'dead' THEN 'dead' ELSE 'issued' END, state, 1,
       last_error_code, last_error_message, last_request_id
FROM entities;

INSERT INTO operator_actions (at, action, operator, reason, outcome, details)
SELECT now() - g * interval '1 minute', 'replay', 'ana', 'bench', 'requeued', '{}'::jsonb
FROM generate_series(1, 20000) AS g;

ANALYZE;
"""


def seed(url: str, entities: int) -> float:
    """Fill the ledger; seconds it took."""
    started = time.perf_counter()
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in SEED.split(";\n"):
            if statement.strip():
                conn.execute(text(statement), {"events": entities // 2,
                                               "dead_series": DEAD_SERIES,
                                               "dead_message": DEAD_MESSAGE})
    engine.dispose()
    return time.perf_counter() - started


def time_pages(url: str, entities: int, repeat: int) -> list[tuple[str, float]]:
    """Median milliseconds per page."""
    from starlette.testclient import TestClient

    from worker.config import load_settings
    from worker.entrypoints.console.app import create_app
    from worker.entrypoints.console.auth import hash_password
    from worker.entrypoints.console.config import load_console_settings

    customer = str(100000000 + entities // 4)
    dead_event = (entities // 2) - (entities // 2) % 50
    pages = {
        "overview": "/",
        "customer": f"/customer?q={customer}",
        "dead letters by cause": "/dlq",
        "a dead-letter group": f"/dlq/group?code=712&series={DEAD_SERIES}"
                               f"&message={DEAD_MESSAGE.replace(' ', '+')}",
        "replay dry run (one entity)": f"/replay/plan?event=bench-{dead_event}",
        f"replay dry run (group of {entities // 100:,})":
            f"/replay/plan?code=712&series={DEAD_SERIES}",
        "entity": "/entities/1",
        "audit": "/audit",
        "replay jobs": "/jobs",
        "rejected": "/rejected",
    }
    with tempfile.TemporaryDirectory() as scratch:
        users = Path(scratch) / "users.json"
        users.write_text(json.dumps({"users": [
            {"name": "bench", "role": "admin", "password_hash": hash_password("bench")}]}))
        settings = load_settings(database_url=url)
        console = load_console_settings(secret=secrets.token_hex(32), users=str(users))
        client = TestClient(create_app(settings, console))
        login = client.get("/login").text
        token = login.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"username": "bench", "password": "bench",
                                    "csrf_token": token})
        timings = []
        for name, path in pages.items():
            assert client.get(path).status_code == 200, path  # warm-up
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                response = client.get(path)
                samples.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, (path, response.status_code)
            timings.append((name, statistics.median(samples)))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help="PostgreSQL server URL (a database of its own is created there)")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    args = parser.parse_args(argv)
    name = f"cw_console_bench_{uuid.uuid4().hex[:8]}"
    url = f"{args.server}/{name}"
    create_migrated(url)
    try:
        print(f"seeding {args.entities:,} entities into {name} ...", flush=True)
        seeded_s = seed(url, args.entities)
        print(f"seeded in {seeded_s:.1f} s; timing each page (median of {args.repeat})")
        timings = time_pages(url, args.entities, args.repeat)
    finally:
        if not args.keep:
            drop_database(url, name)
    # A verdict per page, printed, never an exit status: a busy machine makes a slow page,
    # and the figures are what a reader needs (as in ``coupon-worker bench``).
    slow = 0
    for page, ms in timings:
        verdict = "ok" if ms < TARGET_MS else f"SLOW (target {TARGET_MS:.0f} ms)"
        slow += ms >= TARGET_MS
        print(f"  {page:<30} {ms:8.1f} ms  {verdict}")
    print(f"{len(timings) - slow} of {len(timings)} pages under {TARGET_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
