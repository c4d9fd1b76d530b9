"""The statements behind support engineers' commands: select, replay, discard, resubmit, audit.

Every state change an operator makes is written in the same transaction as its audit row in
``operator_actions``; that table is append-only (a trigger refuses UPDATE and DELETE).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, func, insert, select, update

from worker.adapters.postgres import models as m
from worker.domain.model import EntityState


@dataclass(frozen=True)
class Selection:
    """Which entities a support command is about; empty fields do not filter."""

    entity_ids: tuple[int, ...] = ()
    event_id: str | None = None
    error_code: str | None = None
    series_id: int | None = None
    customer: str | None = None
    #: The exact last error message (the console's dead-letter groups are code x series x it).
    error_message: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    states: tuple[str, ...] = (EntityState.DEAD.value,)

    def is_empty(self) -> bool:
        return not (self.entity_ids or self.event_id or self.error_code or self.series_id
                    or self.customer or self.error_message or self.since or self.until)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions of this selection."""
        e = m.Entity
        conditions: list[ColumnElement[bool]] = []
        if self.entity_ids:
            conditions.append(e.id.in_(self.entity_ids))
        if self.states:
            conditions.append(e.state.in_(self.states))
        if self.event_id:
            conditions.append(e.event_id == self.event_id)
        if self.error_code:
            conditions.append(e.last_error_code == self.error_code)
        if self.series_id:
            conditions.append(e.series_id == self.series_id)
        if self.error_message is not None:
            conditions.append(e.last_error_message == self.error_message)
        if self.customer:
            key = self.customer if ":" in self.customer else f"id:{self.customer}"
            conditions.append(e.customer_key == key)
        when = func.coalesce(e.dead_at, e.updated_at)
        if self.since:
            conditions.append(when >= self.since)
        if self.until:
            conditions.append(when < self.until)
        return conditions


@dataclass(frozen=True)
class Target:
    """An entity an operator acts on, as it stood when locked."""

    entity_id: int
    event_id: str
    series_id: int
    customer_key: str
    state: str
    attempts: int
    error_code: str | None
    needs_reconcile: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RejectedRow:
    """A rejected message as it stood when locked, with the bytes it was received as (a
    resubmission must keep what of them was valid)."""

    id: int
    source: str
    event_id: str | None
    reason: str
    received_at: datetime
    resubmitted_at: datetime | None
    resubmitted_event_id: str | None
    raw: bytes = b""


class SupportLedger(Protocol):
    """Operator actions, in the unit of work's transaction: part of the ``Ledger`` protocol."""

    def support_targets(self, selection: Selection) -> list[Target]:
        """The entities a selection names, by id."""
        ...

    def lock_target(self, entity_id: int) -> Target | None:
        """The entity as it stands now, locked until the transaction ends."""
        ...

    def requeue_target(self, target: Target, *, now: datetime, reset_attempts: bool) -> None:
        """Make a dead (or waiting) entity go again, through the retry queue."""
        ...

    def discard_target(self, target: Target, *, now: datetime) -> None: ...

    def make_due(self, target: Target, *, now: datetime) -> None:
        """A waiting entity's next attempt is now (the sweeper sends it within a sweep)."""
        ...

    def give_up(self, target: Target, *, reason: str, now: datetime) -> None:
        """A waiting entity becomes a dead letter, with ``reason`` as why."""
        ...

    def resume_deferred(self, error_code: str, *, now: datetime) -> int:
        """Entities waiting (``retry_wait``) because of ``error_code`` become due now; how
        many. For a pause lifted by hand: the circuit closed before its time."""
        ...

    def operator_history(self, target: Target, *, kind: str, state: str, message: str,
                         operator: str, now: datetime) -> None: ...

    def audit(self, *, action: str, operator: str, reason: str, outcome: str, now: datetime,
              entity_id: int | None = None, event_id: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        """One row of the append-only operator audit."""
        ...

    def lock_rejected(self, rejected_id: int) -> RejectedRow | None: ...

    def link_resubmission(self, rejected_id: int, *, event_id: str, now: datetime) -> None: ...


    def event_fingerprint(self, event_id: str) -> tuple[str, str] | None:
        """The fingerprint and state of an event already in the ledger, if it is."""
        ...

    def refresh_event_states(self, event_ids: Iterable[str], *, now: datetime) -> None:
        """Recompute the summary state of events from their entities."""
        ...


class SupportRepository:
    """Operator actions on the ledger, inside the caller's transaction."""

    def __init__(self, session: Connection) -> None:
        self.session = session

    def select(self, selection: Selection, *, limit: int | None = None,
               lock: bool = False) -> list[Target]:
        e = m.Entity
        query = (
            select(e.id, e.event_id, e.series_id, e.customer_key, e.state, e.attempts,
                   e.last_error_code, e.needs_reconcile)
            .where(*selection.conditions()).order_by(e.id)
        )
        if limit:
            query = query.limit(limit)
        if lock:
            query = query.with_for_update(skip_locked=True)
        return [Target(*row) for row in self.session.execute(query)]

    def lock(self, entity_id: int) -> Target | None:
        """The entity as it stands now, locked until the transaction ends."""
        e = m.Entity
        row = self.session.execute(
            select(e.id, e.event_id, e.series_id, e.customer_key, e.state, e.attempts,
                   e.last_error_code, e.needs_reconcile)
            .where(e.id == entity_id).with_for_update()
        ).first()
        return Target(*row) if row else None

    def requeue(self, target: Target, *, now: datetime, reset_attempts: bool) -> None:
        """Make a dead (or waiting) entity go again, through the retry queue."""
        e = m.Entity
        values: dict[str, Any] = {"state": EntityState.QUEUED.value, "queued_at": now,
                                  "next_attempt_at": None, "updated_at": now}
        if reset_attempts:
            values["attempts"] = 0
        self.session.execute(
            update(e).where(e.id == target.entity_id).values(**values)
            .execution_options(synchronize_session=False))

    def discard(self, target: Target, *, now: datetime) -> None:
        e = m.Entity
        self.session.execute(
            update(e).where(e.id == target.entity_id)
            .values(state=EntityState.DISCARDED.value, next_attempt_at=None, updated_at=now)
            .execution_options(synchronize_session=False))

    def make_due(self, target: Target, *, now: datetime) -> None:
        e = m.Entity
        self.session.execute(
            update(e).where(e.id == target.entity_id)
            .values(next_attempt_at=now, updated_at=now)
            .execution_options(synchronize_session=False))

    def give_up(self, target: Target, *, reason: str, now: datetime) -> None:
        # Not published yet: the sweeper announces it on the dead-letter queue like any other.
        e = m.Entity
        self.session.execute(
            update(e).where(e.id == target.entity_id)
            .values(state=EntityState.DEAD.value, next_attempt_at=None, dead_at=now,
                    dead_reason=reason, dead_published_at=None, updated_at=now)
            .execution_options(synchronize_session=False))

    def resume_deferred(self, error_code: str, *, now: datetime) -> int:
        e = m.Entity
        return len(self.session.execute(
            update(e).where(e.state == EntityState.RETRY_WAIT.value,
                            e.last_error_code == error_code, e.next_attempt_at > now)
            .values(next_attempt_at=now, updated_at=now).returning(e.id)
            .execution_options(synchronize_session=False)).all())

    def history(self, target: Target, *, kind: str, state: str, message: str,
                operator: str, now: datetime) -> None:
        self.session.execute(insert(m.EntityHistory).values(
            entity_id=target.entity_id, at=now, kind=kind, state=state,
            attempt=target.attempts, error_code=target.error_code, message=message,
            worker=f"operator:{operator}"))

    def audit(self, *, action: str, operator: str, reason: str, outcome: str, now: datetime,
              entity_id: int | None = None, event_id: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        self.session.execute(insert(m.OperatorAction).values(
            at=now, action=action, operator=operator, reason=reason, entity_id=entity_id,
            event_id=event_id, outcome=outcome, details=details or {}))

    def lock_rejected(self, rejected_id: int) -> RejectedRow | None:
        """A rejected message, locked so two resubmissions of it cannot both go."""
        r = m.RejectedEvent
        row = self.session.execute(
            select(r.id, r.source, r.event_id, r.reason, r.received_at, r.resubmitted_at,
                   r.resubmitted_event_id, r.raw)
            .where(r.id == rejected_id).with_for_update()
        ).first()
        return RejectedRow(*row[:7], raw=bytes(row[7] or b"")) if row else None

    def link_resubmission(self, rejected_id: int, *, event_id: str, now: datetime) -> None:
        """Mark a rejected message as resubmitted as ``event_id``; nothing else of it changes."""
        r = m.RejectedEvent
        self.session.execute(
            update(r).where(r.id == rejected_id)
            .values(resubmitted_at=now, resubmitted_event_id=event_id)
            .execution_options(synchronize_session=False))


    def event_fingerprint(self, event_id: str) -> tuple[str, str] | None:
        """The fingerprint and state of an event already in the ledger, if it is."""
        row = self.session.execute(
            select(m.Event.fingerprint, m.Event.state).where(m.Event.event_id == event_id)
        ).first()
        return (row[0], row[1]) if row else None

