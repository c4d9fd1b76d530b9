"""Use cases: issue an event, retry an entity, sweep the ledger, record a rejection.

This is the only orchestration layer. Tasks and the command line call these functions with a
``Deps`` built once per process (see ``worker.bootstrap``); everything they touch goes through
a seam (ledger, Capillary, broker, rate limiter), so unit tests run them with fakes.

The exactly-once argument, in short: an entity is *claimed* (committed as in-flight, with a
lease) before Capillary is called, so a second delivery finds nothing to claim; an outcome is
committed before the message is acknowledged; and a claim whose lease ran out (its worker died
mid-call) is reconciled through the read-back API before anything is sent again.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker.adapters.capillary.api import BulkIssueResult, CouponApi, FoundCoupon
from worker.adapters.postgres.circuit import CircuitGate, Permit
from worker.adapters.postgres.ratelimit import BULK_ISSUE, RateLimiter
from worker.adapters.postgres.records import (
    CircuitState,
    Claim,
    ClaimedEntity,
    DeadLetterRecord,
    DueEntity,
    RecordedCall,
    Transition,
)
from worker.adapters.postgres.unit_of_work import UnitOfWorkFactory
from worker.domain.errors import (
    CapillaryError,
    ClaimLapsed,
    EventRejected,
    LedgerError,
    LedgerUnavailable,
    Outage,
    Retryable,
    WorkerError,
)
from worker.domain.events import LoyaltyEvent
from worker.domain.model import (
    HOLDS_ONE_CODES,
    ODD_ENTRY_CODES,
    Coupon,
    DeadMessageKind,
    EntityState,
    EntryError,
    Verdict,
    attempt_ref,
    notes_with_ref,
)
from worker.domain.policy import (
    CIRCUIT_OPEN_CODE,
    CircuitPolicy,
    DeadLetter,
    Decision,
    Defer,
    HeldCoupon,
    RecordDuplicate,
    RecordIssued,
    RetryPolicy,
    ScheduleRetry,
    WaitForSlot,
    counts_toward_circuit,
    rate_limit_slot,
    refused_after_unknown,
    refused_holding,
    retries_to_dispatch,
    unrecordable,
)
from worker.domain.text import mask_code, printable
from worker.metrics import Metrics
from worker.usecases.leases import HeldClaim, LeaseKeeper, UnrenewedLeases

log = logging.getLogger("worker.pipeline")

READ_BACK = "read_back"
# Coupons created a little before our first attempt still count: clocks of hosts differ.
RECONCILE_CLOCK_SKEW = timedelta(minutes=5)
REJECTION_REASON_MAX_CHARS = 4000
REJECTION_LABEL_MAX_CHARS = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


class Publisher(Protocol):
    """The broker side effects of the services."""

    def publish_retries(self, due: Sequence[DueEntity]) -> None:
        """Put one message per due entity on the retry queue (confirmed by the broker)."""
        ...

    def publish_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        """Put one message per dead entity or rejected event on the dead-letter queue."""
        ...


@dataclass
class Deps:
    """Everything the use cases need, wired once per process."""

    uow: UnitOfWorkFactory
    api: CouponApi
    publisher: Publisher
    limiter: RateLimiter
    circuit: CircuitGate
    retry_policy: RetryPolicy
    metrics: Metrics
    worker_id: str
    lease_s: float = 120.0
    rate_limit_max_wait_s: float = 30.0
    #: Series per bulk-issue call (``CAPILLARY_MAX_SERIES_PER_CALL``): more are split.
    max_series_per_call: int = 100
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    leases: LeaseKeeper | UnrenewedLeases = field(default_factory=UnrenewedLeases)


@dataclass(frozen=True)
class Report:
    """What one use case did, for the task result (Flower) and for tests."""

    event_id: str | None
    new_event: bool = False
    claimed: int = 0
    issued: int = 0
    reconciled: int = 0
    retrying: int = 0
    dead: int = 0
    deferred: int = 0
    lost_claims: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    rejected_id: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, 0, {}, False)}


# -- intake -------------------------------------------------------------------------------


def issue_event(event: LoyaltyEvent, *, source: str, deps: Deps) -> Report:
    """Take in one event (any delivery of it) and issue what it still needs.

    Raises EventRejected when the event id was already used for different content.
    """
    now, taken_at = deps.clock(), deps.leases.now()
    with deps.uow() as uow:
        new, claim = uow.ledger.take_in(
            event, source=source, token=uuid.uuid4().hex, worker=deps.worker_id, now=now,
            lease_s=deps.lease_s, settle_window_s=deps.retry_policy.settle_window_s,
        )
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
    now, taken_at = deps.clock(), deps.leases.now()
    with deps.uow() as uow:
        claim = uow.ledger.claim_entity(
            entity_id, token=uuid.uuid4().hex, worker=deps.worker_id, now=now,
            lease_s=deps.lease_s, settle_window_s=deps.retry_policy.settle_window_s,
        )
        uow.commit()
    if claim is None:
        log.info("retry.nothing_to_claim", extra={"entity_id": entity_id})
        return Report(None)
    return _attempt(claim, deps, taken_at=taken_at)


def record_rejection(raw: bytes, reason: str, *, source: str, deps: Deps,
                     event_id: str | None = None, content_type: str | None = None,
                     kind: DeadMessageKind = DeadMessageKind.INVALID) -> int:
    """Keep a message that is not a valid event, with the precise reason; returns its id.

    ``kind`` says whose fault: ``INVALID`` (its own bytes: a rejection) unless
    ``worker.usecases.delivery`` keeps a message that our side kept failing on (a dead letter).

    This is the last line for poison input, so it must not fail on it: text that PostgreSQL
    refuses (NUL, lone surrogates) is escaped, the raw bytes are kept as they are (bytea), and
    a row the database still refuses is stored once more with only what cannot be refused.
    """
    reason = printable(reason, limit=REJECTION_REASON_MAX_CHARS)
    source = printable(source, limit=REJECTION_LABEL_MAX_CHARS)
    event_id = printable(event_id, limit=REJECTION_LABEL_MAX_CHARS) if event_id else None
    content_type = (printable(content_type, limit=REJECTION_LABEL_MAX_CHARS)
                    if content_type else None)
    try:
        rejected_id = _insert_rejection(raw, reason, source, event_id, content_type, kind, deps)
    except LedgerUnavailable:
        raise
    except LedgerError as exc:
        log.error("event.rejection_refused", extra={"event_id": event_id, "error": str(exc)})
        reason = printable(f"{reason} (stored without its event id and content type: "
                           f"{exc})".encode("ascii", "backslashreplace").decode("ascii"),
                           limit=REJECTION_REASON_MAX_CHARS)
        event_id = content_type = None
        rejected_id = _insert_rejection(raw, reason, source, None, None, kind, deps)
    invalid = kind is DeadMessageKind.INVALID
    deps.metrics.events_received.labels("rejected" if invalid else "dead_lettered").inc()
    log.warning(
        "event.rejected" if invalid else "event.dead_lettered",
        extra={"rejected_id": rejected_id, "event_id": event_id, "source": source,
               "reason": reason, "size_bytes": len(raw), "kind": str(kind)},
    )
    return rejected_id


def _insert_rejection(raw: bytes, reason: str, source: str, event_id: str | None,
                      content_type: str | None, kind: DeadMessageKind, deps: Deps) -> int:
    with deps.uow() as uow:
        rejected_id = uow.ledger.record_rejection(
            raw=raw, reason=reason, source=source, event_id=event_id,
            content_type=content_type, now=deps.clock(), kind=kind,
        )
        uow.commit()
    return rejected_id


# -- one attempt at a claim ---------------------------------------------------------------


@dataclass
class _Attempt:
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


def _attempt(claim: Claim, deps: Deps, *, taken_at: float, new_event: bool = False) -> Report:
    # The claim's lease is renewed while this attempt runs (``worker.usecases.leases``).
    with deps.leases.hold(claim.token, [e.entity_id for e in claim.entities],
                          taken_at=taken_at) as held:
        return _attempt_held(_Attempt(claim, deps, held), new_event)


def _attempt_held(attempt: _Attempt, new_event: bool) -> Report:
    claim, deps = attempt.claim, attempt.deps
    permit = deps.circuit.permit()
    if isinstance(permit, CircuitState):
        attempt.defer_all(claim.entities,
                          CircuitPolicy.wait_while_open(permit.open_until, deps.clock()),
                          f"circuit open: {permit.reason}", CIRCUIT_OPEN_CODE)
        return _finish(attempt, new_event)

    to_issue: list[ClaimedEntity] = []
    for entity in claim.entities:
        if entity.needs_reconcile and _reconcile(attempt, entity, permit):
            continue
        to_issue.append(entity)
    size = max(deps.max_series_per_call, 1)
    for start in range(0, len(to_issue), size):
        chunk = to_issue[start:start + size]
        if start:
            # Each call's outcome is committed before the next call is sent: a worker dying
            # between calls leaves in flight only the series of the calls not yet answered.
            _commit(attempt)
            next_permit = deps.circuit.permit()
            if isinstance(next_permit, CircuitState):
                attempt.defer_all(to_issue[start:], CircuitPolicy.wait_while_open(
                    next_permit.open_until, deps.clock()),
                    f"circuit open: {next_permit.reason}", CIRCUIT_OPEN_CODE)
                break
            permit = next_permit
        _issue(attempt, chunk, permit)
    return _finish(attempt, new_event)


def _wait_for(slot: WaitForSlot, deps: Deps) -> None:
    # Only for a real wait: with no limit the slot is always now, and a zero sleep is still a
    # system call that can give up the CPU on a busy host (seen in profiles at full load).
    if slot.wait_s > 0:
        deps.sleep(slot.wait_s)


def _is_ours(event_ref: str, found: FoundCoupon) -> bool:
    """Whether a coupon read back carries the event's reference in the notes it was sent."""
    return event_ref in str(found.issual_details.get("notes") or "")


def _reconcile(attempt: _Attempt, entity: ClaimedEntity, permit: Permit) -> bool:
    """Settle an entity whose last call may have issued. True when it needs no issue call."""
    deps, claim = attempt.deps, attempt.claim
    since = entity.first_attempt_at - RECONCILE_CLOCK_SKEW
    slot = rate_limit_slot(deps.limiter.reserve(READ_BACK), max_wait_s=deps.rate_limit_max_wait_s)
    if isinstance(slot, Defer):
        deps.limiter.cancel(READ_BACK)
        attempt.defer_all([entity], slot.delay, "rate limit", "rate_limited")
        return True
    _wait_for(slot, deps)
    try:
        read_back = deps.api.find_coupons(claim.customer, entity.series_id, since)
    except CapillaryError as exc:
        verdict = Verdict.OUTAGE if isinstance(exc, Outage) else Verdict.AMBIGUOUS
        failed = deps.retry_policy.read_back_failed(
            verdict, attempts=entity.attempts,
            retry_after_s=exc.retry_after_s if isinstance(exc, Retryable) else None,
            circuit_open_s=deps.circuit.policy_open_s, rng=deps.rng,
        )
        attempt.add(entity, failed, verdict=Verdict.AMBIGUOUS, error_code="reconcile_failed",
                    message=f"read-back failed: {exc}", request_id=exc.request_id)
        told = CircuitPolicy.after_failed_read_back(verdict, exc.status, probe=permit.probe)
        if told == "failure":
            deps.circuit.failure(permit, verdict, f"read-back: {exc}")
        elif told == "success":
            deps.circuit.success(permit)
        return True
    if permit.probe:
        # A probe may only read back (the coupon is found, or must wait for its window): its
        # answer must settle the circuit, or the fleet stays paused until the probe times out.
        deps.circuit.success(permit)
    attempt.calls.append(RecordedCall(read_back.call, (entity.entity_id,), (entity.series_id,)))
    deps.metrics.observe_call(READ_BACK, read_back.call.status, read_back.call.latency_ms)
    ours = [found for found in read_back.coupons if _is_ours(claim.issue_ref, found)]
    decision = deps.retry_policy.after_read_back(
        len(ours), settled=entity.settled, settles_in_s=entity.settles_in_s,
        attempts=entity.attempts)
    request_id = read_back.call.request_id
    if decision is None:
        log.info(
            "reconcile.absent",
            extra={"event_id": claim.event_id, "customer": claim.customer_key,
                   "series": entity.series_id, "attempt": entity.attempts,
                   "request_id": request_id},
        )
        return False
    if isinstance(decision, RecordIssued):
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


def _issue(attempt: _Attempt, entities: list[ClaimedEntity], permit: Permit) -> None:
    deps, claim = attempt.deps, attempt.claim
    slot = rate_limit_slot(deps.limiter.reserve(BULK_ISSUE),
                           max_wait_s=deps.rate_limit_max_wait_s)
    if isinstance(slot, Defer):
        deps.limiter.cancel(BULK_ISSUE)
        attempt.defer_all(entities, slot.delay, "rate limit", "rate_limited")
        return
    _wait_for(slot, deps)
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
                    and code in HOLDS_ONE_CODES and outcome.error is not None \
                    and _read_back_holder(attempt, entity, outcome.error):
                continue
            decision = refused_after_unknown(decision, code,
                                             after_unknown=entity.needs_reconcile)
        attempt.add(
            entity, decision, verdict=outcome.verdict,
            error_code=outcome.error.code if outcome.error else None,
            message=outcome.error.message if outcome.error else None,
            request_id=call.request_id, coupon=outcome.coupon,
        )


def _answer_remarks(result: BulkIssueResult) -> list[str]:
    """What in a bulk-issue answer broke an assumption about Capillary, one per series (the
    ``capillary_answer_remarks_total`` metric; the README's "What we assume" page)."""
    remarks = [e.error.code for e in result.entries.values()
               if e.error is not None and e.error.code in ODD_ENTRY_CODES]
    remarks += ["warnings" for e in result.entries.values() if e.warnings]
    status = result.call.status
    if not result.call_level_failure and status is not None and status >= 400:
        remarks += ["entries_in_error_status"] * len(result.entries)
    return remarks


#: How far back the customer's coupons are read when Capillary says they already hold one.
HELD_SINCE = datetime(2000, 1, 1, tzinfo=UTC)


def _read_back_holder(attempt: _Attempt, entity: ClaimedEntity, error: EntryError) -> bool:
    """A re-send after an unknown outcome was refused as "the customer already holds one":
    read the customer's coupons of the series back. Ours: adopted (recorded as issued, or as a
    duplicate). Not ours: dead-lettered with the customer's coupons in the reason, so support
    sees them without opening Capillary. False when the read-back could not be made.
    """
    deps, claim = attempt.deps, attempt.claim
    slot = rate_limit_slot(deps.limiter.reserve(READ_BACK), max_wait_s=deps.rate_limit_max_wait_s)
    if isinstance(slot, Defer):
        deps.limiter.cancel(READ_BACK)
        return False
    _wait_for(slot, deps)
    try:
        read_back = deps.api.find_coupons(claim.customer, entity.series_id, HELD_SINCE)
    except CapillaryError as exc:
        log.warning("holds_one.read_back_failed", extra={
            "event_id": claim.event_id, "customer": claim.customer_key,
            "series": entity.series_id, "error": str(exc), "request_id": exc.request_id})
        return False
    attempt.calls.append(RecordedCall(read_back.call, (entity.entity_id,), (entity.series_id,)))
    deps.metrics.observe_call(READ_BACK, read_back.call.status, read_back.call.latency_ms)
    request_id = read_back.call.request_id
    ours = [found for found in read_back.coupons if _is_ours(claim.issue_ref, found)]
    log.info("holds_one.read_back", extra={
        "event_id": claim.event_id, "customer": claim.customer_key, "series": entity.series_id,
        "error_code": error.code, "ours": [mask_code(f.coupon.code) for f in ours],
        "held": [mask_code(f.coupon.code) for f in read_back.coupons][:20],
        "request_id": request_id})
    deps.metrics.answer_remarks.labels(
        "holds_one_ours" if ours else "holds_one_not_ours").inc()
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
    return True


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


def _commit(attempt: _Attempt) -> None:
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


def _finish(attempt: _Attempt, new_event: bool) -> Report:
    deps, claim = attempt.deps, attempt.claim
    _commit(attempt)
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
    with deps.uow() as uow:
        lost = uow.ledger.record(claim, calls=calls, transitions=transitions,
                                 worker=deps.worker_id, now=deps.clock())
        uow.commit()
    return lost


def _record_what_can_be(deps: Deps, claim: Claim, attempt: _Attempt,
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


# -- the sweeper --------------------------------------------------------------------------


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
REPAIR_SHARE = 50


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
    for item in items:
        since = item.first_attempt_at - RECONCILE_CLOCK_SKEW
        try:
            read_back = deps.api.find_coupons(item.customer, item.series_id, since)
        except CapillaryError as exc:
            delay = deps.retry_policy.backoff(item.attempts + 1, rng=deps.rng)
            log.warning("verify.read_back_failed", extra={
                "entity_id": item.entity_id, "event_id": item.event_id, "error": str(exc)})
            with deps.uow() as uow:
                uow.ledger.finish_verification(item, now=deps.clock(),
                                               retry_in_s=delay.total_seconds())
                uow.commit()
            continue
        ours = [f.coupon for f in read_back.coupons if _is_ours(item.issue_ref, f)]
        extra = [c for c in ours if c.code not in item.codes]
        found_twice = len(ours) > 1 and bool(extra)
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
    "Deps",
    "EventRejected",
    "Publisher",
    "Report",
    "issue_event",
    "record_rejection",
    "retry_entity",
    "sweep",
    "verify_issued",
]
