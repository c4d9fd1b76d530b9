"""The fake's operator actions (``SupportLedger``), with ``SqlLedger``'s rules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from coupon_devtools.fakes.ledger_state import FakeEntity, FakePart, _pg_text
from worker.adapters.postgres.support import RejectedRow, Selection, Target
from worker.domain.model import EntityState, check_transition


class FakeSupport(FakePart):
    """The support part of ``InMemoryLedger``."""


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
