"""The sweeper's statements: leases that ran out, due retries, queued retries that never ran,
late-original checks, event states left behind, dead letters to announce.

Every step locks its rows with ``SKIP LOCKED``, so every worker's sweeper may run at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import BigInteger, Text, bindparam, func, insert, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY

from worker.adapters.postgres import models as m
from worker.adapters.postgres.dead_letter_groups import fold
from worker.adapters.postgres.records import DeadLetterRecord, DueEntity, Verification
from worker.adapters.postgres.tables import (
    _ABANDONED,
    _DB_NOW,
    _E,
    _INSERT_COUPONS,
    _INSERT_HISTORY,
    _ISSUED_STATES,
    _SETTLES_AFTER_LEASE,
    _TERMINAL,
    COUPONS,
    ENTITIES,
    EVENTS,
    SessionBound,
    _coupon_row,
    _seconds,
)
from worker.domain.model import Coupon, EntityState, EventState


class SweeperLedger(Protocol):
    """What the sweeper's periodic work needs (``worker.usecases.sweep``)."""

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

    def fold_dead_letter_groups(self) -> int:
        """Fold the dead-letter groups' deltas into a row per group; how many were folded."""
        ...


class SweeperStatements(SessionBound):
    """``SweeperLedger`` on PostgreSQL."""

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
        return int(result.rowcount)

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
        retry, a cost that grows with the ledger. A stuck event is found, on average, within
        as many sweeps as there are events processing per ``limit``.
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

    def fold_dead_letter_groups(self) -> int:
        return fold(self.session)
