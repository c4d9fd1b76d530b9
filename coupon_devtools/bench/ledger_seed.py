"""A ledger that has run for a year, made in minutes: the rows of ``--ledger-rows`` entities.

The schema is the real one (``create_migrated``: Alembic's migrations); the rows go in with
COPY (psycopg 3's ``cursor.copy``), five tables at once from one pass over generated events.
Shapes, per entity: most issued with their coupon, a few percent dead (published long ago),
some discarded, some waiting for a retry (due later) and some of those unknown outcomes, a
handful of duplicates; one to two series per event out of eight; a customer for every three
events or so; receipt times spread over the last year; a bulk call per event plus one call per
further attempt; the history of every attempt.

Loading is the bulk loader's usual way, kept equal to the migrations' schema: the big tables'
secondary indexes are dropped, the rows copied, and each index built again from its own
definition (``pg_get_indexdef``, read before it was dropped); ``seed`` checks the definitions
came back identical. Triggers (the foreign keys' checks, the state machine's, the dead-letter
groups' count) are off for the loading session (``session_replication_role = replica``): the
rows are consistent by construction, and checking each of millions one by one would triple the
time. The dead-letter groups are then counted in one statement, as migration 0017 counts them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from worker.adapters.postgres.dead_letter_groups import COUNT_AFRESH
from worker.domain.model import issue_ref

#: The tables that grow with every event: the ones a plan must never read whole.
BIG_TABLES = ("events", "entities", "entity_history", "api_calls", "coupons")
SEED_SERIES = (544770, 553379, 601001, 601002, 601003, 612500, 612501, 640000)
#: Shares of the entities, by what became of them (the rest are issued).
DEAD_SHARE = 0.03
DISCARDED_SHARE = 0.005
WAITING_SHARE = 0.004
UNKNOWN_OUTCOME_SHARE = 0.001
DUPLICATE_SHARE = 0.0002
EVENTS_PER_CUSTOMER = 3
VACUUM_TRIES = 4
VACUUM_PAUSE_S = 10.0
ALL_VISIBLE_TARGET = 0.95
YEAR = timedelta(days=365)
DEAD_CAUSES = (
    ("707", "Invalid series id"),
    ("1053", "Customer not found"),
    ("729", "Coupon series expired"),
    ("read_timeout", "no answer within 10 s"),
    ("503", "Service Unavailable"),
    ("unknown_outcome", "still unknown after 8 attempts"),
)
WAIT_CAUSES = (("503", "Service Unavailable"), ("read_timeout", "no answer within 10 s"),
               ("circuit_open", "paused: Capillary failing"))
METADATA = {"sourceType": "TierUpgrade", "sourceId": "campaign-2026", "reason": "tier upgrade"}
COPY_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("event_id", "event_type", "customer_key", "customer", "series_ids", "metadata",
               "payload", "fingerprint", "issue_ref", "source", "occurred_at", "received_at",
               "state", "updated_at"),
    "entities": ("id", "event_id", "series_id", "customer_key", "state", "attempts",
                 "needs_reconcile", "last_verdict", "last_error_code", "last_error_message",
                 "last_request_id", "next_attempt_at", "first_attempt_at", "issued_at",
                 "dead_at", "dead_reason", "dead_published_at", "settles_at", "created_at",
                 "updated_at"),
    "entity_history": ("entity_id", "at", "kind", "state", "attempt", "error_code", "message",
                       "request_id", "worker"),
    "api_calls": ("event_id", "entity_ids", "series_ids", "operation", "request_id",
                  "http_status", "latency_ms", "outcome", "error_code", "error_message",
                  "started_at", "worker"),
    "coupons": ("entity_id", "event_id", "series_id", "customer_key", "code",
                "capillary_coupon_id", "description", "discount_type", "discount_value",
                "raw", "recorded_via", "request_id", "issued_at"),
}


@dataclass
class SeedReport:
    """What ``seed`` wrote, and how long each part took."""

    entities: int
    rows: dict[str, int] = field(default_factory=dict)
    copy_s: float = 0.0
    index_s: float = 0.0
    vacuum_s: float = 0.0
    size_mb: float = 0.0
    #: The share of the entities' pages VACUUM marked all-visible (index-only scans need it).
    all_visible: float = 0.0

    @property
    def total_s(self) -> float:
        return self.copy_s + self.index_s + self.vacuum_s

    @property
    def big_table_rows(self) -> int:
        """The rows of the big tables (``BIG_TABLES``) all together: the ledger's size."""
        return sum(self.rows.get(table, 0) for table in BIG_TABLES)


@dataclass
class _Writers:
    """One COPY per table, each on a connection of its own, fed by one pass."""

    rows: dict[str, int]
    write: dict[str, Callable[[tuple[Any, ...]], None]]

    def put(self, table: str, row: tuple[Any, ...]) -> None:
        self.write[table](row)
        self.rows[table] += 1


def _array(values: list[int]) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def _hex(rng: random.Random, bits: int = 128) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _fate(rng: random.Random) -> str:
    draw = rng.random()
    for state, share in (("dead", DEAD_SHARE), ("discarded", DISCARDED_SHARE),
                         ("waiting", WAITING_SHARE), ("unknown", UNKNOWN_OUTCOME_SHARE),
                         ("duplicate_issued", DUPLICATE_SHARE)):
        if draw < share:
            return state
        draw -= share
    return "issued"


def generate(out: _Writers, entities: int, *, now: datetime, seed: int = 26) -> None:
    """Events until ``entities`` entities, with their history, calls and coupons."""
    rng = random.Random(seed)
    customers = max(1, entities // (EVENTS_PER_CUSTOMER * 3 // 2))
    events = max(1, entities * 2 // 3)
    step = YEAR / events
    entity_id = 0
    n = 0
    while entity_id < entities:
        received = now - YEAR + step * n + timedelta(seconds=rng.random())
        n += 1
        event_id = _hex(rng)
        customer = f"{100_000_000 + rng.randrange(customers)}"
        key = f"id:{customer}"
        width = min(1 + (rng.random() < 0.5), entities - entity_id)
        series = rng.sample(SEED_SERIES, width)
        first_call = _hex(rng)
        fates = [_fate(rng) for _ in series]
        ids = list(range(entity_id + 1, entity_id + 1 + width))
        entity_id += width
        settled_at = received + timedelta(milliseconds=300 + rng.random() * 200)
        out.put("api_calls", (event_id, _array(ids), _array(series), "bulk_issue", first_call,
                              200, 180.0 + rng.random() * 300, "answered", None, None,
                              received, "worker-1:41"))
        for eid, series_id, fate in zip(ids, series, fates, strict=True):
            _entity(out, rng, eid, event_id, series_id, key, fate, received, settled_at,
                    first_call, now)
        if any(f in ("waiting", "unknown") for f in fates):
            state = "processing"
        elif "dead" in fates:
            state = "failed"
        else:
            state = "completed"
        customer_json = json.dumps({"id": customer})
        payload = json.dumps({"eventId": event_id, "eventType": "TierUpgraded",
                              "customer": {"id": customer}, "seriesIds": series,
                              "metadata": METADATA})
        out.put("events", (event_id, "TierUpgraded", key, customer_json, _array(series),
                           json.dumps(METADATA), payload, _hex(rng, 256), issue_ref(event_id),
                           "bus", received - timedelta(seconds=2), received, state,
                           settled_at))


def _entity(out: _Writers, rng: random.Random, eid: int, event_id: str, series_id: int,
            key: str, fate: str, received: datetime, settled_at: datetime, first_call: str,
            now: datetime) -> None:
    attempts = 1
    request_id = first_call
    code = message = verdict = dead_reason = None
    next_at = issued_at = dead_at = published = settles = None
    state = fate
    reconcile = False
    history: list[tuple[Any, ...]] = []
    if fate in ("dead", "waiting", "unknown"):
        attempts = rng.randint(2, 8) if fate == "dead" else rng.randint(1, 4)
        code, message = rng.choice(DEAD_CAUSES if fate == "dead" else WAIT_CAUSES)
        verdict = "permanent" if fate == "dead" else "retryable"
        for attempt in range(1, attempts + 1):
            at = received + timedelta(seconds=30 * attempt * attempt)
            request_id = _hex(rng)
            if attempt > 1:
                out.put("api_calls", (event_id, _array([eid]), _array([series_id]),
                                      "bulk_issue", request_id, 503, 10_000.0, "error", code,
                                      message, at, "worker-2:17"))
            history.append((eid, at, "claimed", "in_flight", attempt, None, None, None,
                            "worker-2:17"))
            history.append((eid, at, "retry_scheduled", "retry_wait", attempt, code, message,
                            request_id, "worker-2:17"))
        if fate == "dead":
            dead_at = settled_at + timedelta(minutes=attempts * 5)
            dead_reason = "permanent error" if code.isdigit() else "attempts exhausted"
            published = dead_at
            history.append((eid, dead_at, "dead", "dead", attempts, code, dead_reason,
                            request_id, "worker-2:17"))
        else:
            # Due later, whatever the run's length: never picked up while it is measured.
            state = "retry_wait"
            next_at = now + timedelta(hours=rng.randint(2, 48))
            if fate == "unknown":
                reconcile, verdict, code = True, "ambiguous", "read_timeout"
                settles = now + timedelta(hours=1)
    else:
        history.append((eid, received, "claimed", "in_flight", 1, None, None, None,
                        "worker-1:41"))
        if fate == "discarded":
            history.append((eid, settled_at, "discarded", "discarded", 1, None,
                            "discarded by support: customer left the programme", None, None))
        else:
            issued_at = settled_at
            history.append((eid, settled_at, "issued", "issued", 1, None, None, request_id,
                            "worker-1:41"))
            copies = 2 if fate == "duplicate_issued" else 1
            for _ in range(copies):
                coupon = "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ23456789", k=10))
                raw = json.dumps({"code": coupon, "seriesId": series_id,
                                  "discountType": "ABS", "discountValue": 100})
                out.put("coupons", (eid, event_id, series_id, key, coupon,
                                    rng.randrange(10**9), "Tier upgrade voucher", "ABS", 100,
                                    raw, "issue", request_id, settled_at))
    for row in history:
        out.put("entity_history", row)
    out.put("entities", (eid, event_id, series_id, key, state, attempts, reconcile, verdict,
                         code, message, request_id, next_at, received, issued_at, dead_at,
                         dead_reason, published, settles, received,
                         dead_at or issued_at or settled_at))


def _secondary_indexes(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The big tables' indexes that back no constraint: name -> definition."""
    rows = conn.execute("""
        SELECT i.relname, pg_get_indexdef(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid)
        ORDER BY 1""", [list(BIG_TABLES)]).fetchall()
    return {name: definition for name, definition in rows}


def _all_visible(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT relallvisible::float8 / greatest(relpages, 1) FROM pg_class "
                       "WHERE oid = 'entities'::regclass").fetchone()
    return float(row[0]) if row else 0.0


def seed(url: str, entities: int, *, say: Callable[[str], None],
         now: datetime | None = None) -> SeedReport:
    """Fill the migrated, empty ledger at ``url`` (a libpq URL) with ``entities`` entities."""
    now = now or datetime.now(UTC)
    report = SeedReport(entities)
    with psycopg.connect(url, autocommit=True) as admin:
        indexes = _secondary_indexes(admin)
        for name in indexes:
            admin.execute(f'DROP INDEX "{name}"')
        started = time.monotonic()
        report.rows = _copy_all(url, entities, now, say)
        report.copy_s = time.monotonic() - started
        say(f"copied {sum(report.rows.values()):,} rows in {report.copy_s:.0f} s; "
            f"building {len(indexes)} indexes")
        started = time.monotonic()
        admin.execute("SET maintenance_work_mem = '256MB'")
        for definition in indexes.values():
            admin.execute(definition)
        report.index_s = time.monotonic() - started
        if _secondary_indexes(admin) != indexes:
            raise AssertionError("the rebuilt indexes differ from the migrations' own")
        admin.execute("SELECT setval(pg_get_serial_sequence('entities', 'id'), %s)",
                      [max(entities, 1)])
        # COPY ran without triggers (replica): the dead-letter groups, as 0017's backfill
        # counts them and the sweeper's fold keeps them on a ledger in service.
        admin.execute(COUNT_AFRESH)
        started = time.monotonic()
        # What autovacuum does to a ledger in service: statistics, and the visibility map
        # that lets an index-only scan skip the table.
        admin.execute("VACUUM (ANALYZE)")
        for _ in range(VACUUM_TRIES - 1):
            # A transaction open elsewhere on the server (any database) keeps VACUUM from
            # marking the new rows visible to all, and the planner then prices every
            # index-only scan as a visit to the table: wait for it, and vacuum again.
            report.all_visible = _all_visible(admin)
            if report.all_visible >= ALL_VISIBLE_TARGET:
                break
            say(f"{report.all_visible:.0%} of the entities' pages all-visible after VACUUM "
                f"(a transaction open elsewhere?): again in {VACUUM_PAUSE_S:g} s")
            time.sleep(VACUUM_PAUSE_S)
            admin.execute("VACUUM (ANALYZE)")
        report.all_visible = _all_visible(admin)
        report.vacuum_s = time.monotonic() - started
        size = admin.execute("SELECT pg_database_size(current_database())").fetchone()
        report.size_mb = round((size[0] if size else 0) / 2**20, 1)
    return report


def _copy_all(url: str, entities: int, now: datetime,
              say: Callable[[str], None]) -> dict[str, int]:
    with ExitStack() as stack:
        writers: dict[str, Callable[[tuple[Any, ...]], None]] = {}
        for table, columns in COPY_COLUMNS.items():
            conn = stack.enter_context(psycopg.connect(url))
            conn.execute("SET session_replication_role = replica")
            conn.execute("SET synchronous_commit = off")
            cursor = stack.enter_context(conn.cursor())
            copy = stack.enter_context(cursor.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN"))
            writers[table] = copy.write_row
        out = _Writers({table: 0 for table in COPY_COLUMNS}, writers)
        generate(out, entities, now=now)
        say(f"generated {entities:,} entities; committing the copies")
    return out.rows

