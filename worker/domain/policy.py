"""Every outcome rule and every retry, backoff, dead-letter and pause decision lives here.

Two halves. First, *the unknown-outcome rule*: what an answer from Capillary (or its absence)
proves about each series of a bulk-issue call. A series is "not issued" only when the answer says
so for that series (an entry with errors), or when the request provably never reached
Capillary's application; everything else is *unknown* (``Verdict.AMBIGUOUS``) and is settled by
a read-back before anything is sent again. Second, the decisions: handlers report a ``Verdict``
per entity and this module turns it into a ``Decision``. Precedence for delays: Capillary's
Retry-After (a floor), then the exponential backoff with full jitter, capped by ``retry_max_s``.

The runtime's own decisions are here too, returned as values that the tasks and the bootsteps
carry out: how a message goes back when nothing could be recorded (``requeue``), how many due
retries the sweeper may dispatch (``retries_to_dispatch``, the one-probe rule), when consumers
pause (``ConsumptionPause``), how long the task queue may grow before the bridge holds bus
messages (``bridge_high_water``), and how a publish is retried (``PUBLISH_RETRY_POLICY``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

from worker.domain.errors import BrokerUnavailable, CapillaryError, LedgerError
from worker.domain.model import (
    HOLDS_ONE_CODES,
    DeadMessageKind,
    Verdict,
    code_meaning,
    describe_error,
)

if TYPE_CHECKING:
    from worker.config import Settings

# -- the unknown-outcome rule ---------------------------------------------------------------

#: Transport failures that happen before the request is written: it never reached Capillary.
#: (``tls_error`` is a refused certificate; any other TLS failure is ``tls_dropped``: unknown.)
NOT_SENT_FAILURES = frozenset({"connection_refused", "connect_timeout", "tls_error"})


def classify_entry_error(code: int | None, message: str = "") -> Verdict:
    """The verdict for one ``errors[]`` entry of a bulk-issue answer, from the domain's table
    of codes (``worker.domain.model.CAPILLARY_CODES``).

    A code we do not know is permanent, so that a person looks at it instead of the worker
    hammering the API.
    """
    return code_meaning(code, message).verdict


def classify_unanswered(status: int) -> Verdict:
    """The verdict for every series of a call whose HTTP answer has no readable entry.

    Only answers that refuse the request before the application acts prove "not issued":
    429 (throttled at the door), 421 and 425 (misdirected, or too early: not processed, try
    again), 401/403/407 (not authenticated, by Capillary or by a proxy on the way), another
    4xx (the request itself is rejected). Any 5xx, with a JSON error body or an HTML page or
    nothing, a 408 (a gateway that gave up waiting, perhaps after forwarding), and a 2xx or
    3xx without readable entries, is unknown: a gateway, a crash after the write or a timeout
    inside Capillary all answer that way after the coupon exists.
    """
    if status in (429, 421, 425):
        return Verdict.RETRYABLE
    if status in (401, 403, 407):
        return Verdict.OUTAGE
    if 400 <= status < 500 and status != 408:
        return Verdict.PERMANENT
    return Verdict.AMBIGUOUS


#: A client setting that fails every call before anything is sent (an unreadable CA bundle).
CLIENT_CONFIG = "client_config"


def classify_transport(failure: str) -> Verdict:
    """The verdict for a call that got no HTTP answer at all.

    A refused connection, a connect timeout or a refused certificate happen before a byte of
    the request is sent; a reset, a read timeout, a broken TLS stream or anything else after
    sending is unknown. A client that cannot send at all is an outage: the circuit pauses
    issuance until the configuration is fixed.
    """
    if failure == CLIENT_CONFIG:
        return Verdict.OUTAGE
    return Verdict.RETRYABLE if failure in NOT_SENT_FAILURES else Verdict.AMBIGUOUS


def counts_toward_circuit(verdict: Verdict, status: int | None) -> bool:
    """Whether a call-level failure says something about Capillary's health.

    Transport failures, 5xx and auth failures do; a 4xx that rejects one request is about that
    request (a bad event), and five bad events in a row must not pause all issuance.
    """
    if verdict is Verdict.OUTAGE:
        return True
    if status is None:
        return verdict in (Verdict.AMBIGUOUS, Verdict.RETRYABLE)
    return status >= 500


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordIssued:
    """The coupon exists: record it and close the entity."""


@dataclass(frozen=True)
class ScheduleRetry:
    """Try again after ``delay``; reconcile first when the last outcome was ambiguous."""

    delay: timedelta
    reconcile_first: bool


@dataclass(frozen=True)
class DeadLetter:
    """Give up: a person decides (replay or discard). ``reconcile_first`` is kept for replay."""

    reason: str
    reconcile_first: bool
    code: str | None = None  # overrides the last error code in listings (unknown_outcome)


#: Capillary's refusals of another coupon of a series to the same customer (709 "user already
#: has a coupon", 5002 "max coupons per user", 5004 "only one coupon allowed per user"): the
#: domain's table says which.
ONE_PER_CUSTOMER_CODES = HOLDS_ONE_CODES


def refusal_reason(error_code: str | None) -> str:
    """A dead letter's reason for Capillary's refusal, with the code's meaning from the
    domain's table: ``refused by Capillary (712 series/campaign expired)``."""
    if error_code is None:
        return "refused by Capillary"
    return f"refused by Capillary ({describe_error(error_code)})"


@dataclass(frozen=True)
class HeldCoupon:
    """A coupon of the series the customer holds, as a read-back showed it."""

    code: str
    issued_at: datetime | None


def refused_holding(error_code: str, held: list[HeldCoupon]) -> DeadLetter:
    """The dead letter of a re-send after an unknown outcome, refused because the customer
    already holds a coupon of the series, when the read-back shows none of them is ours.

    The customer's coupons are in the reason, so support sees them without opening
    Capillary; a replay still reads back first.
    """
    if held:
        shown = ", ".join(
            h.code + (f" (issued {h.issued_at.isoformat(timespec='seconds')})"
                      if h.issued_at else "") for h in held[:5])
        more = f" and {len(held) - 5} more" if len(held) > 5 else ""
        found = (f"the read-back shows the customer's coupon {shown}{more} of this series, "
                 "not ours (its notes lack this event's reference)")
    else:
        found = "the read-back shows no coupon of this series for the customer"
    return DeadLetter(
        f"{refusal_reason(error_code)}, after an earlier attempt whose outcome stayed unknown: "
        f"{found}", reconcile_first=True)


def refused_after_unknown(decision: Decision, error_code: str | None, *,
                          after_unknown: bool) -> Decision:
    """``decision``, its dead-letter reason telling of an earlier unknown outcome if any.

    When the entity's earlier attempt had an unknown outcome and the read-back found nothing of
    ours, yet Capillary refuses the re-send because the customer already holds a coupon of the
    series, that coupon may be the earlier attempt's (a read-back lagging beyond the settle
    window). The worker reads the customer's coupons back (``refused_holding``); this is the
    reason when that read-back fails too.
    """
    if not (after_unknown and isinstance(decision, DeadLetter)
            and error_code in ONE_PER_CUSTOMER_CODES):
        return decision
    return replace(decision, reason=f"{decision.reason}, after an earlier attempt whose outcome "
                   "stayed unknown, and the read-back of the customer's coupons failed (the "
                   "customer's coupon may be that attempt's: a replay reads back first)",
                   reconcile_first=True)


#: The listing code of an entity whose outcome the ledger refused to store.
OUTCOME_UNRECORDABLE = "outcome_unrecordable"


def unrecordable(outcome: str, error: str) -> DeadLetter:
    """What to do when the ledger refuses to store an attempt's outcome.

    Not an outage (those are requeued): PostgreSQL refused the statement itself, and would
    refuse it again, so left in flight the entity would come back through its lease, be read
    back, and fail to record once more, for ever. It is dead-lettered instead, with what
    Capillary answered (``outcome``: a coupon code, say) and the refusal, and is read back
    first if replayed: the coupon may exist even though the ledger could not keep it.
    """
    return DeadLetter(
        reason=f"the ledger refused to record this attempt's outcome ({outcome}): {error}; "
               "Capillary may hold a coupon for it: check before replaying (a replay reads "
               "back first)",
        reconcile_first=True, code=OUTCOME_UNRECORDABLE)


@dataclass(frozen=True)
class Defer:
    """Capillary or our configuration is broken: wait for the circuit without spending attempts."""

    delay: timedelta


@dataclass(frozen=True)
class RecordDuplicate:
    """The read-back shows more than one of our coupons: record them all, flag for a person."""


Decision = RecordIssued | RecordDuplicate | ScheduleRetry | DeadLetter | Defer

#: The dead reason of an entity whose outcome could not be settled by read-back.
UNKNOWN_OUTCOME = "unknown_outcome"


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts an entity gets and how long it waits between them."""

    max_attempts: int = 8
    base_s: float = 2.0
    max_s: float = 900.0
    reconcile_delay_s: float = 2.0
    settle_window_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            base_s=settings.retry_base_s,
            max_s=settings.retry_max_s,
            reconcile_delay_s=settings.reconcile_delay_s,
            settle_window_s=settings.settle_window_s,
        )

    def backoff(self, attempt: int, *, retry_after_s: float | None = None,
                rng: random.Random | None = None) -> timedelta:
        """Full-jitter exponential backoff after ``attempt`` attempts, never below Retry-After.

        Full jitter (a uniform draw between 0 and the exponential ceiling) spreads a fleet's
        retries out instead of synchronising them into waves.
        """
        ceiling = min(self.max_s, self.base_s * (2 ** max(attempt - 1, 0)))
        draw = (rng or random).uniform(0.0, ceiling)
        delay = max(draw, retry_after_s or 0.0)
        return timedelta(seconds=min(delay, max(self.max_s, retry_after_s or 0.0)))

    def decide(self, verdict: Verdict, *, attempts: int, retry_after_s: float | None = None,
               circuit_open_s: float = 30.0, rng: random.Random | None = None,
               error_code: str | None = None) -> Decision:
        """What to do with an entity after its ``attempts``-th attempt ended with ``verdict``
        (``error_code``: the code that said so, for a refusal's reason)."""
        if verdict is Verdict.ISSUED:
            return RecordIssued()
        if verdict is Verdict.OUTAGE:
            return Defer(timedelta(seconds=circuit_open_s))
        if verdict is Verdict.PERMANENT:
            return DeadLetter(refusal_reason(error_code), reconcile_first=False)
        ambiguous = verdict is Verdict.AMBIGUOUS
        if attempts >= self.max_attempts:
            if ambiguous:
                return DeadLetter(
                    f"{UNKNOWN_OUTCOME}: still unknown after {attempts} attempts "
                    "(a person checks Capillary; replay reads back before sending)",
                    reconcile_first=True, code=UNKNOWN_OUTCOME,
                )
            return DeadLetter(f"gave up after {attempts} attempts", reconcile_first=False)
        delay = self.backoff(attempts, retry_after_s=retry_after_s, rng=rng)
        if ambiguous:
            # Read-back APIs may lag the write a little; give the coupon time to show up.
            delay = max(delay, timedelta(seconds=self.reconcile_delay_s))
        return ScheduleRetry(delay, reconcile_first=ambiguous)

    def after_read_back(self, ours: int, *, settled: bool, settles_in_s: float,
                        attempts: int) -> Decision | None:
        """What a read-back that found ``ours`` coupons of this entity decides.

        None means "not issued, send now": nothing of ours is there and the original call can
        no longer land. While it still can, the entity waits (without spending an attempt)
        until the window is over and reads back again.
        """
        if ours > 1:
            return RecordDuplicate()
        if ours == 1:
            return RecordIssued()
        if settled:
            return None
        return Defer(timedelta(seconds=max(settles_in_s, self.reconcile_delay_s)))

    def read_back_failed(self, verdict: Verdict, *, attempts: int,
                         retry_after_s: float | None = None, circuit_open_s: float = 30.0,
                         rng: random.Random | None = None) -> Decision:
        """A read-back that proved nothing: the outcome stays unknown, never re-sent blindly."""
        if verdict is Verdict.OUTAGE:
            return Defer(timedelta(seconds=circuit_open_s))
        return self.decide(Verdict.AMBIGUOUS, attempts=attempts, retry_after_s=retry_after_s,
                           rng=rng)

    def throttled(self, attempts: int, *, retry_after_s: float | None,
                  rng: random.Random | None = None) -> Defer:
        """A 429: wait at least Retry-After; the attempt is not spent."""
        return Defer(self.backoff(attempts, retry_after_s=retry_after_s, rng=rng))

    def deferred(self, delay: timedelta, *, rng: random.Random | None = None) -> Defer:
        """Wait ``delay`` for the circuit or the rate limit, without spending the attempt.

        Spread over ``DEFER_JITTER_S`` more, so that the entities one open circuit deferred do
        not all come due, and hit Capillary, in the same instant.
        """
        return Defer(delay + timedelta(seconds=(rng or random).uniform(0.0, DEFER_JITTER_S)))


    def throttle_penalty_s(self, retry_after_s: float | None) -> float:
        """How long the whole fleet holds its calls after a 429: Retry-After, else the base."""
        return retry_after_s or self.base_s


#: The spread added to every deferral (see ``RetryPolicy.deferred``).
DEFER_JITTER_S = 5.0


@dataclass(frozen=True)
class CircuitPolicy:
    """When the fleet stops calling Capillary, and for how long."""

    failure_threshold: int = 5
    open_s: float = 30.0
    max_open_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> CircuitPolicy:
        return cls(
            failure_threshold=settings.circuit_failure_threshold,
            open_s=settings.circuit_open_s,
            max_open_s=max(settings.circuit_open_s, 600.0),
        )

    def opens_after(self, verdict: Verdict, consecutive_failures: int) -> bool:
        """Whether this failure opens the circuit (outages open it at once)."""
        if verdict is Verdict.OUTAGE:
            return True
        return consecutive_failures >= self.failure_threshold

    def open_for(self, times_opened_in_a_row: int) -> timedelta:
        """Longer pauses while probes keep failing, so a long outage is not hammered."""
        seconds = self.open_s * (2 ** max(times_opened_in_a_row - 1, 0))
        return timedelta(seconds=min(seconds, self.max_open_s))

    @staticmethod
    def wait_while_open(open_until: datetime | None, now: datetime) -> timedelta:
        """How long entities that met an open circuit wait: until it half-opens."""
        return max((open_until or now) - now, timedelta(0))

    @staticmethod
    def after_failed_read_back(verdict: Verdict, status: int | None, *,
                               probe: bool) -> Literal["failure", "success", "nothing"]:
        """What a read-back that failed tells the circuit.

        An outage is a failure whoever saw it. A probe must settle the circuit either way, or
        the fleet stays paused until the probe times out: a failure when the answer says
        something about Capillary's health, a success when Capillary answered, if not usefully.
        """
        if verdict is Verdict.OUTAGE or (probe and counts_toward_circuit(verdict, status)):
            return "failure"
        return "success" if probe else "nothing"



@dataclass(frozen=True)
class WaitForSlot:
    """Call Capillary after ``wait_s``: the rate limit's next slot is that close."""

    wait_s: float


def rate_limit_slot(wait_s: float, *, max_wait_s: float) -> WaitForSlot | Defer:
    """Wait for a reserved rate-limit slot, or give it back and defer the entities.

    A slot further than ``max_wait_s`` away would hold a pool process idle (and its claims'
    leases running) for nothing: the entities wait in the ledger instead, attempt not spent.
    """
    if wait_s > max_wait_s:
        return Defer(timedelta(seconds=wait_s))
    return WaitForSlot(wait_s)


def retries_to_dispatch(*, circuit_state: str, open_until: datetime | None, now: datetime,
                        batch: int) -> int:
    """How many due retries the sweeper may dispatch now: the one-probe rule.

    Closed: a batch. Open: none while the pause lasts; once it is over, exactly one, which is
    the probe whose answer closes or re-opens the circuit. Half-open (a probe is out): none.
    """
    if circuit_state == "closed":
        return batch
    pause_over = open_until is None or now >= open_until
    return 1 if (circuit_state == "open" and pause_over) else 0


# -- the runtime: requeues, pauses, back-pressure, publishing --------------------------------

#: How long a task waits before putting back a message it could not record anything about
#: because the ledger is down or stalled: it slows the redelivery loop for the seconds the
#: sweeper needs to notice and pause consumers.
LEDGER_DOWN_PAUSE_S = 1.0


@dataclass(frozen=True)
class Requeue:
    """Put the message back on its queue after ``pause_s``: nothing about it is recorded."""

    pause_s: float


def requeue(*, ledger_down: bool) -> Requeue:
    """How a task gives its message back when no outcome could be committed.

    A ledger that is down or stalled: after ``LEDGER_DOWN_PAUSE_S``. Out of time (the soft
    limit): at once; claims taken make the redelivery a no-op until their lease runs out.
    """
    return Requeue(LEDGER_DOWN_PAUSE_S if ledger_down else 0.0)


#: The error code an entity waits under while the circuit is open (cleared when an operator
#: closes it by hand: ``worker.usecases.circuit_control``).
CIRCUIT_OPEN_CODE = "circuit_open"


#: A message that fails for a reason not its own waits this long before going back, doubling
#: with each failure up to the cap: a bug or a refusing dependency is not hammered, and the
#: pool process it holds is back to work within seconds.
FAILED_DELIVERY_PAUSE_BASE_S = 0.5
FAILED_DELIVERY_PAUSE_MAX_S = 8.0


@dataclass(frozen=True)
class KeepAsDeadLetter:
    """Stop redelivering the message: keep it, as received, as a dead letter of ``kind``."""

    kind: DeadMessageKind


def failure_kind(error: BaseException) -> DeadMessageKind:
    """Whose fault a failure is, when it is not the message's own bytes (``EventRejected``).

    A dependency that answered with an error (the database refusing a statement, Capillary or
    the broker failing in a way their adapters did not expect) is ``INFRASTRUCTURE``; anything
    else is a bug of ours, ``INTERNAL_ERROR``. Neither ever makes the message a rejection.
    """
    if isinstance(error, LedgerError | CapillaryError | BrokerUnavailable):
        return DeadMessageKind.INFRASTRUCTURE
    return DeadMessageKind.INTERNAL_ERROR


def after_failed_delivery(failures: int, error: BaseException, *,
                          limit: int) -> Requeue | KeepAsDeadLetter:
    """What to do with a message whose ``failures``-th delivery failed for a reason not its
    own: put it back after a growing pause, or, at ``limit``, keep it as a dead letter."""
    if failures >= limit:
        return KeepAsDeadLetter(failure_kind(error))
    pause_s = FAILED_DELIVERY_PAUSE_BASE_S * 2 ** max(failures - 1, 0)
    return Requeue(min(pause_s, FAILED_DELIVERY_PAUSE_MAX_S))


QueueRole = Literal["tasks", "retry"]


@dataclass(frozen=True)
class ConsumptionPause:
    """Which queues a worker should stop consuming now, and why (``reason`` None: consume).

    Messages stay in RabbitMQ meanwhile. The bus (``coupons.events``) is never paused: the
    bridge only forwards, and its back-pressure holds what the task queue cannot take.
    """

    reason: str | None = None
    roles: frozenset[QueueRole] = frozenset()

    @property
    def paused(self) -> bool:
        return bool(self.roles)


CONSUME = ConsumptionPause()


def consumption_for_circuit(*, circuit_state: str, reason: str | None,
                            open_until: datetime | None, now: datetime) -> ConsumptionPause:
    """While the circuit's pause lasts, fresh events wait in RabbitMQ.

    Retries keep being consumed: the sweeper dispatches none while the circuit is open but the
    probe, and the probe must run.
    """
    if circuit_state != "closed" and open_until is not None and now < open_until:
        return ConsumptionPause(f"circuit {circuit_state}: {reason}", frozenset({"tasks"}))
    return CONSUME


def consumption_for_ledger_down(error: str) -> ConsumptionPause:
    """The database is down: nothing can be claimed or recorded, so no queue is consumed."""
    return ConsumptionPause(f"database unavailable: {error}", frozenset({"tasks", "retry"}))


#: Tasks allowed to wait per pool slot before the bridge stops forwarding bus messages.
BACKLOG_PER_SLOT = 16
BACKLOG_MIN = 32


def bridge_high_water(pool_processes: int | None) -> int:
    """How many task messages may wait before the bridge holds bus messages instead.

    Forwarding is cheap and the pool is not: without a mark, a bus backlog is copied into the
    task queue as fast as the main loop can publish, and that loop also feeds the pool.
    """
    return max(BACKLOG_PER_SLOT * (pool_processes or 1), BACKLOG_MIN)


def bridge_room(high_water: int, waiting: int) -> int:
    """How many bus messages the bridge may forward with ``waiting`` task messages queued."""
    return max(high_water - waiting, 0)


#: kombu's retry of one publish on a broker error, for every publish of ours and for Celery's
#: ``task_publish_retry_policy``: about 5 s in all, then ``BrokerUnavailable``.
PUBLISH_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}
