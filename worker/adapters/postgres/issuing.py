"""The hot path's statements: an event taken in and claimed, an attempt's outcome recorded, a
rejected message kept, leases renewed, failed deliveries counted.

Concurrency is settled here by PostgreSQL row locks: a claim is an ``UPDATE`` of rows picked
with ``FOR UPDATE SKIP LOCKED`` from the states that may be claimed, so two workers holding the
same event never both get an entity, and neither waits for the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from psycopg.types.json import Jsonb
from sqlalchemy import (
    ColumnElement,
    DateTime,
    Text,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from worker.adapters.postgres import hot_path
from worker.adapters.postgres import models as m
from worker.adapters.postgres.records import Claim, ClaimedEntity, RecordedCall, Transition
from worker.adapters.postgres.tables import (
    _ABANDONED,
    _DB_NOW,
    _E,
    _IN_FLIGHT,
    _INSERT_HISTORY,
    _NOW,
    _SETTLES_AFTER_LEASE,
    ENTITIES,
    EVENTS,
    SessionBound,
    _seconds,
    _values,
)
from worker.domain.errors import EventRejected
from worker.domain.events import LoyaltyEvent
from worker.domain.model import (
    CLAIMABLE_FOR_RETRY,
    CLAIMABLE_FRESH,
    CLAIMABLE_WHEN_DUE,
    DeadMessageKind,
    issue_ref,
)

# The state machine's sets (worker.domain.model), as the column stores them.
_CLAIMABLE_FRESH = _values(CLAIMABLE_FRESH)
_CLAIMABLE_AT_ONCE = _values(CLAIMABLE_FOR_RETRY - CLAIMABLE_WHEN_DUE)
_CLAIMABLE_WHEN_DUE = _values(CLAIMABLE_WHEN_DUE)


# json.dumps(canonical, sort_keys=True, separators=(",", ":")), its encoder built once.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def fingerprint(event: LoyaltyEvent) -> str:
    """What makes two deliveries "the same event": everything but the delivery details."""
    return _fingerprint(event.customer.as_api(), event.seriesIds,
                        event.metadata.model_dump(exclude_none=True))


def _fingerprint(customer: dict[str, str], series_ids: Sequence[int],
                 metadata: dict[str, Any]) -> str:
    canonical = {"customer": customer, "seriesIds": sorted(series_ids), "metadata": metadata}
    text = _CANONICAL.encode(canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def id_reused(event: LoyaltyEvent) -> EventRejected:
    """The refusal of an event whose id was already taken by one with another fingerprint."""
    return EventRejected(
        f"eventId {event.eventId!r} was already used for a different event (customer, series "
        "or metadata differ); idempotency keys must be unique", event_id=event.eventId)


class IssuingLedger(Protocol):
    """What issuing an event or retrying an entity needs (``worker.usecases.issue``)."""

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

    def remember_trace(self, event_id: str, traceparent: str) -> None:
        """Keep the trace of an event's first delivery (a W3C traceparent), once."""
        ...

    def event_trace(self, event_id: str) -> str | None:
        """The trace ``remember_trace`` kept for the event, if any."""
        ...

    def record(self, claim: Claim, *, calls: Sequence[RecordedCall],
               transitions: Sequence[Transition], worker: str, now: datetime) -> int:
        """Store an attempt's calls and outcomes; returns how many claims were lost. One
        statement: run first in its unit of work, it commits by itself (see ``hot_path``)."""
        ...


class RejectionLedger(Protocol):
    """Where a message that is not a valid event is kept (``worker.usecases.rejection``)."""

    def record_rejection(self, *, raw: bytes, reason: str, source: str,
                         event_id: str | None, content_type: str | None,
                         now: datetime, kind: str = DeadMessageKind.INVALID) -> int:
        """Keep a message as received, with why (``kind``: see ``DeadMessageKind``)."""
        ...


class LeaseLedger(Protocol):
    """The claims' renewal while their task runs (``worker.usecases.leases``)."""

    def renew_leases(self, tokens: Sequence[str], entity_ids: Sequence[int], *, lease_s: float,
                     now: datetime) -> set[str]:
        """Extend to ``lease_s`` from now the leases of ``entity_ids`` still held under one of
        ``tokens`` and not yet run out; the tokens still held. A lease that ran out is never
        revived: the sweeper may be taking its entities back."""
        ...


class DeliveryLedger(Protocol):
    """The count of a message's failures for a reason not its own (``worker.usecases.delivery``)."""

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime,
                              forget_before: datetime | None = None) -> int:
        """One more failure of the message ``key`` for a reason not its own; the count so
        far, this one included. Counts of messages (this one too) that last failed before
        ``forget_before`` are forgotten first."""
        ...

    def forget_message_failure(self, key: str) -> None:
        """Drop the count of ``key`` (its message was dead-lettered)."""
        ...


_INSERT_EVENT = (
    pg_insert(EVENTS).on_conflict_do_nothing(index_elements=["event_id"])
    .returning(EVENTS.c.event_id)
)
_EVENT_FINGERPRINT = select(EVENTS.c.fingerprint).where(
    EVENTS.c.event_id == bindparam("b_event_id"))
_INSERT_ENTITIES = insert(ENTITIES)
_CLAIM_DATA = select(
    EVENTS.c.customer, EVENTS.c.customer_key, EVENTS.c.metadata, EVENTS.c.issue_ref
).where(EVENTS.c.event_id == bindparam("b_event_id"))
_STATE_COUNTS = (
    select(_E.state, func.count()).where(_E.event_id == bindparam("b_event_id"))
    .group_by(_E.state)
)


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


class IssuingStatements(SessionBound):
    """``IssuingLedger``, ``RejectionLedger``, ``LeaseLedger`` and ``DeliveryLedger`` on
    PostgreSQL."""

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

    def remember_trace(self, event_id: str, traceparent: str) -> None:
        self.session.execute(update(m.Event).where(
            m.Event.event_id == event_id, m.Event.traceparent.is_(None))
            .values(traceparent=traceparent).execution_options(synchronize_session=False))

    def event_trace(self, event_id: str) -> str | None:
        return self.session.execute(select(m.Event.traceparent).where(
            m.Event.event_id == event_id)).scalar_one_or_none()

    def take_in(self, event: LoyaltyEvent, *, source: str, token: str, worker: str,
                now: datetime, lease_s: float, settle_window_s: float) -> tuple[bool, Claim]:
        """Store the event once and claim what it still needs, in one statement.

        Raises EventRejected when the id was already used for different content (nothing is
        claimed then).
        """
        # Dumped once, for the fingerprint and the row alike.
        customer = event.customer.as_api()
        metadata = event.metadata.model_dump(exclude_none=True)
        event_fingerprint = _fingerprint(customer, event.seriesIds, metadata)
        params = {
            "event_id": event.eventId, "event_type": event.eventType,
            "customer_key": event.customer.key, "customer": Jsonb(customer),
            "series_ids": list(event.seriesIds), "metadata": Jsonb(metadata),
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

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime,
                              forget_before: datetime | None = None) -> int:
        f = m.MessageFailure
        if forget_before is not None:
            # On the failure path only: the happy path never pays for the clean-up.
            self.session.execute(delete(f).where(f.last_failed_at < forget_before))
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
