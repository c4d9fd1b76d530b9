"""One attempt at a claim, and how its outcome is committed.

An ``Attempt`` gathers the calls made and each entity's decided transition; ``commit`` records
them (the calls, the entities' new states, the coupons) before the next call is sent or the
message is acknowledged, logging and counting each transition. An outcome the ledger refuses is
recorded entity by entity, and an entity whose own outcome is refused is dead-lettered
(``policy.unrecordable``) rather than left in flight.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta

from worker import tracing
from worker.adapters.postgres.records import Claim, ClaimedEntity, RecordedCall, Transition
from worker.domain.errors import LedgerError, LedgerUnavailable
from worker.domain.model import Coupon, EntityState, Verdict
from worker.domain.policy import (
    DeadLetter,
    Decision,
    Defer,
    RecordDuplicate,
    RecordIssued,
    ScheduleRetry,
    rate_limit_slot,
    unrecordable,
)
from worker.domain.text import mask_code, printable
from worker.metrics import Metrics
from worker.usecases.deps import Deps, Report
from worker.usecases.leases import HeldClaim

log = logging.getLogger("worker.pipeline")

@dataclass
class Attempt:
    claim: Claim
    deps: Deps
    held: HeldClaim
    transitions: list[Transition] = field(default_factory=list)
    calls: list[RecordedCall] = field(default_factory=list)
    reconciled: int = 0
    #: What earlier calls of this attempt already committed, and the claims found lost.
    committed: list[Transition] = field(default_factory=list)
    lost: int = 0

    def add(self, entity: ClaimedEntity, decision: Decision, *, verdict: Verdict,
            error_code: str | None = None, message: str | None = None,
            request_id: str | None = None, coupon: Coupon | None = None,
            reconciled: bool = False, extra_coupons: tuple[Coupon, ...] = ()) -> None:
        now = self.deps.clock()
        window_s = self.deps.retry_policy.settle_window_s
        # A call whose outcome is unknown starts a settle window; a failed read-back does not
        # (no call was sent, the earlier window stands).
        unknown_call = verdict is Verdict.AMBIGUOUS and error_code != "reconcile_failed"
        settle_s = window_s if unknown_call else None
        base = Transition(
            entity_id=entity.entity_id, state=EntityState.RETRY_WAIT, kind="",
            attempt=entity.attempts, verdict=verdict.value, error_code=error_code,
            error_message=message, request_id=request_id,
        )
        if isinstance(decision, RecordIssued):
            transition = replace(
                base, state=EntityState.ISSUED, kind="reconciled" if reconciled else "issued",
                coupon=coupon, recorded_via="reconcile" if reconciled else "issue",
                # A re-send after an unknown outcome: the original may still land late.
                verify_window_s=window_s if entity.needs_reconcile and not reconciled
                else None,
            )
        elif isinstance(decision, RecordDuplicate):
            transition = replace(
                base, state=EntityState.DUPLICATE_ISSUED, kind="duplicate_issued",
                coupon=coupon, extra_coupons=extra_coupons, recorded_via="reconcile",
                error_code="duplicate_issued",
                error_message=f"{1 + len(extra_coupons)} coupons of ours for one entity",
            )
        elif isinstance(decision, ScheduleRetry):
            transition = replace(
                base, kind="retry_scheduled", next_attempt_at=now + decision.delay,
                needs_reconcile=decision.reconcile_first,
                settle_window_s=settle_s,
            )
        elif isinstance(decision, DeadLetter):
            reason = f"{decision.reason}: {message}" if message else decision.reason
            transition = replace(
                base, state=EntityState.DEAD, kind="dead", dead_reason=reason,
                error_code=decision.code or error_code,
                needs_reconcile=decision.reconcile_first,
                settle_window_s=settle_s,
            )
        else:
            # Deferred by the circuit or the rate limit: the attempt did not count, and an
            # entity that still needs reconciling keeps needing it.
            transition = replace(
                base, kind="deferred", next_attempt_at=now + decision.delay,
                needs_reconcile=entity.needs_reconcile, refund_attempt=True,
            )
        self.transitions.append(transition)

    def defer_all(self, entities: Sequence[ClaimedEntity], delay: timedelta, why: str,
                  code: str) -> None:
        for entity in entities:
            self.add(entity, self.deps.retry_policy.deferred(delay, rng=self.deps.rng),
                     verdict=Verdict.OUTAGE, error_code=code,
                     message=why)



def take_slot(deps: Deps, name: str) -> Defer | None:
    """A slot of the shared rate limit for one call named ``name``, waited for here; or, when
    it is further away than a call may wait (``rate_limit_slot``), the ``Defer`` to apply,
    the slot handed back."""
    slot = rate_limit_slot(deps.limiter.reserve(name), max_wait_s=deps.rate_limit_max_wait_s)
    if isinstance(slot, Defer):
        deps.limiter.cancel(name)
        return slot
    # Only for a real wait: with no limit the slot is always now, and a zero sleep is still a
    # system call that can give up the CPU on a busy host (seen in profiles at full load).
    if slot.wait_s > 0:
        deps.sleep(slot.wait_s)
    return None


def commit(attempt: Attempt) -> None:
    """Record the calls and transitions of the attempt so far, and log and count them."""
    deps, claim = attempt.deps, attempt.claim
    try:
        lost = _record(deps, claim, attempt.calls, attempt.transitions)
    except LedgerUnavailable:
        raise
    except LedgerError as exc:
        recorded, lost = _record_what_can_be(deps, claim, attempt, exc)
        attempt.transitions = recorded
    for t in attempt.transitions:
        _log_transition(claim, t)
        _count_transition(deps.metrics, t)
    attempt.committed.extend(attempt.transitions)
    attempt.lost += lost
    attempt.transitions, attempt.calls = [], []


def finish(attempt: Attempt, new_event: bool) -> Report:
    deps, claim = attempt.deps, attempt.claim
    commit(attempt)
    lost = attempt.lost
    if lost:
        log.error("claim.lost", extra={"event_id": claim.event_id, "lost": lost,
                                       "worker": deps.worker_id})
    kinds = Counter(t.kind for t in attempt.committed)
    return Report(
        claim.event_id,
        new_event=new_event,
        claimed=len(claim.entities),
        issued=kinds["issued"] + kinds["reconciled"],
        reconciled=kinds["reconciled"],
        retrying=kinds["retry_scheduled"],
        dead=kinds["dead"],
        deferred=kinds["deferred"],
        lost_claims=lost,
    )


def _record(deps: Deps, claim: Claim, calls: Sequence[RecordedCall],
            transitions: Sequence[Transition]) -> int:
    with tracing.span("ledger.record", {tracing.EVENT_ID: claim.event_id}), \
            deps.uow() as uow:
        lost = uow.ledger.record(claim, calls=calls, transitions=transitions,
                                 worker=deps.worker_id, now=deps.clock())
        uow.commit()
    return lost


def _record_what_can_be(deps: Deps, claim: Claim, attempt: Attempt,
                        refused: LedgerError) -> tuple[list[Transition], int]:
    """Record an attempt whose outcome the ledger refused: each entity's alone, and an entity
    whose own outcome is refused dead-lettered (``policy.unrecordable``); what was recorded,
    and how many claims were lost.

    The calls are left out (they are logged here): one of them may hold what was refused.
    """
    log.error("outcome.refused", extra={
        "event_id": claim.event_id, "error": str(refused),
        "calls": [f"{c.info.operation} {c.info.status} {c.info.request_id}"
                  for c in attempt.calls]})
    recorded: list[Transition] = []
    lost = 0
    for transition in attempt.transitions:
        try:
            lost += _record(deps, claim, (), (transition,))
            recorded.append(transition)
        except LedgerUnavailable:
            raise
        except LedgerError as exc:
            dead = _unrecordable(transition, exc)
            lost += _record(deps, claim, (), (dead,))
            recorded.append(dead)
    return recorded, lost


def _unrecordable(t: Transition, refused: LedgerError) -> Transition:
    """``t`` dead-lettered, with what Capillary answered in the reason, as storable text."""
    outcome = t.kind + (f", coupon {t.coupon.code}" if t.coupon else "") \
        + (f", request {t.request_id}" if t.request_id else "")
    decision = unrecordable(printable(outcome, limit=300), printable(str(refused), limit=500))
    return replace(
        t, state=EntityState.DEAD, kind="dead", coupon=None, extra_coupons=(),
        dead_reason=decision.reason, error_code=decision.code, error_message=None,
        needs_reconcile=decision.reconcile_first, next_attempt_at=None, verify_window_s=None,
        refund_attempt=False,
        request_id=printable(t.request_id, limit=200) if t.request_id else None)


def _log_transition(claim: Claim, t: Transition) -> None:
    series = next((e.series_id for e in claim.entities if e.entity_id == t.entity_id), None)
    extra = {
        "event_id": claim.event_id, "customer": claim.customer_key, "series": series,
        "entity_id": t.entity_id, "attempt": t.attempt, "error_code": t.error_code,
        "request_id": t.request_id,
    }
    if t.coupon is not None:
        # Logs travel further than the ledger (shippers, wider access): never a whole code.
        extra["coupon"] = mask_code(t.coupon.code)
    if t.next_attempt_at is not None:
        extra["next_attempt_at"] = t.next_attempt_at.isoformat()
    if t.error_message:
        extra["error_message"] = t.error_message
    if t.state is EntityState.DEAD:
        extra["reason"] = t.dead_reason
        log.warning("entity.dead", extra=extra)
    else:
        log.info(f"entity.{t.kind}", extra=extra)


def _count_transition(metrics: Metrics, t: Transition) -> None:
    if t.state is EntityState.ISSUED:
        metrics.coupons_issued.labels(t.recorded_via).inc()
        return
    if t.error_code == "settling":
        return  # waiting out a settle window is not a failure
    metrics.entities_failed.labels(t.verdict or "unknown").inc()
    if t.kind == "retry_scheduled":
        metrics.retries_scheduled.inc()
    elif t.state is EntityState.DEAD:
        metrics.dead_letters.labels(t.error_code or "unknown").inc()
