"""The fake's hot path: an event taken in and claimed, an attempt's outcome recorded, a
rejected message kept, leases renewed, failed deliveries counted (``IssuingLedger``,
``RejectionLedger``, ``LeaseLedger``, ``DeliveryLedger``), with ``SqlLedger``'s rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta

from coupon_devtools.fakes.ledger_state import (
    _ISSUED_STATES,
    FakeEntity,
    FakePart,
    _pg_text,
    _settles_after_lease,
)
from worker.adapters.postgres.issuing import fingerprint, id_reused
from worker.adapters.postgres.records import Claim, ClaimedEntity, RecordedCall, Transition
from worker.domain.errors import LedgerError
from worker.domain.events import SERIES_ID_MAX, LoyaltyEvent
from worker.domain.model import (
    CLAIMABLE_FOR_RETRY,
    CLAIMABLE_FRESH,
    CLAIMABLE_WHEN_DUE,
    DEAD_MESSAGE_KINDS,
    DeadMessageKind,
    EntityState,
    EventState,
    check_transition,
    issue_ref,
)


class FakeIssuing(FakePart):
    """The hot path's part of ``InMemoryLedger``."""


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

    def claim_event(self, event_id: str, *, token: str, worker: str, now: datetime,
                    lease_s: float, settle_window_s: float) -> Claim:
        mine = [e for e in self.state.entities.values() if e.event_id == event_id]
        claimed = [
            self._take(e, token, now, lease_s, settle_window_s) for e in mine
            if e.state in CLAIMABLE_FRESH or self._abandoned(e, now)
        ]
        skipped = {} if claimed else dict(Counter(e.state.value for e in mine))
        return self._claim_for(event_id, token, claimed, skipped)

    def remember_trace(self, event_id: str, traceparent: str) -> None:
        self.state.events[event_id].setdefault("traceparent", traceparent)

    def event_trace(self, event_id: str) -> str | None:
        found: str | None = self.state.events.get(event_id, {}).get("traceparent")
        return found

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

    def count_message_failure(self, key: str, *, kind: str, error: str, now: datetime,
                              forget_before: datetime | None = None) -> int:
        _pg_text(key, kind, error)
        if forget_before is not None:
            for stale in [k for k, row in self.state.failures.items()
                          if row["last_failed_at"] < forget_before]:
                del self.state.failures[stale]
        row = self.state.failures.setdefault(
            key, {"failures": 0, "first_failed_at": now})
        row.update(failures=row["failures"] + 1, kind=kind, last_error=error,
                   last_failed_at=now)
        return int(row["failures"])

    def forget_message_failure(self, key: str) -> None:
        self.state.failures.pop(key, None)
