"""The fake's sweeper work (``SweeperLedger``), with ``SqlLedger``'s rules."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from coupon_devtools.fakes.ledger_state import FakePart, _settles_after_lease
from worker.adapters.postgres.records import DeadLetterRecord, DueEntity, Verification
from worker.domain.model import TERMINAL_STATES, Coupon, EntityState, EventState, check_transition


class FakeSweeping(FakePart):
    """The sweeper's part of ``InMemoryLedger``."""


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

    def fold_dead_letter_groups(self) -> int:
        # The fake keeps no summary: its groups, where asked for, are counted from entities.
        return 0
