"""Settling an unknown outcome by reading the customer's coupons back.

An entity whose last call may have issued is never sent again before a read-back
(``reconcile``): a coupon of ours is adopted, none is waited for until the settle window is over.
A re-send refused as "the customer already holds one" reads the customer's coupons back too
(``read_back_holder``). A coupon is ours when its notes carry the event's reference
(``is_ours``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from worker.adapters.capillary.api import FoundCoupon
from worker.adapters.postgres.circuit import Permit
from worker.adapters.postgres.records import ClaimedEntity, RecordedCall
from worker.domain.errors import CapillaryError, Outage, Retryable
from worker.domain.model import EntryError, Verdict
from worker.domain.policy import (
    CircuitPolicy,
    DeadLetter,
    Decision,
    HeldCoupon,
    RecordDuplicate,
    RecordIssued,
    refused_holding,
)
from worker.domain.text import mask_code
from worker.usecases.attempt import Attempt, take_slot
from worker.usecases.deps import Deps

log = logging.getLogger("worker.pipeline")

READ_BACK = "read_back"
# Coupons created a little before our first attempt still count: clocks of hosts differ.
RECONCILE_CLOCK_SKEW = timedelta(minutes=5)


def is_ours(event_ref: str, found: FoundCoupon) -> bool:
    """Whether a coupon read back carries the event's reference in the notes it was sent."""
    return event_ref in str(found.issual_details.get("notes") or "")


def reconcile(attempt: Attempt, entity: ClaimedEntity, permit: Permit) -> bool:
    """Settle an entity whose last call may have issued. True when it needs no issue call."""
    deps, claim = attempt.deps, attempt.claim
    since = entity.first_attempt_at - RECONCILE_CLOCK_SKEW
    put_off = take_slot(deps, READ_BACK)
    if put_off is not None:
        attempt.defer_all([entity], put_off.delay, "rate limit", "rate_limited")
        return True
    try:
        read_back = deps.api.find_coupons(claim.customer, entity.series_id, since)
    except CapillaryError as exc:
        deps.metrics.read_back("reconcile", "failed")
        _read_back_failed(attempt, entity, permit, exc, message=f"read-back failed: {exc}",
                          error_code="reconcile_failed")
        return True
    # Capillary answered: failed read-backs count toward the circuit, so an answer ends their
    # run as an answered call does. A probe may only read back (the coupon is found, or must
    # wait for its window): its answer must settle the circuit, or the fleet stays paused
    # until the probe times out.
    deps.circuit.success(permit)
    attempt.calls.append(RecordedCall(read_back.call, (entity.entity_id,), (entity.series_id,)))
    deps.metrics.observe_call(READ_BACK, read_back.call.status, read_back.call.latency_ms)
    ours = [found for found in read_back.coupons if is_ours(claim.issue_ref, found)]
    decision = deps.retry_policy.after_read_back(
        len(ours), settled=entity.settled, settles_in_s=entity.settles_in_s,
        attempts=entity.attempts)
    request_id = read_back.call.request_id
    deps.metrics.read_back("reconcile", _read_back_outcome(decision))
    if decision is None or isinstance(decision, DeadLetter):
        log.info(
            "reconcile.absent",
            extra={"event_id": claim.event_id, "customer": claim.customer_key,
                   "series": entity.series_id, "attempt": entity.attempts,
                   "request_id": request_id},
        )
        if decision is None:
            return False
        # The attempts ran out on an unknown outcome; this read-back proves nothing issued.
        attempt.add(entity, decision, verdict=Verdict.RETRYABLE, request_id=request_id)
    elif isinstance(decision, RecordIssued):
        attempt.reconciled += 1
        attempt.add(entity, decision, verdict=Verdict.ISSUED, request_id=request_id,
                    coupon=ours[0].coupon, reconciled=True)
    elif isinstance(decision, RecordDuplicate):
        log.error(
            "reconcile.duplicate_issued",
            extra={"event_id": claim.event_id, "customer": claim.customer_key,
                   "series": entity.series_id,
                   "codes": [mask_code(f.coupon.code) for f in ours]},
        )
        deps.metrics.duplicates_issued.inc()
        attempt.add(entity, decision, verdict=Verdict.ISSUED, request_id=request_id,
                    coupon=ours[0].coupon, extra_coupons=tuple(f.coupon for f in ours[1:]))
    else:
        # Nothing of ours yet, but the original call may still land: wait it out.
        attempt.add(entity, decision, verdict=Verdict.AMBIGUOUS, error_code="settling",
                    message="not visible yet; the original call may still land",
                    request_id=request_id)
    return True


def _read_back_outcome(decision: Decision | None) -> str:
    """What a reconciling read-back found, for ``capillary_read_backs_total``."""
    if decision is None or isinstance(decision, DeadLetter):
        return "absent"
    if isinstance(decision, RecordIssued):
        return "ours"
    return "duplicate" if isinstance(decision, RecordDuplicate) else "settling"


def _read_back_failed(attempt: Attempt, entity: ClaimedEntity, permit: Permit,
                      exc: CapillaryError, *, message: str, error_code: str,
                      answered: bool = False) -> None:
    """Record a read-back that proved nothing, and tell the circuit what it says of
    Capillary's health (``answered``: this permit's call was answered, and that answer
    already settled a probe)."""
    deps = attempt.deps
    verdict = tell_circuit_read_back_failed(deps, permit, exc, answered=answered)
    failed = deps.retry_policy.read_back_failed(
        verdict, attempts=entity.attempts, status=exc.status,
        age_s=(deps.clock() - entity.first_attempt_at).total_seconds(),
        retry_after_s=exc.retry_after_s if isinstance(exc, Retryable) else None,
        circuit_open_s=deps.circuit.policy_open_s, rng=deps.rng,
    )
    attempt.add(entity, failed, verdict=Verdict.AMBIGUOUS, error_code=error_code,
                message=message, request_id=exc.request_id)


def tell_circuit_read_back_failed(deps: Deps, permit: Permit, exc: CapillaryError, *,
                                  answered: bool = False) -> Verdict:
    """Tell the circuit what a failed read-back says of Capillary's health, as a failed call
    would (``answered``: this permit's call was answered, and that answer already settled a
    probe); the failure's verdict."""
    verdict = Verdict.OUTAGE if isinstance(exc, Outage) else Verdict.AMBIGUOUS
    told = CircuitPolicy.after_failed_read_back(verdict, exc.status, probe=permit.probe)
    if told == "failure":
        deps.circuit.failure(permit, verdict, f"read-back: {exc}")
    elif told == "success" and not answered:
        deps.circuit.success(permit)
    return verdict


#: How far back the customer's coupons are read when Capillary says they already hold one.
HELD_SINCE = datetime(2000, 1, 1, tzinfo=UTC)


def read_back_holder(attempt: Attempt, entity: ClaimedEntity, error: EntryError,
                     permit: Permit) -> None:
    """A re-send after an unknown outcome was refused as "the customer already holds one":
    read the customer's coupons of the series back. Ours: adopted (recorded as issued, or as a
    duplicate). Not ours: dead-lettered with the customer's coupons in the reason, so support
    sees them without opening Capillary.

    A read-back that cannot be made leaves the outcome unknown, as a failed reconciling
    read-back does (``RetryPolicy.read_back_failed``): read back again later (an outage waits
    for the circuit, and tells it), and dead only once the attempts and the floor are spent.
    Capillary being unwell for a moment is no reason to hand support a dead letter.
    """
    deps, claim = attempt.deps, attempt.claim
    put_off = take_slot(deps, READ_BACK)
    if put_off is not None:
        attempt.defer_all([entity], put_off.delay, "rate limit", "rate_limited")
        return
    try:
        read_back = deps.api.find_coupons(claim.customer, entity.series_id, HELD_SINCE)
    except CapillaryError as exc:
        deps.metrics.read_back("holds_one", "failed")
        log.warning("holds_one.read_back_failed", extra={
            "event_id": claim.event_id, "customer": claim.customer_key,
            "series": entity.series_id, "error": str(exc), "request_id": exc.request_id})
        _read_back_failed(attempt, entity, permit, exc, error_code=error.code, answered=True,
                          message=f"{error.message or error.code}; the read-back of the "
                                  f"customer's coupons failed: {exc}")
        return
    attempt.calls.append(RecordedCall(read_back.call, (entity.entity_id,), (entity.series_id,)))
    deps.metrics.observe_call(READ_BACK, read_back.call.status, read_back.call.latency_ms)
    request_id = read_back.call.request_id
    ours = [found for found in read_back.coupons if is_ours(claim.issue_ref, found)]
    log.info("holds_one.read_back", extra={
        "event_id": claim.event_id, "customer": claim.customer_key, "series": entity.series_id,
        "error_code": error.code, "ours": [mask_code(f.coupon.code) for f in ours],
        "held": [mask_code(f.coupon.code) for f in read_back.coupons][:20],
        "request_id": request_id})
    deps.metrics.answer_remarks.labels(
        "holds_one_ours" if ours else "holds_one_not_ours").inc()
    deps.metrics.read_back("holds_one", "not_ours" if not ours
                           else "ours" if len(ours) == 1 else "duplicate")
    if len(ours) == 1:
        attempt.reconciled += 1
        attempt.add(entity, RecordIssued(), verdict=Verdict.ISSUED, request_id=request_id,
                    coupon=ours[0].coupon, reconciled=True)
    elif ours:
        deps.metrics.duplicates_issued.inc()
        attempt.add(entity, RecordDuplicate(), verdict=Verdict.ISSUED, request_id=request_id,
                    coupon=ours[0].coupon, extra_coupons=tuple(f.coupon for f in ours[1:]))
    else:
        held = [HeldCoupon(f.coupon.code, f.created_at) for f in read_back.coupons]
        attempt.add(entity, refused_holding(error.code, held), verdict=error.verdict,
                    error_code=error.code, message=error.message, request_id=request_id)
