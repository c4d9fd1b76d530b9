"""The periodic work of the sweeper: recover crashed claims, dispatch due retries, verify
entities issued by a re-send after an unknown outcome, publish dead letters, fold the
dead-letter groups' counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from worker.adapters.postgres.circuit import Permit
from worker.domain.errors import CapillaryError, WorkerError
from worker.domain.policy import retries_to_dispatch
from worker.domain.text import mask_code
from worker.usecases.attempt import take_slot
from worker.usecases.deps import Deps
from worker.usecases.reconcile import (
    READ_BACK,
    RECONCILE_CLOCK_SKEW,
    is_ours,
    tell_circuit_read_back_failed,
)

log = logging.getLogger("worker.pipeline")

@dataclass(frozen=True)
class SweepReport:
    leases_expired: int = 0
    requeued: int = 0
    dispatched: int = 0
    dead_letters_published: int = 0
    circuit: str = "closed"
    verified: int = 0
    duplicates: int = 0
    events_repaired: int = 0


#: Events still processing that a sweep looks at for a stuck one (a different share each time):
#: a safety net, so a small share a second; all of them would cost a sweep as much as the
#: retries waiting in the ledger.
REPAIR_SHARE = 20


def sweep(deps: Deps, *, batch: int = 500, requeue_after_s: float = 300.0) -> SweepReport:
    """The periodic work: recover crashed claims, dispatch due retries, publish dead letters.

    Safe to run in every worker at once: each step locks its rows with SKIP LOCKED.
    """
    now = deps.clock()
    with deps.uow() as uow:
        expired = uow.ledger.expire_leases(
            now=now, limit=batch,
            retry_at=now + timedelta(seconds=deps.retry_policy.reconcile_delay_s),
            settle_window_s=deps.retry_policy.settle_window_s,
        )
        repaired = uow.ledger.repair_event_states(now=now, limit=min(batch, REPAIR_SHARE))
        requeued = uow.ledger.requeue_stale(
            queued_before=now - timedelta(seconds=requeue_after_s), now=now, limit=batch)
        # Within a second of a dead-lettering or a replay, so the console's groups sum a row
        # per group; a probe of an index when there is nothing to fold.
        uow.ledger.fold_dead_letter_groups()
        uow.commit()
    if expired:
        log.warning("sweep.leases_expired", extra={"entity_ids": expired[:20],
                                                   "count": len(expired)})
    if requeued:
        log.warning("sweep.requeued_lost_retries", extra={"count": requeued})
    if repaired:
        log.warning("sweep.repaired_event_states", extra={"event_ids": repaired[:20],
                                                          "count": len(repaired)})

    circuit = deps.circuit.state()
    limit = retries_to_dispatch(circuit_state=circuit.state, open_until=circuit.open_until,
                                now=now, batch=batch)
    dispatched = 0
    if limit:
        with deps.uow() as uow:
            due = uow.ledger.take_due(now=now, limit=limit)
            uow.ledger.mark_queued([d.entity_id for d in due], now=now)
            uow.commit()
        # Published after the commit, so the retry task finds the entity queued. Should the
        # publish fail, the entities stay queued and requeue_stale makes them due again.
        if due:
            try:
                deps.publisher.publish_retries(due)
            except WorkerError:
                log.exception("retry.publish_failed", extra={"count": len(due)})
                due = []
        dispatched = len(due)
        for d in due:
            log.info("entity.retry_dispatched",
                     extra={"event_id": d.event_id, "customer": d.customer_key,
                            "series": d.series_id, "entity_id": d.entity_id,
                            "attempt": d.attempts + 1})

    verified = verify_issued(deps) if circuit.state == "closed" else VerifyReport()
    published = publish_dead_letters(deps, batch=batch)
    return SweepReport(len(expired), requeued, dispatched, published, circuit.state,
                       verified.checked, verified.duplicates, len(repaired))


@dataclass(frozen=True)
class VerifyReport:
    checked: int = 0
    duplicates: int = 0


VERIFY_BATCH = 5


def verify_issued(deps: Deps, *, batch: int = VERIFY_BATCH) -> VerifyReport:
    """Read back entities issued by a re-send after an unknown outcome, once it has settled.

    The settle window is an assumption about Capillary, not a guarantee: if the original call
    landed after all, the customer now holds two of our coupons. Nothing can undo that here,
    but it is found, recorded (both coupons), counted and listed for support.
    """
    now = deps.clock()
    with deps.uow() as uow:
        items = uow.ledger.take_verifications(now=now, limit=batch, hold_s=deps.lease_s)
        uow.commit()
    duplicates = 0
    for index, item in enumerate(items):
        # Verifications share the fleet's quota with every other call: one that must wait
        # longer than a call may is put off, with the rest of the batch, until the slot.
        put_off = take_slot(deps, READ_BACK)
        if put_off is not None:
            with deps.uow() as uow:
                for later in items[index:]:
                    uow.ledger.finish_verification(later, now=deps.clock(),
                                                   retry_in_s=put_off.delay.total_seconds())
                uow.commit()
            return VerifyReport(index, duplicates)
        since = item.first_attempt_at - RECONCILE_CLOCK_SKEW
        try:
            read_back = deps.api.find_coupons(item.customer, item.series_id, since)
        except CapillaryError as exc:
            deps.metrics.read_back("verify", "failed")
            delay = deps.retry_policy.backoff(item.attempts + 1, rng=deps.rng)
            log.warning("verify.read_back_failed", extra={
                "entity_id": item.entity_id, "event_id": item.event_id, "error": str(exc)})
            with deps.uow() as uow:
                uow.ledger.finish_verification(item, now=deps.clock(),
                                               retry_in_s=delay.total_seconds())
                uow.commit()
            # An outage seen only through verifications still opens the circuit. Their batch
            # runs with the circuit closed, and an answer proves nothing a call's would.
            tell_circuit_read_back_failed(deps, Permit(), exc, answered=True)
            continue
        ours = [f.coupon for f in read_back.coupons if is_ours(item.issue_ref, f)]
        extra = [c for c in ours if c.code not in item.codes]
        found_twice = len(ours) > 1 and bool(extra)
        deps.metrics.read_back("verify", "duplicate" if found_twice
                               else "ours" if ours else "absent")
        message = None
        if found_twice:
            duplicates += 1
            deps.metrics.duplicates_issued.inc()
            message = (f"late original landed: coupons {', '.join(item.codes)} and "
                       f"{', '.join(c.code for c in extra)} are both ours")
            log.error("verify.duplicate_issued", extra={
                "entity_id": item.entity_id, "event_id": item.event_id,
                "customer": item.customer_key, "series": item.series_id,
                "codes": [mask_code(c) for c in (*item.codes, *(c.code for c in extra))]})
        with deps.uow() as uow:
            uow.ledger.finish_verification(item, now=deps.clock(),
                                           duplicates=extra if found_twice else (),
                                           request_id=read_back.call.request_id,
                                           message=message)
            uow.commit()
    return VerifyReport(len(items), duplicates)


def publish_dead_letters(deps: Deps, *, batch: int = 500) -> int:
    """Announce dead entities and rejected events on the dead-letter queue, once each."""
    with deps.uow() as uow:
        records = uow.ledger.unpublished_dead_letters(limit=batch)
        if not records:
            return 0
        try:
            deps.publisher.publish_dead_letters(records)
        except WorkerError:
            log.exception("dead_letters.publish_failed", extra={"count": len(records)})
            return 0
        uow.ledger.mark_dead_letters_published(records, now=deps.clock())
        uow.commit()
    return len(records)


__all__ = [
    "SweepReport",
    "VerifyReport",
    "publish_dead_letters",
    "sweep",
    "verify_issued",
]
