"""The statements the services need, behind the ``Ledger`` protocol.

Concurrency is settled here by PostgreSQL row locks: a claim is an ``UPDATE`` of rows picked
with ``FOR UPDATE SKIP LOCKED`` from the states that may be claimed, so two workers holding the
same event never both get an entity, and neither waits for the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from psycopg.types.json import Jsonb
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Engine,
    Float,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from worker.adapters.postgres import hot_path
from worker.adapters.postgres import models as m
from worker.adapters.postgres.driver import run_alone
from worker.adapters.postgres.records import (
    CLOSED_CIRCUIT,
    CircuitState,
    Claim,
    ClaimedEntity,
    DeadLetterRecord,
    DueEntity,
    RecordedCall,
    Transition,
    Verification,
)
from worker.adapters.postgres.support import (
    RejectedRow,
    Selection,
    SupportLedger,
    SupportRepository,
    Target,
)
from worker.domain.errors import EventRejected
from worker.domain.events import LoyaltyEvent
from worker.domain.model import (
    CLAIMABLE_FOR_RETRY,
    CLAIMABLE_FRESH,
    CLAIMABLE_WHEN_DUE,
    ISSUED_STATES,
    TERMINAL_STATES,
    Coupon,
    DeadMessageKind,
    EntityState,
    EventState,
    issue_ref,
)


def _values(states: frozenset[EntityState]) -> tuple[str, ...]:
    return tuple(sorted(s.value for s in states))


# The state machine's sets (worker.domain.model), as the column stores them.
_CLAIMABLE_FRESH = _values(CLAIMABLE_FRESH)
_CLAIMABLE_AT_ONCE = _values(CLAIMABLE_FOR_RETRY - CLAIMABLE_WHEN_DUE)
_CLAIMABLE_WHEN_DUE = _values(CLAIMABLE_WHEN_DUE)


def fingerprint(event: LoyaltyEvent) -> str:
    """What makes two deliveries "the same event": everything but the delivery details."""
    canonical = {
        "customer": event.customer.as_api(),
        "seriesIds": sorted(event.seriesIds),
        "metadata": event.metadata.model_dump(exclude_none=True),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def id_reused(event: LoyaltyEvent) -> EventRejected:
    """The refusal of an event whose id was already taken by one with another fingerprint."""
    return EventRejected(
        f"eventId {event.eventId!r} was already used for a different event (customer, series "
        "or metadata differ); idempotency keys must be unique", event_id=event.eventId)


class Ledger(SupportLedger, Protocol):
    """The ledger operations of the services; ``SqlLedger`` and ``InMemoryLedger`` agree."""

    def ingest(self, event: LoyaltyEvent, *, source: str, now: datetime) -> bool: ...

    def take_in(self, event: LoyaltyEvent, *, source: str, token: str, worker: str,
                now: datetime, lease_s: float, settle_window_s: float) -> tuple[bool, Claim]:
        """``ingest`` then ``claim_event``, in one statement: (whether the event is new, the
        claim). Run first in its unit of work, it commits by itself (see ``hot_path``)."""
        ...

    def claim_event(self, event_id: str, *, token: str, worker: str, now: datetime,
                    lease_s: float, settle_window_s: float) -> Claim: ...

    def claim_entity(self, entity_id: int, *, token: str, worker: str, now: datetime,
                     lease_s: float, settle_window_s: float) -> Claim | None: ...

    def record(self, claim: Claim, *, calls: Sequence[RecordedCall],
               transitions: Sequence[Transition], worker: str, now: datetime) -> int:
        """Store an attempt's calls and outcomes; returns how many claims were lost. One
        statement: run first in its unit of work, it commits by itself (see ``hot_path``)."""
        ...

    def record_rejection(self, *, raw: bytes, reason: str, source: str,
                         event_id: str | None, content_type: str | None,
                         now: datetime, kind: str = DeadMessageKind.INVALID) -> int:
        """Keep a message as received, with why (``kind``: see ``DeadMessageKind``)."""
        ...

    def renew_leases(self, tokens: Sequence[str], entity_ids: Sequence[int], *, lease_s: float,
                     now: datetime) -> set[str]:
        """Extend to ``lease_s`` from now the leases of ``entity_ids`` still held under one of
        ``tokens`` and not yet run out; the tokens still held. A lease that ran out is never
        revived: the sweeper may be taking its entities back."""
        ...

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime) -> int:
        """One more failure of the message ``key`` for a reason not its own; the count so
        far, this one included."""
        ...

    def forget_message_failure(self, key: str) -> None:
        """Drop the count of ``key`` (its message was dead-lettered)."""
        ...

    def expire_leases(self, *, now: datetime, retry_at: datetime, limit: int,
                      settle_window_s: float) -> list[int]: ...

    def take_verifications(self, *, now: datetime, limit: int,
                           hold_s: float) -> list[Verification]: ...

    def finish_verification(self, item: Verification, *, now: datetime,
                            duplicates: Sequence[Coupon] = (), request_id: str | None = None,
                            retry_in_s: float | None = None, message: str | None = None,
                            ) -> None: ...

    def repair_event_states(self, *, now: datetime, limit: int) -> list[str]:
        """Recompute events left "processing" with every entity at rest, among at most
        ``limit`` of the events processing (a different share each time)."""
        ...

    def take_due(self, *, now: datetime, limit: int) -> list[DueEntity]: ...

    def mark_queued(self, entity_ids: Sequence[int], *, now: datetime) -> None: ...

    def requeue_stale(self, *, queued_before: datetime, now: datetime, limit: int) -> int: ...

    def unpublished_dead_letters(self, *, limit: int) -> list[DeadLetterRecord]: ...

    def mark_dead_letters_published(self, records: Sequence[DeadLetterRecord], *,
                                    now: datetime) -> None: ...

    def circuit(self, name: str) -> CircuitState: ...

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None: ...

    def count_failure(self, name: str, *, now: datetime) -> CircuitState: ...

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool: ...


# -- the hot path's statements, built once ----------------------------------------------------
# Building a statement costs more CPU than running it through the driver, and an event runs a
# dozen of them, so those on the path of every event are built here once and executed on the
# session's connection with bound parameters (names prefixed ``b_`` so they never clash with
# column names).

EVENTS = cast(Table, m.Event.__table__)
ENTITIES = cast(Table, m.Entity.__table__)
HISTORY = cast(Table, m.EntityHistory.__table__)
CALLS = cast(Table, m.ApiCall.__table__)
COUPONS = cast(Table, m.IssuedCoupon.__table__)
_E = ENTITIES.c
_IN_FLIGHT = EntityState.IN_FLIGHT.value
# Plain ``issued`` first: verification moves ``_ISSUED_STATES[0]`` only.
_ISSUED_STATES = (EntityState.ISSUED.value,
                  *_values(ISSUED_STATES - {EntityState.ISSUED}))

_INSERT_EVENT = (
    pg_insert(EVENTS).on_conflict_do_nothing(index_elements=["event_id"])
    .returning(EVENTS.c.event_id)
)
_EVENT_FINGERPRINT = select(EVENTS.c.fingerprint).where(
    EVENTS.c.event_id == bindparam("b_event_id"))
_INSERT_ENTITIES = insert(ENTITIES)
_INSERT_HISTORY = insert(HISTORY)
_INSERT_COUPONS = pg_insert(COUPONS).on_conflict_do_nothing(
    index_elements=["entity_id", "code"])
_CLAIM_DATA = select(
    EVENTS.c.customer, EVENTS.c.customer_key, EVENTS.c.metadata, EVENTS.c.issue_ref
).where(EVENTS.c.event_id == bindparam("b_event_id"))
_STATE_COUNTS = (
    select(_E.state, func.count()).where(_E.event_id == bindparam("b_event_id"))
    .group_by(_E.state)
)


def _number(name: str) -> Any:
    # Typed in the SQL itself: PostgreSQL cannot infer a parameter's type from "$1 IS NULL".
    return sql_cast(bindparam(name, type_=Float), Float)


def _seconds(name: str) -> Any:
    """A bound number of seconds as an interval, for arithmetic on the database's clock."""
    return _number(name) * literal_column("interval '1 second'")


# Leases, settle times and verification times are read and written on the database's clock
# (now()), never a host's: two hosts whose clocks disagree must still agree on whether a
# claim is alive, or both would call Capillary for one entity.
_DB_NOW = func.now()
_ABANDONED = and_(_E.state == _IN_FLIGHT, _E.lease_until < _DB_NOW)
# A dead worker's call was sent before its lease ran out and may land until the window after.
_SETTLES_AFTER_LEASE = func.greatest(
    func.coalesce(_E.settles_at, _E.lease_until), _E.lease_until + _seconds("b_settle_s"))


def _claim_statement(claimable: ColumnElement[bool], *, skip_locked: bool) -> Any:
    now = bindparam("b_now", type_=DateTime(timezone=True))
    pick = select(_E.id).where(claimable).with_for_update(skip_locked=skip_locked)
    return (
        update(ENTITIES)
        .where(_E.id.in_(pick.scalar_subquery()))
        .values(
            # A lease that ran out means a worker died mid-call: the call may have issued.
            needs_reconcile=or_(_E.needs_reconcile, _E.state == _IN_FLIGHT),
            settles_at=case((_E.state == _IN_FLIGHT, _SETTLES_AFTER_LEASE),
                            else_=_E.settles_at),
            state=_IN_FLIGHT,
            attempts=_E.attempts + 1,
            claim_token=bindparam("b_token", type_=Text),
            claimed_by=bindparam("b_worker", type_=Text),
            lease_until=_DB_NOW + _seconds("b_lease_s"),
            queued_at=None,
            first_attempt_at=func.coalesce(_E.first_attempt_at, now),
            updated_at=now,
        )
        .returning(_E.id, _E.series_id, _E.attempts, _E.needs_reconcile, _E.first_attempt_at,
                   _E.event_id, func.coalesce(_E.settles_at <= _DB_NOW, True),
                   func.coalesce(func.extract("epoch", _E.settles_at - _DB_NOW), 0.0))
    )


_NOW = bindparam("b_now", type_=DateTime(timezone=True))


def _claim_statements() -> tuple[Any, Any]:
    """The claim of an event's entities and of one entity (rebuilt by ``make mutation``)."""
    claim_event = _claim_statement(
        and_(
            _E.event_id == bindparam("b_event_id"),
            or_(_E.state.in_(_CLAIMABLE_FRESH), _ABANDONED),
        ),
        skip_locked=True,
    )
    # A retry waits for a lock rather than skipping: the holder is a short transaction (the
    # sweeper queueing this very entity, an operator's replay) and skipping would drop it.
    claim_entity = _claim_statement(
        and_(
            _E.id == bindparam("b_entity_id"),
            or_(
                _E.state.in_(_CLAIMABLE_AT_ONCE),
                and_(_E.state.in_(_CLAIMABLE_WHEN_DUE), _E.next_attempt_at <= _NOW),
                _ABANDONED,
            ),
        ),
        skip_locked=False,
    )
    return claim_event, claim_entity


_CLAIM_EVENT, _CLAIM_ENTITY = _claim_statements()


_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_EVENT_IDS: Any = bindparam("b_event_ids", expanding=True)
# Lock first, in a statement of its own: two transactions finishing different entities of one
# event would otherwise each read the other's entity as unfinished (READ COMMITTED snapshots
# are taken per statement) and both leave the event "processing".
_LOCK_EVENTS = (
    select(EVENTS.c.event_id).where(EVENTS.c.event_id.in_(_EVENT_IDS))
    .order_by(EVENTS.c.event_id).with_for_update()
)
_REFRESH_EVENTS = (
    update(EVENTS)
    .where(EVENTS.c.event_id.in_(_EVENT_IDS))
    .values(
        state=select(
            case(
                (func.bool_or(_E.state.not_in(_TERMINAL)), EventState.PROCESSING.value),
                (func.bool_or(_E.state == EntityState.DEAD.value), EventState.FAILED.value),
                else_=EventState.COMPLETED.value,
            )
        ).where(_E.event_id == EVENTS.c.event_id).scalar_subquery(),
        updated_at=_NOW,
    )
)


def _coupon_row(c: Coupon, entity_id: int, event_id: str, customer_key: str, via: str,
                request_id: str | None, now: datetime) -> dict[str, Any]:
    return {
        "entity_id": entity_id, "event_id": event_id, "series_id": c.series_id,
        "code": c.code, "customer_key": customer_key, "capillary_coupon_id": c.capillary_id,
        "description": c.description, "discount_code": c.discount_code,
        "discount_type": c.discount_type, "discount_value": c.discount_value,
        "discount_upto": c.discount_upto, "discount_on": c.discount_on,
        "valid_till": c.valid_till, "valid_till_date_time": c.valid_till_date_time,
        "raw": c.raw, "recorded_via": via, "request_id": request_id, "issued_at": now,
        "warnings": list(c.warnings) if c.warnings else None,
    }


class Sessions(Protocol):
    """Where a ``SqlLedger`` gets its session, and its engine for the statements run alone."""

    @property
    def engine(self) -> Engine: ...

    @property
    def session(self) -> Session: ...

    def in_transaction(self) -> bool: ...


class SqlLedger:
    """The ``Ledger`` on PostgreSQL, inside the unit of work's session."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    @property
    def session(self) -> Session:
        return self._sessions.session

    @property
    def _support(self) -> SupportRepository:
        return SupportRepository(self.session)

    @property
    def _conn(self) -> Any:
        return self.session.connection()

    # -- operator actions (SupportLedger), in ``worker.adapters.postgres.support``
    # ---------------------

    def support_targets(self, selection: Selection) -> list[Target]:
        return self._support.select(selection)

    def lock_target(self, entity_id: int) -> Target | None:
        return self._support.lock(entity_id)

    def requeue_target(self, target: Target, *, now: datetime, reset_attempts: bool) -> None:
        self._support.requeue(target, now=now, reset_attempts=reset_attempts)

    def discard_target(self, target: Target, *, now: datetime) -> None:
        self._support.discard(target, now=now)

    def operator_history(self, target: Target, *, kind: str, state: str, message: str,
                         operator: str, now: datetime) -> None:
        self._support.history(target, kind=kind, state=state, message=message,
                              operator=operator, now=now)

    def resume_deferred(self, error_code: str, *, now: datetime) -> int:
        return self._support.resume_deferred(error_code, now=now)

    def audit(self, *, action: str, operator: str, reason: str, outcome: str, now: datetime,
              entity_id: int | None = None, event_id: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        self._support.audit(action=action, operator=operator, reason=reason, outcome=outcome,
                            now=now, entity_id=entity_id, event_id=event_id, details=details)

    def lock_rejected(self, rejected_id: int) -> RejectedRow | None:
        return self._support.lock_rejected(rejected_id)

    def link_resubmission(self, rejected_id: int, *, event_id: str, now: datetime) -> None:
        self._support.link_resubmission(rejected_id, event_id=event_id, now=now)

    def event_fingerprint(self, event_id: str) -> tuple[str, str] | None:
        return self._support.event_fingerprint(event_id)

    # -- intake ----------------------------------------------------------------------------

    def ingest(self, event: LoyaltyEvent, *, source: str, now: datetime) -> bool:
        """Store the event and its entities once; a second delivery changes nothing.

        Raises EventRejected when the id was already used for different content: an
        idempotency key that names two different requests is a producer bug to surface.
        """
        conn = self._conn
        event_fingerprint = fingerprint(event)
        inserted = conn.execute(_INSERT_EVENT, {
            "event_id": event.eventId,
            "event_type": event.eventType,
            "customer_key": event.customer.key,
            "customer": event.customer.as_api(),
            "series_ids": list(event.seriesIds),
            "metadata": event.metadata.model_dump(exclude_none=True),
            "payload": event.to_message(),
            "fingerprint": event_fingerprint,
            "issue_ref": issue_ref(event.eventId),
            "source": source,
            "occurred_at": event.occurredAt,
            "received_at": now,
            "updated_at": now,
        }).first()
        if inserted is None:
            existing = conn.execute(_EVENT_FINGERPRINT, {"b_event_id": event.eventId}).scalar()
            if existing != event_fingerprint:
                raise id_reused(event)
            return False
        conn.execute(_INSERT_ENTITIES, [
            {"event_id": event.eventId, "series_id": series_id,
             "customer_key": event.customer.key, "created_at": now, "updated_at": now}
            for series_id in event.seriesIds
        ])
        return True

    # -- claims ----------------------------------------------------------------------------

    def _claim(self, statement: Any, params: dict[str, Any], *, token: str, worker: str,
               now: datetime, lease_s: float, settle_window_s: float,
               ) -> tuple[list[ClaimedEntity], str | None]:
        conn = self._conn
        rows = conn.execute(statement, {**params, "b_token": token, "b_worker": worker,
                                        "b_now": now, "b_lease_s": lease_s,
                                        "b_settle_s": settle_window_s}).all()
        claimed = sorted(
            (ClaimedEntity(r[0], r[1], r[2], r[3], r[4] or now, bool(r[6]),
                           max(float(r[7]), 0.0)) for r in rows),
            key=lambda c: c.series_id)
        if claimed:
            conn.execute(_INSERT_HISTORY, [
                {"entity_id": c.entity_id, "at": now, "kind": "claimed", "state": _IN_FLIGHT,
                 "attempt": c.attempts, "worker": worker, "error_code": None,
                 "request_id": None, "message": "reconcile first" if c.needs_reconcile else None}
                for c in claimed
            ])
        return claimed, (rows[0][5] if rows else None)

    def claim_event(self, event_id: str, *, token: str, worker: str, now: datetime,
                    lease_s: float, settle_window_s: float) -> Claim:
        """Claim the event's entities that were never tried or whose worker died."""
        claimed, _ = self._claim(_CLAIM_EVENT, {"b_event_id": event_id}, token=token,
                                 worker=worker, now=now, lease_s=lease_s,
                                 settle_window_s=settle_window_s)
        skipped: dict[str, int] = {}
        if not claimed:
            skipped = {
                state: int(count)
                for state, count in self._conn.execute(_STATE_COUNTS, {"b_event_id": event_id})
            }
        return self._claim_for(event_id, token, claimed, skipped)

    def claim_entity(self, entity_id: int, *, token: str, worker: str, now: datetime,
                     lease_s: float, settle_window_s: float) -> Claim | None:
        """Claim one entity for its retry: queued, due, or abandoned by a dead worker."""
        claimed, event_id = self._claim(_CLAIM_ENTITY, {"b_entity_id": entity_id}, token=token,
                                        worker=worker, now=now, lease_s=lease_s,
                                        settle_window_s=settle_window_s)
        if not claimed or event_id is None:
            return None
        return self._claim_for(event_id, token, claimed, {})

    def take_in(self, event: LoyaltyEvent, *, source: str, token: str, worker: str,
                now: datetime, lease_s: float, settle_window_s: float) -> tuple[bool, Claim]:
        """Store the event once and claim what it still needs, in one statement.

        Raises EventRejected when the id was already used for different content (nothing is
        claimed then).
        """
        event_fingerprint = fingerprint(event)
        params = {
            "event_id": event.eventId, "event_type": event.eventType,
            "customer_key": event.customer.key, "customer": Jsonb(event.customer.as_api()),
            "series_ids": list(event.seriesIds),
            "metadata": Jsonb(event.metadata.model_dump(exclude_none=True)),
            "payload": Jsonb(event.to_message()), "fingerprint": event_fingerprint,
            "issue_ref": issue_ref(event.eventId), "source": source,
            "occurred_at": event.occurredAt, "now": now, "token": token, "worker": worker,
            "lease_s": float(lease_s), "settle_s": float(settle_window_s),
        }
        rows = self._alone(hot_path.TAKE_IN, params)
        if not rows[0][0] and rows[0][1] is None:
            # Inserted by another delivery while this statement ran, so not in its snapshot:
            # a second statement sees it.
            rows = self._alone(hot_path.TAKE_IN, params)
        new, existing, customer, customer_key, metadata, ref, skipped = rows[0][:7]
        if not new and existing != event_fingerprint:
            raise id_reused(event)
        claimed = tuple(
            ClaimedEntity(r[7], r[8], r[9], bool(r[10]), r[11] or now, bool(r[12]),
                          max(float(r[13]), 0.0))
            for r in rows if r[7] is not None
        )
        counts = {str(k): int(v) for k, v in (skipped or {}).items()}
        if not new and not claimed and not counts:
            # A pruned event keeps its row but not its entities (docs/retention.md).
            counts = {"pruned": len(event.seriesIds)}
        return bool(new), Claim(
            event_id=event.eventId, customer=customer, customer_key=customer_key,
            metadata=metadata, issue_ref=ref, token=token, entities=claimed, skipped=counts,
        )

    def _claim_for(self, event_id: str, token: str, claimed: list[ClaimedEntity],
                   skipped: dict[str, int]) -> Claim:
        row = self._conn.execute(_CLAIM_DATA, {"b_event_id": event_id}).one()
        return Claim(
            event_id=event_id, customer=row[0], customer_key=row[1], metadata=row[2],
            issue_ref=row[3], token=token, entities=tuple(claimed), skipped=skipped,
        )

    # -- outcomes --------------------------------------------------------------------------

    def record(self, claim: Claim, *, calls: Sequence[RecordedCall],
               transitions: Sequence[Transition], worker: str, now: datetime) -> int:
        """Store the calls and the entities' new states; returns how many claims were lost.

        An issued coupon is recorded even if the claim was lost (the coupon exists whatever
        the ledger thought); any other outcome needs the claim to still be ours. One
        statement (``hot_path.RECORD``): the calls, the entities, their history, the coupons
        and the event's summary state.
        """
        lost = self._alone(hot_path.RECORD, {
            "event_id": claim.event_id, "customer_key": claim.customer_key,
            "token": claim.token, "worker": worker, "now": now,
            "transitions": hot_path.as_json(hot_path.transition_rows(transitions)),
            "coupons": hot_path.as_json(hot_path.coupon_rows(transitions)),
            "calls": hot_path.as_json(hot_path.call_rows(calls)),
        })[0][0]
        return len(transitions) - int(lost)

    def _alone(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement; as a transaction of its own when nothing ran before it.

        A single statement is atomic, so running it in autocommit saves the BEGIN and the
        COMMIT round trips. Should the unit of work already hold a transaction (it ran other
        statements first), the statement joins it instead and commits with it.
        """
        if self._sessions.in_transaction():
            return list(self.session.connection().exec_driver_sql(sql, params).all())
        return run_alone(self._sessions.engine, sql, params)

    def refresh_event_states(self, event_ids: Iterable[str], *, now: datetime) -> None:
        """Recompute the summary state of events from their entities."""
        ids = sorted(set(event_ids))
        if ids:
            conn = self._conn
            conn.execute(_LOCK_EVENTS, {"b_event_ids": ids})
            conn.execute(_REFRESH_EVENTS, {"b_event_ids": ids, "b_now": now})

    def record_rejection(self, *, raw: bytes, reason: str, source: str,
                         event_id: str | None, content_type: str | None,
                         now: datetime, kind: str = DeadMessageKind.INVALID) -> int:
        """Keep a message as received, with why; returns its id."""
        new_id = self.session.scalar(
            insert(m.RejectedEvent)
            .values(received_at=now, source=source, event_id=event_id, reason=reason, raw=raw,
                    size_bytes=len(raw), content_type=content_type, kind=str(kind))
            .returning(m.RejectedEvent.id)
        )
        assert new_id is not None
        return int(new_id)

    def renew_leases(self, tokens: Sequence[str], entity_ids: Sequence[int], *, lease_s: float,
                     now: datetime) -> set[str]:
        if not entity_ids:
            return set()
        rows = self.session.execute(
            update(ENTITIES)
            .where(_E.id.in_(list(entity_ids)), _E.claim_token.in_(list(tokens)),
                   _E.state == _IN_FLIGHT, _E.lease_until > _DB_NOW)
            .values(lease_until=_DB_NOW + _seconds("b_lease_s"))
            .returning(_E.claim_token),
            {"b_lease_s": lease_s},
        ).all()
        return {r[0] for r in rows}

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime) -> int:
        f = m.MessageFailure
        new = pg_insert(f).values(key=key, kind=str(kind), failures=1, first_failed_at=now,
                                  last_failed_at=now, last_error=error)
        counted = self.session.scalar(new.on_conflict_do_update(
            index_elements=[f.key],
            set_={"failures": f.failures + 1, "kind": new.excluded.kind,
                  "last_failed_at": new.excluded.last_failed_at,
                  "last_error": new.excluded.last_error},
        ).returning(f.failures))
        assert counted is not None
        return int(counted)

    def forget_message_failure(self, key: str) -> None:
        self.session.execute(delete(m.MessageFailure).where(m.MessageFailure.key == key))

    # -- the sweeper's work ----------------------------------------------------------------

    def expire_leases(self, *, now: datetime, retry_at: datetime, limit: int,
                      settle_window_s: float) -> list[int]:
        """Entities whose worker died mid-call: schedule them, reconciling first."""
        pick = (
            select(_E.id).where(_ABANDONED)
            .limit(limit).with_for_update(skip_locked=True).scalar_subquery()
        )
        rows = self._conn.execute(
            update(ENTITIES).where(_E.id.in_(pick))
            .values(state=EntityState.RETRY_WAIT.value, needs_reconcile=True,
                    settles_at=_SETTLES_AFTER_LEASE,
                    next_attempt_at=retry_at, claim_token=None, lease_until=None,
                    claimed_by=None, updated_at=now)
            .returning(_E.id, _E.attempts),
            {"b_settle_s": settle_window_s},
        ).all()
        if rows:
            self.session.execute(
                insert(m.EntityHistory),
                [{"entity_id": r[0], "at": now, "kind": "lease_expired",
                  "state": EntityState.RETRY_WAIT.value, "attempt": r[1],
                  "message": "worker lost mid-call; outcome unknown, will reconcile"}
                 for r in rows],
            )
        return [r[0] for r in rows]

    def take_due(self, *, now: datetime, limit: int) -> list[DueEntity]:
        """Lock due retries (skipping rows another dispatcher holds) for dispatch."""
        e = m.Entity
        rows = self.session.execute(
            select(e.id, e.event_id, e.series_id, e.customer_key, e.attempts)
            .where(e.state == EntityState.RETRY_WAIT.value, e.next_attempt_at <= now)
            .order_by(e.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        return [DueEntity(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def mark_queued(self, entity_ids: Sequence[int], *, now: datetime) -> None:
        if not entity_ids:
            return
        e = m.Entity
        self.session.execute(
            update(e).where(e.id.in_(list(entity_ids)))
            .values(state=EntityState.QUEUED.value, queued_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )

    def requeue_stale(self, *, queued_before: datetime, now: datetime, limit: int) -> int:
        """Queued retries whose message never ran (lost, purged): due again now."""
        e = m.Entity
        pick = (
            select(e.id)
            .where(e.state == EntityState.QUEUED.value, e.queued_at < queued_before)
            .limit(limit).with_for_update(skip_locked=True).scalar_subquery()
        )
        result = self.session.execute(
            update(e).where(e.id.in_(pick))
            .values(state=EntityState.RETRY_WAIT.value, next_attempt_at=now, queued_at=None,
                    updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def unpublished_dead_letters(self, *, limit: int) -> list[DeadLetterRecord]:
        e = m.Entity
        rows = self.session.execute(
            select(e.id, e.event_id, e.customer_key, e.series_id, e.last_error_code,
                   e.dead_reason, e.last_error_message, e.attempts, e.dead_at)
            .where(e.state == EntityState.DEAD.value, e.dead_published_at.is_(None))
            .order_by(e.id).limit(limit).with_for_update(skip_locked=True)
        ).all()
        records = [
            DeadLetterRecord("entity", r[0], r[1], r[2], r[3], r[4],
                             " - ".join(x for x in (r[5], r[6]) if x), r[7], r[8])
            for r in rows
        ]
        rejected = self.session.execute(
            select(m.RejectedEvent.id, m.RejectedEvent.event_id, m.RejectedEvent.reason,
                   m.RejectedEvent.received_at)
            .where(m.RejectedEvent.dead_published_at.is_(None))
            .order_by(m.RejectedEvent.id).limit(limit).with_for_update(skip_locked=True)
        ).all()
        records += [
            DeadLetterRecord("rejected_event", r[0], r[1], None, None, "rejected", r[2], 0, r[3])
            for r in rejected
        ]
        return records

    def mark_dead_letters_published(self, records: Sequence[DeadLetterRecord], *,
                                    now: datetime) -> None:
        entity_ids = [r.id for r in records if r.kind == "entity"]
        rejected_ids = [r.id for r in records if r.kind == "rejected_event"]
        if entity_ids:
            self.session.execute(
                update(m.Entity).where(m.Entity.id.in_(entity_ids))
                .values(dead_published_at=now)
                .execution_options(synchronize_session=False)
            )
        if rejected_ids:
            self.session.execute(
                update(m.RejectedEvent).where(m.RejectedEvent.id.in_(rejected_ids))
                .values(dead_published_at=now)
                .execution_options(synchronize_session=False)
            )

    def take_verifications(self, *, now: datetime, limit: int,
                           hold_s: float) -> list[Verification]:
        """Issued entities due for their late-original check, held for ``hold_s``.

        Holding moves ``verify_after`` on, so a sweeper that dies mid-check leaves the entity
        to be checked again later, and two sweepers never check one entity at once.
        """
        ev = EVENTS.c
        pick = (
            select(_E.id)
            .where(_E.verify_after <= _DB_NOW, _E.state == EntityState.ISSUED.value)
            .order_by(_E.verify_after).limit(limit).with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        held = self._conn.execute(
            update(ENTITIES).where(_E.id.in_(pick))
            .values(verify_after=_DB_NOW + _seconds("b_hold_s"))
            .returning(_E.id), {"b_hold_s": hold_s},
        ).scalars().all()
        if not held:
            return []
        rows = self._conn.execute(
            select(_E.id, _E.event_id, _E.series_id, ev.customer, _E.customer_key, ev.issue_ref,
                   _E.first_attempt_at, _E.attempts,
                   select(func.array_agg(COUPONS.c.code))
                   .where(COUPONS.c.entity_id == _E.id).scalar_subquery())
            .join(EVENTS, EVENTS.c.event_id == _E.event_id)
            .where(_E.id.in_(held)).order_by(_E.id)
        ).all()
        return [
            Verification(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or now, tuple(r[8] or ()),
                         r[7])
            for r in rows
        ]

    def finish_verification(self, item: Verification, *, now: datetime,
                            duplicates: Sequence[Coupon] = (), request_id: str | None = None,
                            retry_in_s: float | None = None, message: str | None = None,
                            ) -> None:
        """Record a late-original check: clean, a duplicate, or to be tried again."""
        conn = self._conn
        if retry_in_s is not None:
            conn.execute(
                update(ENTITIES).where(_E.id == item.entity_id, _E.state == _ISSUED_STATES[0])
                .values(verify_after=_DB_NOW + _seconds("b_in_s")), {"b_in_s": retry_in_s})
            return
        state = EntityState.DUPLICATE_ISSUED if duplicates else EntityState.ISSUED
        conn.execute(
            update(ENTITIES).where(_E.id == item.entity_id)
            .values(state=state.value, verify_after=None, updated_at=now,
                    last_error_code="duplicate_issued" if duplicates else _E.last_error_code,
                    last_error_message=message if duplicates else _E.last_error_message))
        conn.execute(_INSERT_HISTORY, [{
            "entity_id": item.entity_id, "at": now,
            "kind": "duplicate_issued" if duplicates else "verified", "state": state.value,
            "attempt": item.attempts, "error_code": "duplicate_issued" if duplicates else None,
            "message": message, "request_id": request_id, "worker": None}])
        if duplicates:
            conn.execute(_INSERT_COUPONS, [
                _coupon_row(c, item.entity_id, item.event_id, item.customer_key, "verify",
                            request_id, now)
                for c in duplicates
            ])
            self.refresh_event_states([item.event_id], now=now)

    def repair_event_states(self, *, now: datetime, limit: int) -> list[str]:
        """Events left "processing" although every entity is at rest: recompute them.

        Looks at ``limit`` of the events still processing, from a random one on (wrapping
        around), not at all of them: every sweep would otherwise read each event waiting for a
        retry, a cost that grows with the ledger. A stuck event is found within a few sweeps.
        """
        ev = EVENTS.c
        conn = self._conn
        processing = ev.state == EventState.PROCESSING.value
        # The event of a random entity: a start spread like the event ids themselves.
        start = conn.execute(
            select(_E.event_id)
            # As a bigint: compared with a float, the id could not use its index.
            .where(_E.id >= select(sql_cast(func.floor(func.random() * func.max(_E.id)),
                                            BigInteger)).scalar_subquery())
            .order_by(_E.id).limit(1)
        ).scalar()
        window = list(conn.execute(
            select(ev.event_id).where(processing, ev.event_id >= (start or ""))
            .order_by(ev.event_id).limit(limit)).scalars())
        if start is not None and len(window) < limit:
            window += conn.execute(
                select(ev.event_id).where(processing, ev.event_id < start)
                .order_by(ev.event_id).limit(limit - len(window))).scalars()
        if not window:
            return []
        # From the window's ids, not from events: only their entities are read.
        looked_at = func.unnest(sql_cast(bindparam("b_window"), ARRAY(Text))) \
            .table_valued("event_id").render_derived()
        at_rest = list(conn.execute(
            select(looked_at.c.event_id).where(
                ~select(_E.id).where(_E.event_id == looked_at.c.event_id,
                                     _E.state.not_in(_TERMINAL)).exists()),
            {"b_window": window}).scalars())
        if not at_rest:
            return []
        stuck = conn.execute(
            select(ev.event_id)
            .where(processing, ev.event_id.in_(at_rest),
                   ~select(_E.id).where(_E.event_id == ev.event_id,
                                        _E.state.not_in(_TERMINAL)).exists())
            .order_by(ev.event_id).with_for_update(skip_locked=True)
        ).scalars().all()
        self.refresh_event_states(stuck, now=now)
        return list(stuck)

    # -- circuit breaker -------------------------------------------------------------------

    def circuit(self, name: str) -> CircuitState:
        # Every pool process reads it once a second, between an event's claim and its call:
        # one statement alone, not BEGIN, SELECT and ROLLBACK through a session.
        rows = self._alone(hot_path.CIRCUIT_STATE, {"name": name})
        return CircuitState(*rows[0]) if rows else CLOSED_CIRCUIT

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None:
        values = {
            "state": state.state, "consecutive_failures": state.consecutive_failures,
            "times_opened": state.times_opened, "open_until": state.open_until,
            "reason": state.reason, "updated_at": now,
        }
        self.session.execute(
            pg_insert(m.CircuitBreaker).values(name=name, **values)
            .on_conflict_do_update(index_elements=["name"], set_=values)
        )

    def count_failure(self, name: str, *, now: datetime) -> CircuitState:
        """Add one consecutive failure, fleet-wide, and return the new state (row locked)."""
        cb = m.CircuitBreaker
        row = self.session.execute(
            pg_insert(cb).values(name=name, consecutive_failures=1, updated_at=now)
            .on_conflict_do_update(
                index_elements=["name"],
                set_={"consecutive_failures": cb.consecutive_failures + 1, "updated_at": now},
            )
            .returning(cb.state, cb.consecutive_failures, cb.times_opened, cb.open_until,
                       cb.reason)
        ).one()
        return CircuitState(*row)

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool:
        """Become the one worker that probes an open circuit whose pause is over."""
        cb = m.CircuitBreaker
        won = self.session.execute(
            update(cb)
            .where(cb.name == name, cb.state.in_(("open", "half_open")), cb.open_until <= now)
            .values(state="half_open", open_until=probe_until, updated_at=now)
            .returning(cb.name)
            .execution_options(synchronize_session=False)
        ).first()
        return won is not None

