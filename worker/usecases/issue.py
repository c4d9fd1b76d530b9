"""Use cases: issue an event, retry an entity.

This is the only orchestration layer. Tasks and the command line call these functions with a
``Deps`` built once per process (see ``worker.bootstrap``); everything they touch goes through
a seam (ledger, Capillary, broker, rate limiter), so unit tests run them with fakes.

The exactly-once argument, in short: an entity is *claimed* (committed as in-flight, with a
lease) before Capillary is called, so a second delivery finds nothing to claim; an outcome is
committed before the message is acknowledged; and a claim whose lease ran out (its worker died
mid-call) is reconciled through the read-back API before anything is sent again
(``worker.usecases.reconcile``). An attempt's outcome is committed by
``worker.usecases.attempt``; the sweeper's work is in ``worker.usecases.sweep``, a rejected
message's in ``worker.usecases.rejection``.
"""

from __future__ import annotations

import logging
import uuid

from worker import tracing
from worker.adapters.capillary.api import BulkIssueResult
from worker.adapters.postgres.circuit import Permit
from worker.adapters.postgres.ratelimit import BULK_ISSUE
from worker.adapters.postgres.records import CircuitState, Claim, ClaimedEntity, RecordedCall
from worker.domain.errors import ClaimLapsed
from worker.domain.events import LoyaltyEvent
from worker.domain.model import (
    HOLDS_ONE_CODES,
    ODD_ENTRY_CODES,
    Verdict,
    attempt_ref,
    notes_with_ref,
)
from worker.domain.policy import (
    CircuitPolicy,
    DeadLetter,
    Decision,
)
from worker.domain.runtime_policy import CIRCUIT_OPEN_CODE
from worker.domain.verdicts import counts_toward_circuit
from worker.usecases.attempt import Attempt, commit, finish, take_slot
from worker.usecases.deps import Deps, Report, utcnow
from worker.usecases.reconcile import read_back_holder, reconcile

log = logging.getLogger("worker.pipeline")

# -- intake -------------------------------------------------------------------------------


def issue_event(event: LoyaltyEvent, *, source: str, deps: Deps) -> Report:
    """Take in one event (any delivery of it) and issue what it still needs.

    Raises EventRejected when the event id was already used for different content.
    """
    with tracing.span("coupons.event", {
            tracing.EVENT_ID: event.eventId, tracing.SOURCE: source,
            tracing.SERIES_IDS: list(event.seriesIds)}):
        return _issue_event(event, source=source, deps=deps)


def _issue_event(event: LoyaltyEvent, *, source: str, deps: Deps) -> Report:
    now, taken_at = deps.clock(), deps.leases.now()
    with tracing.span("ledger.take_in"), deps.uow() as uow:
        new, claim = uow.ledger.take_in(
            event, source=source, token=uuid.uuid4().hex, worker=deps.worker_id, now=now,
            lease_s=deps.lease_s, settle_window_s=deps.retry_policy.settle_window_s,
        )
        trace = tracing.traceparent()
        if new and trace:
            # Retries and replays of its entities link back to this first trace.
            uow.ledger.remember_trace(event.eventId, trace)
        uow.commit()
    deps.metrics.events_received.labels("new" if new else "duplicate").inc()
    if not claim.entities:
        log.info(
            "event.nothing_to_claim",
            extra={"event_id": event.eventId, "customer": event.customer.key,
                   "new_event": new, "entities": claim.skipped},
        )
        return Report(event.eventId, new_event=new, skipped=claim.skipped)
    log.info(
        "event.claimed",
        extra={"event_id": event.eventId, "customer": claim.customer_key, "new_event": new,
               "series": [e.series_id for e in claim.entities], "worker": deps.worker_id},
    )
    return _attempt(claim, deps, new_event=new, taken_at=taken_at)


def retry_entity(entity_id: int, *, deps: Deps) -> Report:
    """Run the retry of one entity (from the retry queue or a replay)."""
    with tracing.span("coupons.retry", {tracing.ENTITY_ID: entity_id}) as span:
        now, taken_at = deps.clock(), deps.leases.now()
        with tracing.span("ledger.claim_entity"), deps.uow() as uow:
            claim = uow.ledger.claim_entity(
                entity_id, token=uuid.uuid4().hex, worker=deps.worker_id, now=now,
                lease_s=deps.lease_s, settle_window_s=deps.retry_policy.settle_window_s,
            )
            # Linked to the trace of the event's first delivery, when one was recorded.
            first_trace = uow.ledger.event_trace(claim.event_id) \
                if claim is not None and tracing.enabled() else None
            uow.commit()
        if claim is None:
            log.info("retry.nothing_to_claim", extra={"entity_id": entity_id})
            return Report(None)
        span.set(tracing.EVENT_ID, claim.event_id)
        span.link(first_trace)
        return _attempt(claim, deps, taken_at=taken_at)


# -- one attempt at a claim ---------------------------------------------------------------


def _attempt(claim: Claim, deps: Deps, *, taken_at: float, new_event: bool = False) -> Report:
    # The claim's lease is renewed while this attempt runs (``worker.usecases.leases``).
    with deps.leases.hold(claim.token, [e.entity_id for e in claim.entities],
                          taken_at=taken_at) as held:
        return _attempt_held(Attempt(claim, deps, held), new_event)


def _attempt_held(attempt: Attempt, new_event: bool) -> Report:
    claim, deps = attempt.claim, attempt.deps
    permit = deps.circuit.permit()
    if isinstance(permit, CircuitState):
        attempt.defer_all(claim.entities,
                          CircuitPolicy.wait_while_open(permit.open_until, deps.clock()),
                          f"circuit open: {permit.reason}", CIRCUIT_OPEN_CODE)
        return finish(attempt, new_event)

    to_issue: list[ClaimedEntity] = []
    for entity in claim.entities:
        if entity.needs_reconcile and reconcile(attempt, entity, permit):
            continue
        to_issue.append(entity)
    size = max(deps.max_series_per_call, 1)
    for start in range(0, len(to_issue), size):
        chunk = to_issue[start:start + size]
        if start:
            # Each call's outcome is committed before the next call is sent: a worker dying
            # between calls leaves in flight only the series of the calls not yet answered.
            commit(attempt)
            next_permit = deps.circuit.permit()
            if isinstance(next_permit, CircuitState):
                attempt.defer_all(to_issue[start:], CircuitPolicy.wait_while_open(
                    next_permit.open_until, deps.clock()),
                    f"circuit open: {next_permit.reason}", CIRCUIT_OPEN_CODE)
                break
            permit = next_permit
        _issue(attempt, chunk, permit)
    return finish(attempt, new_event)



def _issue(attempt: Attempt, entities: list[ClaimedEntity], permit: Permit) -> None:
    deps, claim = attempt.deps, attempt.claim
    put_off = take_slot(deps, BULK_ISSUE)
    if put_off is not None:
        attempt.defer_all(entities, put_off.delay, "rate limit", "rate_limited")
        return
    if not attempt.held.may_send():
        # The lease lapsed (renewals failed): another worker may be reading these entities
        # back already, so no call may go out under this claim any more.
        raise ClaimLapsed(f"the claim on {len(entities)} entities of event {claim.event_id} "
                          "lapsed before its call was sent; nothing sent")
    metadata = dict(claim.metadata)
    # Each attempt carries a reference of its own, under the event's: a read-back tells ours
    # from other coupons by the event's part, and two attempts that both landed apart.
    ref = attempt_ref(claim.issue_ref, deps.rng)
    metadata["notes"] = notes_with_ref(metadata.get("notes"), ref)
    result = deps.api.bulk_issue(claim.customer, [e.series_id for e in entities], metadata)
    call = result.call
    attempt.calls.append(RecordedCall(
        call, tuple(e.entity_id for e in entities), tuple(e.series_id for e in entities),
        issue_ref=ref))
    deps.metrics.observe_call(BULK_ISSUE, call.status, call.latency_ms)
    if call.status == 429:
        deps.limiter.penalise(deps.retry_policy.throttle_penalty_s(result.retry_after_s))
    # Throttled at the door only when no entry speaks: an entry in a 429 still says what
    # happened to its series (a coupon it carries is issued, never re-sent).
    throttled = call.status == 429 and result.call_level_failure
    _update_circuit(deps, permit, result)
    for kind in _answer_remarks(result):
        deps.metrics.answer_remarks.labels(kind).inc()
    for entity in entities:
        outcome = result.entries[entity.series_id]
        if throttled:
            decision: Decision = deps.retry_policy.throttled(
                entity.attempts, retry_after_s=result.retry_after_s, rng=deps.rng)
        else:
            code = outcome.error.code if outcome.error else None
            decision = deps.retry_policy.decide(
                outcome.verdict, attempts=entity.attempts, retry_after_s=result.retry_after_s,
                circuit_open_s=deps.circuit.policy_open_s, rng=deps.rng, error_code=code,
            )
            if entity.needs_reconcile and isinstance(decision, DeadLetter) \
                    and code in HOLDS_ONE_CODES and outcome.error is not None:
                read_back_holder(attempt, entity, outcome.error, permit)
                continue
        attempt.add(
            entity, decision, verdict=outcome.verdict,
            error_code=outcome.error.code if outcome.error else None,
            message=outcome.error.message if outcome.error else None,
            request_id=call.request_id, coupon=outcome.coupon,
        )


def _answer_remarks(result: BulkIssueResult) -> list[str]:
    """What in a bulk-issue answer broke an assumption about Capillary, one per series (the
    ``capillary_answer_remarks_total`` metric; docs/capillary-assumptions.md)."""
    remarks = [e.error.code for e in result.entries.values()
               if e.error is not None and e.error.code in ODD_ENTRY_CODES]
    remarks += ["warnings" for e in result.entries.values() if e.warnings]
    status = result.call.status
    if not result.call_level_failure and status is not None and status >= 400:
        remarks += ["entries_in_error_status"] * len(result.entries)
    return remarks



def _update_circuit(deps: Deps, permit: Permit, result: BulkIssueResult) -> None:
    verdicts = {e.verdict for e in result.entries.values()}
    # A configuration or auth error anywhere in the answer pauses the fleet, whatever each
    # series' own verdict became (an entry read back because the counts disagreed, say).
    outage = result.outage or next(
        (e.error for e in result.entries.values() if e.verdict is Verdict.OUTAGE and e.error),
        None)
    if outage is not None or Verdict.OUTAGE in verdicts:
        reason = f"{outage.code}: {outage.message}" if outage else "outage"
        deps.circuit.failure(permit, Verdict.OUTAGE, reason)
    elif result.call_level_failure and counts_toward_circuit(
            next(iter(verdicts)), result.call.status):
        deps.circuit.failure(
            permit, next(iter(verdicts)), f"{result.call.error_code or result.call.status}: "
            f"{result.call.error_message or ''}".strip())
    else:
        deps.circuit.success(permit)


# ``utcnow`` is the use cases' clock (``worker.usecases.deps``); the console's routes still import
# it from here until their split lands.
__all__ = [
    "issue_event",
    "retry_entity",
    "utcnow",
]
