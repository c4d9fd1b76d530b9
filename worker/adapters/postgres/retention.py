"""Retention in PostgreSQL: the statements that prune settled events, forget their ids once
the event-id window is over, remove audit rows past their own age, and claim a scheduled run.

Every batch is a short transaction of its own, with its rows picked ``FOR UPDATE SKIP LOCKED``,
so a prune never holds a lock the workers wait for, and two prunes never touch one event.
Ages are measured on the database's clock (``now()``), as leases are, and as the audit
trigger measures them. What is pruned, what is kept and why: docs/retention.md.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

from worker.adapters.postgres.driver import translate
from worker.domain.model import EntityState, EventState

_F = TypeVar("_F", bound=Callable[..., Any])


def _translated(method: _F) -> _F:
    """Our errors for the driver's (``LedgerUnavailable`` when waiting may help)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (sa_exc.SQLAlchemyError, psycopg.Error) as exc:
            raise translate(exc) from exc
    return cast(_F, wrapper)

#: Entity states an event may be pruned in: issued once, or closed by a person.
SETTLED_STATES = (EntityState.ISSUED.value, EntityState.DISCARDED.value)
_COMPLETED = EventState.COMPLETED.value

# The settled events not yet pruned, oldest first, after the last one a batch saw
# (ix_events_prunable). ``updated_at`` too: an event replayed last week is not old.
# The state is written out, not bound: the planner must see that the partial index's
# predicate holds, which it cannot prove from a parameter in a generic plan.
_PICK = f"""
SELECT event_id, received_at FROM events
WHERE pruned_at IS NULL AND state = '{_COMPLETED}'
  AND received_at < now() - :older_than_s * interval '1 second'
  AND updated_at < now() - :older_than_s * interval '1 second'
  AND (received_at, event_id) > (:after_at, :after_id)
ORDER BY received_at, event_id
LIMIT :limit
"""  # noqa: S608 (a constant of the domain)
_ENTITIES = """
SELECT id, event_id, state, verify_after IS NOT NULL FROM entities
WHERE event_id = ANY(:ids) ORDER BY id
"""
_ENTITY_TOTALS = """
SELECT event_id, count(*) FROM entities WHERE event_id = ANY(:ids) GROUP BY event_id
"""
_COUPONS = """
SELECT event_id, series_id, code, capillary_coupon_id FROM coupons
WHERE entity_id = ANY(:entity_ids) ORDER BY id
"""
_COUNT = {
    "coupons": "SELECT count(*) FROM coupons WHERE entity_id = ANY(:entity_ids)",
    "history": "SELECT count(*) FROM entity_history WHERE entity_id = ANY(:entity_ids)",
    "calls": "SELECT count(*) FROM api_calls WHERE event_id = ANY(:ids)",
}
# Children first, explicitly rather than by cascade: the counts are reported.
_DELETE = {
    "coupons": "DELETE FROM coupons WHERE entity_id = ANY(:entity_ids)",
    "history": "DELETE FROM entity_history WHERE entity_id = ANY(:entity_ids)",
    "calls": "DELETE FROM api_calls WHERE event_id = ANY(:ids)",
    "entities": "DELETE FROM entities WHERE id = ANY(:entity_ids)",
}
# The row stays, emptied, until the event-id window ends: the intake's ON CONFLICT (event_id)
# then still finds it, and a redelivery is not issued again.
_EMPTY_EVENTS = """
UPDATE events e SET pruned_at = now(), customer = '{}'::jsonb, metadata = '{}'::jsonb,
    payload = '{}'::jsonb, outcome = o.outcome
FROM jsonb_to_recordset(:outcomes) AS o(event_id text, outcome jsonb)
WHERE e.event_id = o.event_id
"""
_FORGET = """
DELETE FROM events WHERE event_id IN (
    SELECT event_id FROM events
    WHERE pruned_at IS NOT NULL AND received_at < now() - :window_s * interval '1 second'
    ORDER BY received_at LIMIT :limit FOR UPDATE SKIP LOCKED)
"""
_COUNT_FORGET = """
SELECT count(*) FROM events
WHERE pruned_at IS NOT NULL AND received_at < now() - :window_s * interval '1 second'
"""
_AUDIT_OLD = "at < now() - make_interval(days => :audit_days)"
# The append-only trigger lets this transaction, and only it, delete audit rows past the age
# it names (0009); both settings end with the transaction.
_AUDIT_IDENTIFY = """
SELECT set_config('coupons.retention_job', 'audit', true),
       set_config('coupons.audit_retention_days', :audit_days_text, true)
"""
_DELETE_AUDIT = f"""
DELETE FROM operator_actions WHERE id IN (
    SELECT id FROM operator_actions WHERE {_AUDIT_OLD} ORDER BY at LIMIT :limit)
"""  # noqa: S608 (a constant)
_COUNT_AUDIT = f"SELECT count(*) FROM operator_actions WHERE {_AUDIT_OLD}"  # noqa: S608
_FINISHED_JOBS = """
replay_jobs WHERE state IN ('done', 'cancelled')
  AND finished_at < now() - :older_than_s * interval '1 second'
"""
# What stays although it is old, and why (counted on indexes: ix_entities_dead,
# ix_events_processing, ix_rejected_events_received_at).
_KEPT = {
    "dead_letters": """
        SELECT count(*) FROM entities WHERE state = 'dead'
        AND dead_at < now() - :older_than_s * interval '1 second'""",
    "unsettled_events": """
        SELECT count(*) FROM events WHERE state = 'processing'
        AND received_at < now() - :older_than_s * interval '1 second'""",
    "rejected_messages": """
        SELECT count(*) FROM rejected_events
        WHERE received_at < now() - :older_than_s * interval '1 second'""",
}
_CLAIM_RUN = """
UPDATE maintenance_runs SET started_at = now(), started_by = :worker
WHERE name IN (SELECT name FROM maintenance_runs
               WHERE name = :name
                 AND (started_at IS NULL OR started_at <= now() - :every_s * interval '1 second')
               FOR UPDATE SKIP LOCKED)
RETURNING name
"""
_FIRST_RUN = """
INSERT INTO maintenance_runs (name, started_at, started_by) VALUES (:name, now(), :worker)
ON CONFLICT (name) DO NOTHING RETURNING name
"""
_FINISH_RUN = """
UPDATE maintenance_runs SET finished_at = now(), result = :result WHERE name = :name
"""

_EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


@dataclass
class EventBatch:
    """What one batch of settled events removed (or, in a dry run, would remove)."""

    events: int = 0
    entities: int = 0
    coupons: int = 0
    history: int = 0
    calls: int = 0
    #: Old completed events left whole, by reason: ``duplicate_issued`` (two coupons, a
    #: person decides), ``verifying`` (a late-original check is due), ``busy`` (a worker
    #: holds one of its entities right now; the next run takes it).
    kept: Counter[str] = field(default_factory=Counter)
    #: Where the next batch starts: the last event this one looked at.
    after: tuple[datetime, str] | None = None


class RetentionLedger(Protocol):
    """What retention needs (``worker.usecases.retention``): settled events, forgotten ids, old
    audit rows and finished replay jobs pruned, what stays counted, one run at a time."""

    def prune_events(self, *, older_than_s: float, limit: int, dry_run: bool,
                     after: tuple[datetime, str] | None = None) -> EventBatch: ...

    def forget_event_ids(self, *, window_s: float, limit: int, dry_run: bool) -> int: ...

    def prune_audit(self, *, audit_days: int, limit: int, dry_run: bool) -> int: ...

    def prune_replay_jobs(self, *, older_than_s: float, dry_run: bool) -> int: ...

    def kept(self, *, older_than_s: float) -> dict[str, int]: ...

    def claim_run(self, name: str, *, every_s: float, worker: str) -> bool: ...

    def finish_run(self, name: str, result: dict[str, Any]) -> None: ...


class RetentionStore:
    """The statements behind ``coupon-worker prune`` and its schedule (``RetentionLedger``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @_translated
    def prune_events(self, *, older_than_s: float, limit: int, dry_run: bool,
                     after: tuple[datetime, str] | None = None) -> EventBatch:
        """Prune up to ``limit`` settled events older than ``older_than_s``, after ``after``.

        A dry run reads the same rows without locking them and changes nothing.
        """
        lock = "" if dry_run else " FOR UPDATE SKIP LOCKED"
        after_at, after_id = after or (_EPOCH, "")
        with self.engine.begin() as conn:
            picked = conn.execute(text(_PICK + lock), {
                "older_than_s": older_than_s, "after_at": after_at,
                "after_id": after_id, "limit": limit}).all()
            batch = EventBatch(after=(picked[-1][1], picked[-1][0]) if picked else None)
            if not picked:
                return batch
            ids = [row[0] for row in picked]
            rows = list(conn.execute(text(_ENTITIES + lock), {"ids": ids}).all())
            totals: dict[str, int] = {str(k): int(v) for k, v in conn.execute(
                text(_ENTITY_TOTALS), {"ids": ids})}
            prunable, entity_ids = self._settled(ids, rows, totals, batch.kept)
            if not prunable:
                return batch
            params = {"ids": prunable, "entity_ids": entity_ids}
            batch.events, batch.entities = len(prunable), len(entity_ids)
            if dry_run:
                for name, sql in _COUNT.items():
                    setattr(batch, name, int(conn.execute(text(sql), params).scalar_one()))
                return batch
            outcomes = self._outcomes(conn, prunable, rows, entity_ids)
            for name, sql in _DELETE.items():
                count = int(conn.execute(text(sql), params).rowcount)
                if name != "entities":
                    setattr(batch, name, count)
            conn.execute(text(_EMPTY_EVENTS), {"outcomes": Jsonb(outcomes)})
        return batch

    @staticmethod
    def _settled(ids: list[str], rows: list[Any], totals: dict[str, int],
                 kept: Counter[str]) -> tuple[list[str], list[int]]:
        """The events whose every entity is settled (and locked by us), and their entities."""
        by_event: dict[str, list[Any]] = {event_id: [] for event_id in ids}
        for row in rows:
            by_event[row[1]].append(row)
        prunable: list[str] = []
        entity_ids: list[int] = []
        for event_id, entities in by_event.items():
            if len(entities) < totals.get(event_id, 0):
                kept["busy"] += 1
            elif any(e[2] == EntityState.DUPLICATE_ISSUED.value for e in entities):
                kept["duplicate_issued"] += 1
            elif any(e[3] for e in entities):
                kept["verifying"] += 1
            elif all(e[2] in SETTLED_STATES for e in entities):
                prunable.append(event_id)
                entity_ids.extend(int(e[0]) for e in entities)
            else:  # a completed event whose entities moved on since: its next summary says
                kept["busy"] += 1
        return prunable, entity_ids

    @staticmethod
    def _outcomes(conn: Connection, prunable: list[str], rows: list[Any],
                  entity_ids: list[int]) -> list[dict[str, Any]]:
        """What each event ended as, kept on its emptied row: states and coupon codes."""
        states: dict[str, Counter[str]] = {event_id: Counter() for event_id in prunable}
        for row in rows:
            if row[1] in states:
                states[row[1]][row[2]] += 1
        coupons: dict[str, list[dict[str, Any]]] = {event_id: [] for event_id in prunable}
        for event_id, series_id, code, capillary_id in conn.execute(
                text(_COUPONS), {"entity_ids": entity_ids}):
            coupons[event_id].append(
                {"series_id": series_id, "code": code, "capillary_coupon_id": capillary_id})
        return [{"event_id": event_id,
                 "outcome": {"entities": dict(states[event_id]), "coupons": coupons[event_id]}}
                for event_id in prunable]

    @_translated
    def forget_event_ids(self, *, window_s: float, limit: int, dry_run: bool) -> int:
        """Delete up to ``limit`` pruned events received longer than ``window_s`` ago: their
        ids are no longer recognised. A dry run counts them all."""
        with self.engine.begin() as conn:
            if dry_run:
                return int(conn.execute(text(_COUNT_FORGET), {"window_s": window_s}).scalar_one())
            return int(conn.execute(text(_FORGET), {
                "window_s": window_s, "limit": limit}).rowcount)

    @_translated
    def prune_audit(self, *, audit_days: int, limit: int, dry_run: bool) -> int:
        """Delete up to ``limit`` audit rows older than ``audit_days`` (the trigger checks
        the age again). A dry run counts them all."""
        params = {"audit_days": audit_days, "audit_days_text": str(audit_days), "limit": limit}
        with self.engine.begin() as conn:
            if dry_run:
                return int(conn.execute(text(_COUNT_AUDIT), params).scalar_one())
            conn.execute(text(_AUDIT_IDENTIFY), params)
            return int(conn.execute(text(_DELETE_AUDIT), params).rowcount)

    @_translated
    def prune_replay_jobs(self, *, older_than_s: float, dry_run: bool) -> int:
        """Replay jobs finished (done or cancelled) longer ago than ``older_than_s``, with
        their items. A few rows a day: one statement."""
        verb = "SELECT count(*) FROM" if dry_run else "DELETE FROM"
        with self.engine.begin() as conn:
            result = conn.execute(text(f"{verb} {_FINISHED_JOBS}"), {"older_than_s": older_than_s})
            return int(result.scalar_one() if dry_run else result.rowcount)

    @_translated
    def kept(self, *, older_than_s: float) -> dict[str, int]:
        """What is older than ``older_than_s`` and stays, by reason (never pruned silently)."""
        with self.engine.connect() as conn:
            return {reason: int(conn.execute(text(sql), {"older_than_s": older_than_s})
                                .scalar_one())
                    for reason, sql in _KEPT.items()}

    # -- the schedule ----------------------------------------------------------------------

    @_translated
    def claim_run(self, name: str, *, every_s: float, worker: str) -> bool:
        """Become the one worker that runs ``name`` now: true at most once per ``every_s``
        across the fleet (a row lock taken with SKIP LOCKED, in a short transaction)."""
        params = {"name": name, "every_s": every_s, "worker": worker}
        with self.engine.begin() as conn:
            if conn.execute(text(_CLAIM_RUN), params).first() is not None:
                return True
            # The job's first run ever: its row is made claimed (a row that exists, locked or
            # not, is a conflict, and this claim fails).
            return conn.execute(text(_FIRST_RUN), params).first() is not None

    @_translated
    def finish_run(self, name: str, result: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(_FINISH_RUN), {"name": name, "result": Jsonb(result)})

    @_translated
    def last_run(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT started_at, finished_at, started_by, result FROM maintenance_runs "
                "WHERE name = :name"), {"name": name}).mappings().first()
        return dict(row) if row is not None else None
