"""The two statements every event pays for: the claim and the outcome, one round trip each.

Exactly once needs two commits per event: the claim before Capillary is called, the outcome
before the message is acknowledged. Each is written here as one SQL statement (data-modifying
CTEs), and ``SqlLedger`` runs it as a transaction of its own (autocommit: a single statement
is atomic), so an event costs two round trips to PostgreSQL instead of the fifteen that
separate statements inside BEGIN ... COMMIT cost. A third, the circuit's state, is read the
same way once a second by every pool process. Everything else the ledger does (the sweeper,
support actions) stays in SQLAlchemy Core, where a few round trips more do not matter.

Two facts of PostgreSQL shape the statements:
- every part of a statement sees the same snapshot, taken when it starts: an UPDATE cannot
  see rows an INSERT of the same statement adds. A new event's entities are therefore
  inserted already claimed, and an event seen before is claimed by an UPDATE of the rows it
  already had;
- the event's summary state is computed from *every* entity of the event, so the outcome
  statement first locks them all (``FOR UPDATE``, in id order): a row lock waited for returns
  the row as the other transaction committed it, so two outcomes of one event, recorded at
  once by two workers, read each other's states rather than stale ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from worker.adapters.postgres.records import RecordedCall, Transition
from worker.domain.model import (
    CLAIMABLE_FRESH,
    ISSUED_STATES,
    TERMINAL_STATES,
    Coupon,
    EntityState,
    EventState,
)


def _wire(sql: str) -> str:
    """The statement as sent: without comments or runs of blanks.

    psycopg converts a statement's ``%(name)s`` placeholders once and caches the result, but
    only for statements up to 4,096 bytes (``MAX_CACHED_STATEMENT_LENGTH``); the outcome
    statement, as written here, is longer and was parsed again on every event. No string
    literal in these statements holds ``--`` or two blanks in a row.
    """
    return re.sub(r"\s+", " ", re.sub(r"--[^\n]*", "", sql)).strip()


def _sql_list(states: frozenset[EntityState]) -> str:
    return ", ".join(f"'{s.value}'" for s in sorted(states, key=lambda s: s.value))


_IN_FLIGHT = EntityState.IN_FLIGHT.value

# Leases and settle times are on the database's clock (now()), never a host's (see
# ``worker.adapters.postgres.tables``). ``%(name)s`` are psycopg's named parameters.
# ``again`` is the claim rule of ``issuing._claim_statement`` written out in SQL, to keep this
# statement one round trip; a contract test (``test_a_redelivery_and_an_event_claim_follow_one
# _claim_rule``) claims an entity in every state both ways and compares the rows.
TAKE_IN = _wire(f"""
WITH new_event AS (
    INSERT INTO events (event_id, event_type, customer_key, customer, series_ids, metadata,
                        payload, fingerprint, issue_ref, source, occurred_at, received_at,
                        updated_at)
    VALUES (%(event_id)s, %(event_type)s, %(customer_key)s, %(customer)s, %(series_ids)s,
            %(metadata)s, %(payload)s, %(fingerprint)s, %(issue_ref)s, %(source)s,
            %(occurred_at)s, %(now)s, %(now)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING customer, customer_key, metadata, issue_ref
), seen_event AS (
    SELECT customer, customer_key, metadata, issue_ref, fingerprint
    FROM events WHERE event_id = %(event_id)s
), fresh AS (
    -- A new event: its entities are created claimed.
    INSERT INTO entities (event_id, series_id, customer_key, state, attempts, claim_token,
                          claimed_by, lease_until, first_attempt_at, created_at, updated_at)
    SELECT %(event_id)s, series_id, %(customer_key)s, '{_IN_FLIGHT}', 1, %(token)s,
           %(worker)s, now() + %(lease_s)s * interval '1 second', %(now)s, %(now)s, %(now)s
    FROM new_event CROSS JOIN unnest(%(series_ids)s::integer[]) AS series_id
    RETURNING id, series_id, attempts, needs_reconcile, first_attempt_at,
              true AS settled, 0.0::float8 AS settles_in_s
), again AS (
    -- An event seen before, with the same content: claim what was never tried, and what a
    -- dead worker abandoned mid-call (its call may have issued: reconcile first).
    UPDATE entities e SET
        needs_reconcile = e.needs_reconcile OR e.state = '{_IN_FLIGHT}',
        settles_at = CASE WHEN e.state = '{_IN_FLIGHT}'
            THEN greatest(coalesce(e.settles_at, e.lease_until),
                          e.lease_until + %(settle_s)s * interval '1 second')
            ELSE e.settles_at END,
        state = '{_IN_FLIGHT}',
        attempts = e.attempts + 1,
        claim_token = %(token)s,
        claimed_by = %(worker)s,
        lease_until = now() + %(lease_s)s * interval '1 second',
        queued_at = NULL,
        first_attempt_at = coalesce(e.first_attempt_at, %(now)s),
        updated_at = %(now)s
    WHERE e.id IN (
        SELECT id FROM entities
        WHERE event_id = %(event_id)s
          AND (state IN ({_sql_list(CLAIMABLE_FRESH)})
               OR (state = '{_IN_FLIGHT}' AND lease_until < now()))
          AND EXISTS (SELECT 1 FROM seen_event WHERE fingerprint = %(fingerprint)s)
        FOR UPDATE SKIP LOCKED)
    RETURNING e.id, e.series_id, e.attempts, e.needs_reconcile, e.first_attempt_at,
              coalesce(e.settles_at <= now(), true) AS settled,
              coalesce(extract(epoch FROM e.settles_at - now())::float8, 0.0) AS settles_in_s
), claimed AS (
    SELECT * FROM fresh UNION ALL SELECT * FROM again
), history AS (
    INSERT INTO entity_history (entity_id, at, kind, state, attempt, worker, message)
    SELECT id, %(now)s, 'claimed', '{_IN_FLIGHT}', attempts, %(worker)s,
           CASE WHEN needs_reconcile THEN 'reconcile first' END
    FROM claimed
)
SELECT
    EXISTS (SELECT 1 FROM new_event) AS new,
    s.fingerprint,
    coalesce(n.customer, s.customer), coalesce(n.customer_key, s.customer_key),
    coalesce(n.metadata, s.metadata), coalesce(n.issue_ref, s.issue_ref),
    -- What was there instead, when nothing could be claimed (for the log).
    CASE WHEN NOT EXISTS (SELECT 1 FROM claimed) THEN (
        SELECT coalesce(jsonb_object_agg(state, n), '{{}}')
        FROM (SELECT state, count(*) AS n FROM entities
              WHERE event_id = %(event_id)s GROUP BY state) AS counts
    ) END,
    c.id, c.series_id, c.attempts, c.needs_reconcile, c.first_attempt_at, c.settled,
    c.settles_in_s
FROM (SELECT 1) AS one
LEFT JOIN new_event n ON true
LEFT JOIN seen_event s ON true
LEFT JOIN claimed c ON true
ORDER BY c.series_id
""")  # noqa: S608 (only the domain's state names are interpolated)

_ISSUED = _sql_list(ISSUED_STATES)
_TERMINAL = _sql_list(TERMINAL_STATES)


def event_state_sql(entity_state: str) -> str:
    """The event's summary, as an aggregate over its entities' states (``entity_state``: the
    SQL of one entity's state): ``worker.domain.model.event_state``'s rule, for the outcome
    statement here and for ``tables``' recomputation of events."""
    return (f"CASE WHEN bool_or({entity_state} NOT IN ({_TERMINAL})) "
            f"THEN '{EventState.PROCESSING.value}' "
            f"WHEN bool_or({entity_state} = '{EntityState.DEAD.value}') "
            f"THEN '{EventState.FAILED.value}' "
            f"ELSE '{EventState.COMPLETED.value}' END")


RECORD = _wire(f"""
WITH t AS (
    SELECT * FROM jsonb_to_recordset(%(transitions)s::jsonb) AS t(
        entity_id bigint, state text, kind text, attempt integer, is_issued boolean,
        is_dead boolean, settle_s float8, verify_s float8, reconcile boolean,
        next_at timestamptz, verdict text, code text, message text, request_id text,
        refund integer, dead_reason text, history_message text)
), siblings AS (
    -- Every entity of the event, locked in id order, as last committed.
    SELECT id, state FROM entities WHERE event_id = %(event_id)s ORDER BY id FOR UPDATE
), moved AS (
    -- An issued coupon is recorded even if the claim was lost (the coupon exists whatever
    -- the ledger thought); any other outcome needs the claim to still be ours.
    UPDATE entities e SET
        state = t.state,
        settles_at = CASE WHEN t.settle_s IS NULL THEN e.settles_at
                          ELSE now() + t.settle_s * interval '1 second' END,
        verify_after = CASE WHEN t.verify_s IS NOT NULL
                                THEN now() + t.verify_s * interval '1 second'
                            WHEN t.state = '{EntityState.DUPLICATE_ISSUED.value}' THEN NULL
                            ELSE e.verify_after END,
        updated_at = %(now)s,
        claim_token = NULL, lease_until = NULL, claimed_by = NULL,
        needs_reconcile = t.reconcile,
        next_attempt_at = t.next_at,
        last_verdict = coalesce(t.verdict, e.last_verdict),
        last_error_code = CASE WHEN t.is_issued THEN e.last_error_code
                               ELSE coalesce(t.code, e.last_error_code) END,
        last_error_message = CASE WHEN t.is_issued THEN e.last_error_message
                                  ELSE coalesce(t.message, e.last_error_message) END,
        last_request_id = coalesce(t.request_id, e.last_request_id),
        attempts = e.attempts - t.refund,
        issued_at = CASE WHEN t.is_issued THEN %(now)s ELSE e.issued_at END,
        dead_at = CASE WHEN t.is_dead THEN %(now)s ELSE e.dead_at END,
        dead_reason = CASE WHEN t.is_dead THEN t.dead_reason ELSE e.dead_reason END,
        dead_published_at = CASE WHEN t.is_dead THEN NULL ELSE e.dead_published_at END
    FROM t
    WHERE e.id = t.entity_id
      AND e.id IN (SELECT id FROM siblings)
      AND (e.claim_token = %(token)s OR (t.is_issued AND e.state NOT IN ({_ISSUED})))
    RETURNING e.id, e.state
), history AS (
    INSERT INTO entity_history (entity_id, at, kind, state, attempt, error_code, message,
                                request_id, worker)
    SELECT entity_id, %(now)s, kind, state, attempt, code, history_message, request_id,
           %(worker)s
    FROM t
), coupons AS (
    INSERT INTO coupons (entity_id, event_id, series_id, code, customer_key,
                         capillary_coupon_id, description, discount_code, discount_type,
                         discount_value, discount_upto, discount_on, valid_till,
                         valid_till_date_time, raw, recorded_via, request_id, issued_at,
                         warnings)
    SELECT entity_id, %(event_id)s, series_id, code, %(customer_key)s, capillary_coupon_id,
           description, discount_code, discount_type, discount_value, discount_upto,
           discount_on, valid_till, valid_till_date_time, raw, recorded_via, request_id,
           %(now)s, warnings
    FROM jsonb_to_recordset(%(coupons)s::jsonb) AS c(
        entity_id bigint, series_id integer, code text, capillary_coupon_id bigint,
        description text, discount_code text, discount_type text, discount_value numeric,
        discount_upto numeric, discount_on text, valid_till timestamptz,
        valid_till_date_time timestamptz, raw jsonb, recorded_via text, request_id text,
        warnings jsonb)
    ON CONFLICT (entity_id, code) DO NOTHING
), calls AS (
    INSERT INTO api_calls (event_id, entity_ids, series_ids, operation, request_id,
                           http_status, latency_ms, outcome, error_code, error_message,
                           started_at, worker, issue_ref)
    SELECT %(event_id)s, entity_ids, series_ids, operation, request_id, http_status,
           latency_ms, outcome, error_code, error_message, started_at, %(worker)s, issue_ref
    FROM jsonb_to_recordset(%(calls)s::jsonb) AS c(
        entity_ids bigint[], series_ids integer[], operation text, request_id text,
        http_status integer, latency_ms float8, outcome text, error_code text,
        error_message text, started_at timestamptz, issue_ref text)
), event AS (
    UPDATE events SET
        state = (
            SELECT {event_state_sql("coalesce(m.state, s.state)")}
            FROM siblings s LEFT JOIN moved m ON m.id = s.id),
        updated_at = %(now)s
    WHERE event_id = %(event_id)s AND EXISTS (SELECT 1 FROM t)
)
SELECT count(*) FROM moved
""")  # noqa: S608 (only the domain's state names are interpolated)


CIRCUIT_STATE = _wire("""
SELECT state, consecutive_failures, times_opened, open_until, reason
FROM circuit_breakers WHERE name = %(name)s
""")


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# One encoder for the process: json.dumps with options builds a new one on every call, which
# cost more than encoding an event's few rows.
_ROWS_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


def as_json(rows: Sequence[dict[str, Any]]) -> str:
    """Rows for ``jsonb_to_recordset``: timestamps as ISO 8601, decimals exact, as text."""
    return _ROWS_ENCODER.encode(rows)


def transition_rows(transitions: Sequence[Transition]) -> list[dict[str, Any]]:
    return [
        {
            "entity_id": t.entity_id, "state": t.state.value, "kind": t.kind,
            "attempt": t.attempt, "is_issued": t.state in ISSUED_STATES,
            "is_dead": t.state is EntityState.DEAD, "settle_s": t.settle_window_s,
            "verify_s": t.verify_window_s, "reconcile": t.needs_reconcile,
            "next_at": t.next_attempt_at, "verdict": t.verdict, "code": t.error_code,
            "message": t.error_message, "request_id": t.request_id,
            "refund": 1 if t.refund_attempt else 0, "dead_reason": t.dead_reason,
            "history_message": t.dead_reason or t.error_message
            or (f"coupon {t.coupon.code}" if t.coupon else None),
        }
        for t in transitions
    ]


def coupon_rows(transitions: Sequence[Transition]) -> list[dict[str, Any]]:
    return [
        coupon_row(c, t.entity_id, t.recorded_via, t.request_id)
        for t in transitions
        for c in ((t.coupon,) if t.coupon is not None else ()) + t.extra_coupons
    ]


def coupon_row(c: Coupon, entity_id: int, via: str, request_id: str | None) -> dict[str, Any]:
    """A coupon as its ``coupons`` row stores it, but for the event, the customer and the time
    (the statement's own parameters here; ``tables.coupon_row`` adds them)."""
    return {
        "entity_id": entity_id, "series_id": c.series_id, "code": c.code,
        "capillary_coupon_id": c.capillary_id, "description": c.description,
        "discount_code": c.discount_code, "discount_type": c.discount_type,
        "discount_value": c.discount_value, "discount_upto": c.discount_upto,
        "discount_on": c.discount_on, "valid_till": c.valid_till,
        "valid_till_date_time": c.valid_till_date_time, "raw": c.raw,
        "recorded_via": via, "request_id": request_id,
        "warnings": list(c.warnings) if c.warnings else None,
    }


def call_rows(calls: Sequence[RecordedCall]) -> list[dict[str, Any]]:
    return [
        {
            "entity_ids": list(c.entity_ids), "series_ids": list(c.series_ids),
            "operation": c.info.operation, "request_id": c.info.request_id,
            "http_status": c.info.status, "latency_ms": c.info.latency_ms,
            "outcome": c.info.outcome, "error_code": c.info.error_code,
            "error_message": c.info.error_message, "started_at": c.info.started_at,
            "issue_ref": c.issue_ref,
        }
        for c in calls
    ]
