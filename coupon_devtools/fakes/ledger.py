"""An in-memory ``Ledger`` and unit of work, for fast unit tests of the services.

It keeps the same rules as ``SqlLedger`` (what may be claimed, when a claim is lost, which
outcomes survive a lost claim), and ``tests/integration/test_ledger_contract.py`` runs the same
scenarios against both so they cannot drift apart.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

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
from worker.adapters.postgres.repository import Ledger, fingerprint, id_reused
from worker.adapters.postgres.support import RejectedRow, Selection, Target
from worker.domain.errors import LedgerError
from worker.domain.events import SERIES_ID_MAX, LoyaltyEvent
from worker.domain.model import (
    CLAIMABLE_FOR_RETRY,
    CLAIMABLE_FRESH,
    CLAIMABLE_WHEN_DUE,
    DEAD_MESSAGE_KINDS,
    ISSUED_STATES,
    TERMINAL_STATES,
    Coupon,
    DeadMessageKind,
    EntityState,
    EventState,
    check_transition,
    issue_ref,
)


@dataclass
class FakeEntity:
    id: int
    event_id: str
    series_id: int
    customer_key: str
    state: EntityState = EntityState.PENDING
    attempts: int = 0
    needs_reconcile: bool = False
    claim_token: str | None = None
    lease_until: datetime | None = None
    next_attempt_at: datetime | None = None
    queued_at: datetime | None = None
    first_attempt_at: datetime | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None
    last_verdict: str | None = None
    last_request_id: str | None = None
    dead_reason: str | None = None
    dead_at: datetime | None = None
    dead_published: bool = False
    settles_at: datetime | None = None
    verify_after: datetime | None = None
    history: list[str] = field(default_factory=list)


@dataclass
class FakeState:
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    entities: dict[int, FakeEntity] = field(default_factory=dict)
    coupons: dict[int, Any] = field(default_factory=dict)
    extra_coupons: dict[int, list[Coupon]] = field(default_factory=dict)
    calls: list[RecordedCall] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    circuits: dict[str, CircuitState] = field(default_factory=dict)
    ids: Any = field(default_factory=lambda: itertools.count(1))
    #: Operator actions, as ``operator_actions`` rows.
    audits: list[dict[str, Any]] = field(default_factory=list)
    #: ``message_failures`` rows, by key.
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeState:
        clone = FakeState(
            copy.deepcopy(self.events, memo), copy.deepcopy(self.entities, memo),
            dict(self.coupons), copy.deepcopy(self.extra_coupons, memo), list(self.calls),
            copy.deepcopy(self.rejections, memo), dict(self.circuits),
            audits=list(self.audits), failures=copy.deepcopy(self.failures, memo),
        )
        clone.ids = self.ids  # ids are never reused, even after a rollback
        return clone


_ISSUED_STATES = ISSUED_STATES


def _settles_after_lease(entity: FakeEntity, settle_window_s: float) -> datetime:
    assert entity.lease_until is not None
    after_lease = entity.lease_until + timedelta(seconds=settle_window_s)
    return max(entity.settles_at, after_lease) if entity.settles_at else after_lease


def _pg_text(*values: str | None) -> None:
    """Refuse what a PostgreSQL text column refuses, so unit tests meet the same wall."""
    for value in values:
        if value is None:
            continue
        if "\x00" in value:
            raise LedgerError("database error: PostgreSQL text fields cannot contain NUL "
                              "(0x00) bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LedgerError(f"database error: {exc}") from None


class InMemoryLedger:
    """The ``Ledger`` protocol over plain dicts."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def _claim_for(self, event_id: str, token: str, claimed: list[ClaimedEntity],
                   skipped: dict[str, int]) -> Claim:
        event = self.state.events[event_id]
        return Claim(event_id, event["customer"], event["customer_key"], event["metadata"],
                     event["issue_ref"], token, tuple(sorted(claimed, key=lambda c: c.series_id)),
                     skipped)

    def ingest(self, event: LoyaltyEvent, *, source: str, now: datetime) -> bool:
        _pg_text(event.eventId, event.eventType, event.customer.key, source,
                 *event.metadata.model_dump(exclude_none=True).values())
        if any(series_id > SERIES_ID_MAX for series_id in event.seriesIds):
            raise LedgerError("database error: integer out of range")
        existing = self.state.events.get(event.eventId)
        if existing is not None:
            if existing["fingerprint"] != fingerprint(event):
                raise id_reused(event)
            return False
        self.state.events[event.eventId] = {
            "customer": event.customer.as_api(), "customer_key": event.customer.key,
            "metadata": event.metadata.model_dump(exclude_none=True),
            "issue_ref": issue_ref(event.eventId), "fingerprint": fingerprint(event),
            "state": EventState.PROCESSING, "source": source,
        }
        for series_id in event.seriesIds:
            entity_id = next(self.state.ids)
            self.state.entities[entity_id] = FakeEntity(
                entity_id, event.eventId, series_id, event.customer.key)
        return True

    def take_in(self, event: LoyaltyEvent, *, source: str, token: str, worker: str,
                now: datetime, lease_s: float, settle_window_s: float) -> tuple[bool, Claim]:
        new = self.ingest(event, source=source, now=now)
        return new, self.claim_event(event.eventId, token=token, worker=worker, now=now,
                                     lease_s=lease_s, settle_window_s=settle_window_s)

    def _take(self, entity: FakeEntity, token: str, now: datetime,
              lease_s: float, settle_window_s: float) -> ClaimedEntity:
        abandoned = entity.state is EntityState.IN_FLIGHT
        entity.needs_reconcile = entity.needs_reconcile or abandoned
        if abandoned and entity.lease_until is not None:
            entity.settles_at = _settles_after_lease(entity, settle_window_s)
        lease_until = now + timedelta(seconds=lease_s)
        entity.state = check_transition(entity.state, EntityState.IN_FLIGHT)
        entity.attempts += 1
        entity.claim_token = token
        entity.lease_until = lease_until
        entity.queued_at = None
        entity.first_attempt_at = entity.first_attempt_at or now
        entity.history.append("claimed")
        settles_in_s = (entity.settles_at - now).total_seconds() if entity.settles_at else 0.0
        return ClaimedEntity(entity.id, entity.series_id, entity.attempts,
                             entity.needs_reconcile, entity.first_attempt_at,
                             settles_in_s <= 0, max(settles_in_s, 0.0))

    @staticmethod
    def _abandoned(entity: FakeEntity, now: datetime) -> bool:
        return entity.state is EntityState.IN_FLIGHT and entity.lease_until is not None \
            and entity.lease_until < now

    def claim_event(self, event_id: str, *, token: str, worker: str, now: datetime,
                    lease_s: float, settle_window_s: float) -> Claim:
        mine = [e for e in self.state.entities.values() if e.event_id == event_id]
        claimed = [
            self._take(e, token, now, lease_s, settle_window_s) for e in mine
            if e.state in CLAIMABLE_FRESH or self._abandoned(e, now)
        ]
        skipped = {} if claimed else dict(Counter(e.state.value for e in mine))
        return self._claim_for(event_id, token, claimed, skipped)

    def claim_entity(self, entity_id: int, *, token: str, worker: str, now: datetime,
                     lease_s: float, settle_window_s: float) -> Claim | None:
        e = self.state.entities.get(entity_id)
        if e is None:
            return None
        waited = e.state not in CLAIMABLE_WHEN_DUE or (
            e.next_attempt_at is not None and e.next_attempt_at <= now)
        due = (e.state in CLAIMABLE_FOR_RETRY and waited) or self._abandoned(e, now)
        if not due:
            return None
        return self._claim_for(
            e.event_id, token, [self._take(e, token, now, lease_s, settle_window_s)], {})

    def record(self, claim: Claim, *, calls: Sequence[RecordedCall],
               transitions: Sequence[Transition], worker: str, now: datetime) -> int:
        self.state.calls.extend(calls)
        lost = 0
        for t in transitions:
            e = self.state.entities[t.entity_id]
            issued = t.state in _ISSUED_STATES
            if not (e.claim_token == claim.token or (issued and e.state not in _ISSUED_STATES)):
                lost += 1
                continue
            if t.settle_window_s is not None:
                e.settles_at = now + timedelta(seconds=t.settle_window_s)
            if t.verify_window_s is not None:
                e.verify_after = now + timedelta(seconds=t.verify_window_s)
            elif t.state is EntityState.DUPLICATE_ISSUED:
                e.verify_after = None
            e.state = check_transition(e.state, t.state)
            e.claim_token = None
            e.lease_until = None
            e.needs_reconcile = t.needs_reconcile
            e.next_attempt_at = t.next_attempt_at
            e.last_verdict = t.verdict or e.last_verdict
            if not issued:
                e.last_error_code = t.error_code or e.last_error_code
                e.last_error_message = t.error_message or e.last_error_message
            e.last_request_id = t.request_id or e.last_request_id
            e.attempts -= 1 if t.refund_attempt else 0
            if t.state is EntityState.DEAD:
                e.dead_reason, e.dead_at, e.dead_published = t.dead_reason, now, False
            e.history.append(t.kind)
        for t in transitions:
            if t.coupon is not None:
                self.state.coupons.setdefault(t.entity_id, t.coupon)
            self.state.extra_coupons.setdefault(t.entity_id, []).extend(t.extra_coupons)
        self._refresh(claim.event_id)
        return lost

    def _refresh(self, event_id: str) -> None:
        states = [e.state for e in self.state.entities.values() if e.event_id == event_id]
        event = self.state.events[event_id]
        if any(s not in TERMINAL_STATES for s in states):
            event["state"] = EventState.PROCESSING
        elif EntityState.DEAD in states:
            event["state"] = EventState.FAILED
        else:
            event["state"] = EventState.COMPLETED

    def record_rejection(self, *, raw: bytes, reason: str, source: str,
                         event_id: str | None, content_type: str | None,
                         now: datetime, kind: str = DeadMessageKind.INVALID) -> int:
        _pg_text(reason, source, event_id, content_type)
        if kind not in DEAD_MESSAGE_KINDS:
            raise LedgerError(f"database error: no such kind of dead message: {kind!r}")
        self.state.rejections.append({"raw": raw, "reason": reason, "source": source,
                                      "event_id": event_id, "content_type": content_type,
                                      "published": False, "received_at": now,
                                      "resubmitted_at": None, "resubmitted_event_id": None,
                                      "kind": kind})
        return len(self.state.rejections)

    def renew_leases(self, tokens: Sequence[str], entity_ids: Sequence[int], *, lease_s: float,
                     now: datetime) -> set[str]:
        kept: set[str] = set()
        for entity_id in entity_ids:
            e = self.state.entities.get(entity_id)
            if e is None or e.claim_token is None or e.claim_token not in tokens \
                    or e.state is not EntityState.IN_FLIGHT or e.lease_until is None \
                    or e.lease_until <= now:
                continue
            e.lease_until = now + timedelta(seconds=lease_s)
            kept.add(e.claim_token)
        return kept

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime) -> int:
        _pg_text(key, kind, error)
        row = self.state.failures.setdefault(
            key, {"failures": 0, "first_failed_at": now})
        row.update(failures=row["failures"] + 1, kind=kind, last_error=error,
                   last_failed_at=now)
        return int(row["failures"])

    def forget_message_failure(self, key: str) -> None:
        self.state.failures.pop(key, None)

    # -- operator actions (SupportLedger) ---------------------------------------------------

    @staticmethod
    def _target(e: FakeEntity) -> Target:
        return Target(e.id, e.event_id, e.series_id, e.customer_key, e.state.value, e.attempts,
                      e.last_error_code, e.needs_reconcile)

    @staticmethod
    def _selected(e: FakeEntity, selection: Selection) -> bool:
        # As Selection.conditions() in SQL; the fake keeps no updated_at, so a time window
        # reads dead_at only.
        customer = selection.customer
        key = customer if customer is None or ":" in customer else f"id:{customer}"
        checks = (
            not selection.entity_ids or e.id in selection.entity_ids,
            not selection.states or e.state.value in selection.states,
            not selection.event_id or e.event_id == selection.event_id,
            not selection.error_code or e.last_error_code == selection.error_code,
            not selection.series_id or e.series_id == selection.series_id,
            not key or e.customer_key == key,
            not selection.since or (e.dead_at is not None and e.dead_at >= selection.since),
            not selection.until or (e.dead_at is not None and e.dead_at < selection.until),
        )
        return all(checks)

    def support_targets(self, selection: Selection) -> list[Target]:
        return [self._target(e) for _, e in sorted(self.state.entities.items())
                if self._selected(e, selection)]

    def lock_target(self, entity_id: int) -> Target | None:
        e = self.state.entities.get(entity_id)
        return self._target(e) if e is not None else None

    def requeue_target(self, target: Target, *, now: datetime, reset_attempts: bool) -> None:
        e = self.state.entities[target.entity_id]
        e.state = check_transition(e.state, EntityState.QUEUED)
        e.queued_at, e.next_attempt_at = now, None
        if reset_attempts:
            e.attempts = 0

    def discard_target(self, target: Target, *, now: datetime) -> None:
        e = self.state.entities[target.entity_id]
        e.state = check_transition(e.state, EntityState.DISCARDED)
        e.next_attempt_at = None

    def make_due(self, target: Target, *, now: datetime) -> None:
        self.state.entities[target.entity_id].next_attempt_at = now

    def give_up(self, target: Target, *, reason: str, now: datetime) -> None:
        e = self.state.entities[target.entity_id]
        e.state = check_transition(e.state, EntityState.DEAD)
        e.next_attempt_at, e.dead_at, e.dead_reason = None, now, reason
        e.dead_published = False

    def resume_deferred(self, error_code: str, *, now: datetime) -> int:
        resumed = 0
        for e in self.state.entities.values():
            if e.state is EntityState.RETRY_WAIT and e.last_error_code == error_code \
                    and e.next_attempt_at is not None and e.next_attempt_at > now:
                e.next_attempt_at = now
                resumed += 1
        return resumed

    def operator_history(self, target: Target, *, kind: str, state: str, message: str,
                         operator: str, now: datetime) -> None:
        _pg_text(message, operator)
        self.state.entities[target.entity_id].history.append(kind)

    def audit(self, *, action: str, operator: str, reason: str, outcome: str, now: datetime,
              entity_id: int | None = None, event_id: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        _pg_text(action, operator, reason, outcome, event_id)
        self.state.audits.append({
            "at": now, "action": action, "operator": operator, "reason": reason,
            "outcome": outcome, "entity_id": entity_id, "event_id": event_id,
            "details": details or {}})

    def lock_rejected(self, rejected_id: int) -> RejectedRow | None:
        if not 1 <= rejected_id <= len(self.state.rejections):
            return None
        r = self.state.rejections[rejected_id - 1]
        return RejectedRow(rejected_id, r["source"], r["event_id"], r["reason"],
                           r.get("received_at") or datetime.min, r.get("resubmitted_at"),
                           r.get("resubmitted_event_id"), raw=r["raw"])

    def link_resubmission(self, rejected_id: int, *, event_id: str, now: datetime) -> None:
        r = self.state.rejections[rejected_id - 1]
        r["resubmitted_at"], r["resubmitted_event_id"] = now, event_id


    def event_fingerprint(self, event_id: str) -> tuple[str, str] | None:
        event = self.state.events.get(event_id)
        return (event["fingerprint"], str(event["state"])) if event is not None else None

    def refresh_event_states(self, event_ids: Iterable[str], *, now: datetime) -> None:
        for event_id in sorted(set(event_ids)):
            self._refresh(event_id)

    # -- the sweeper's work ------------------------------------------------------------------

    def expire_leases(self, *, now: datetime, retry_at: datetime, limit: int,
                      settle_window_s: float) -> list[int]:
        expired = [e for e in self.state.entities.values() if self._abandoned(e, now)][:limit]
        for e in expired:
            e.settles_at = _settles_after_lease(e, settle_window_s)
            e.state = check_transition(e.state, EntityState.RETRY_WAIT)
            e.needs_reconcile, e.next_attempt_at = True, retry_at
            e.claim_token, e.lease_until = None, None
            e.history.append("lease_expired")
        return [e.id for e in expired]

    def take_due(self, *, now: datetime, limit: int) -> list[DueEntity]:
        due = sorted(
            (e for e in self.state.entities.values()
             if e.state is EntityState.RETRY_WAIT and e.next_attempt_at is not None
             and e.next_attempt_at <= now),
            key=lambda e: e.next_attempt_at or now,
        )[:limit]
        return [DueEntity(e.id, e.event_id, e.series_id, e.customer_key, e.attempts) for e in due]

    def mark_queued(self, entity_ids: Sequence[int], *, now: datetime) -> None:
        for entity_id in entity_ids:
            e = self.state.entities[entity_id]
            e.state, e.queued_at = check_transition(e.state, EntityState.QUEUED), now

    def requeue_stale(self, *, queued_before: datetime, now: datetime, limit: int) -> int:
        stale = [e for e in self.state.entities.values()
                 if e.state is EntityState.QUEUED and e.queued_at and e.queued_at < queued_before]
        for e in stale[:limit]:
            e.state = check_transition(e.state, EntityState.RETRY_WAIT)
            e.next_attempt_at, e.queued_at = now, None
        return len(stale[:limit])

    def unpublished_dead_letters(self, *, limit: int) -> list[DeadLetterRecord]:
        records = [
            DeadLetterRecord("entity", e.id, e.event_id, e.customer_key, e.series_id,
                             e.last_error_code, e.dead_reason, e.attempts, e.dead_at)
            for e in self.state.entities.values()
            if e.state is EntityState.DEAD and not e.dead_published
        ][:limit]
        records += [
            DeadLetterRecord("rejected_event", i + 1, r["event_id"], None, None, "rejected",
                             r["reason"], 0, None)
            for i, r in enumerate(self.state.rejections) if not r["published"]
        ][:limit]
        return records

    def mark_dead_letters_published(self, records: Sequence[DeadLetterRecord], *,
                                    now: datetime) -> None:
        for r in records:
            if r.kind == "entity":
                self.state.entities[r.id].dead_published = True
            else:
                self.state.rejections[r.id - 1]["published"] = True

    def take_verifications(self, *, now: datetime, limit: int,
                           hold_s: float) -> list[Verification]:
        due = sorted(
            (e for e in self.state.entities.values()
             if e.state is EntityState.ISSUED and e.verify_after is not None
             and e.verify_after <= now),
            key=lambda e: (e.verify_after, e.id))[:limit]
        items = []
        for e in due:
            e.verify_after = now + timedelta(seconds=hold_s)
            event = self.state.events[e.event_id]
            recorded = self.state.coupons.get(e.id)
            items.append(Verification(
                e.id, e.event_id, e.series_id, event["customer"], e.customer_key,
                event["issue_ref"], e.first_attempt_at or now,
                (recorded.code,) if recorded is not None else (), e.attempts))
        return items

    def finish_verification(self, item: Verification, *, now: datetime,
                            duplicates: Sequence[Coupon] = (), request_id: str | None = None,
                            retry_in_s: float | None = None, message: str | None = None,
                            ) -> None:
        e = self.state.entities[item.entity_id]
        if retry_in_s is not None:
            e.verify_after = now + timedelta(seconds=retry_in_s)
            return
        e.verify_after = None
        if duplicates:
            e.state = check_transition(e.state, EntityState.DUPLICATE_ISSUED)
            e.last_error_code, e.last_error_message = "duplicate_issued", message
            self.state.extra_coupons.setdefault(e.id, []).extend(duplicates)
            e.history.append("duplicate_issued")
            self._refresh(e.event_id)
        else:
            e.history.append("verified")

    def repair_event_states(self, *, now: datetime, limit: int) -> list[str]:
        stuck = sorted(
            event_id for event_id, event in self.state.events.items()
            if event["state"] == EventState.PROCESSING and all(
                e.state in TERMINAL_STATES for e in self.state.entities.values()
                if e.event_id == event_id))[:limit]
        for event_id in stuck:
            self._refresh(event_id)
        return stuck

    def circuit(self, name: str) -> CircuitState:
        return self.state.circuits.get(name, CLOSED_CIRCUIT)

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None:
        self.state.circuits[name] = state

    def count_failure(self, name: str, *, now: datetime) -> CircuitState:
        current = self.circuit(name)
        updated = replace(current, consecutive_failures=current.consecutive_failures + 1)
        self.state.circuits[name] = updated
        return updated

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool:
        current = self.circuit(name)
        if current.state in ("open", "half_open") and current.open_until is not None \
                and current.open_until <= now:
            self.state.circuits[name] = replace(current, state="half_open",
                                                open_until=probe_until)
            return True
        return False


class FakeUnitOfWork:
    """Rolls back (restores a snapshot) unless ``commit()`` was called."""

    def __init__(self, state: FakeState) -> None:
        self._state = state
        self.ledger = InMemoryLedger(state)
        self.commits = 0
        self._snapshot: FakeState | None = None

    def __enter__(self) -> Self:
        self._snapshot = copy.deepcopy(self._state)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._snapshot is not None:
            self.rollback()

    def commit(self) -> None:
        self._snapshot = None
        self.commits += 1

    def rollback(self) -> None:
        if self._snapshot is not None:
            snapshot = self._snapshot
            self._state.__dict__.update(snapshot.__dict__)
            self._snapshot = None


def _implements_the_protocol(state: FakeState) -> Ledger:
    """Never called: mypy checks here that the fake implements the whole ``Ledger``."""
    return InMemoryLedger(state)


def fake_unit_of_work_factory(state: FakeState | None = None) -> tuple[FakeState, Any]:
    """A shared state and a factory of units of work over it."""
    shared = state or FakeState()
    return shared, lambda: FakeUnitOfWork(shared)
