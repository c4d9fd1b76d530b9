"""Every retry, backoff, dead-letter and pause decision about an entity lives here.

Handlers report a ``Verdict`` per entity (what an answer proves: ``worker.domain.verdicts``)
and this module turns it into a ``Decision``. Precedence for delays: Capillary's Retry-After
(a floor), then the exponential backoff with full jitter, capped by ``retry_max_s``. The
circuit's pauses (``CircuitPolicy``), the rate limit's slots (``rate_limit_slot``) and how many
due retries the sweeper may dispatch (``retries_to_dispatch``, the one-probe rule) are here too.
The policies are plain values: the composition root (``worker.bootstrap``) builds them from
the settings. The runtime's decisions about messages and consumers are in
``worker.domain.runtime_policy``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from worker.domain.model import HOLDS_ONE_CODES, Verdict, describe_error
from worker.domain.verdicts import counts_toward_circuit

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
#: The dead reason of an entity whose attempts ran out, a read-back proving none issued.
NOT_ISSUED = "not_issued"


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts an entity gets and how long it waits between them."""

    max_attempts: int = 8
    base_s: float = 2.0
    max_s: float = 900.0
    reconcile_delay_s: float = 2.0
    settle_window_s: float = 120.0

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
        # Out of attempts, an unknown outcome still gets its read-back, never another send: it
        # settles most of them (the call landed, or provably did not), so that a person checks
        # Capillary only when Capillary cannot say (``after_read_back``, ``read_back_failed``).
        if attempts >= self.max_attempts and not ambiguous:
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
        if settled and attempts > self.max_attempts:
            # The last read-back after the attempts ran out: nothing was issued, so a replay
            # may send again without reading back first.
            return DeadLetter(
                f"gave up after {attempts - 1} attempts: the last one's outcome was unknown, "
                "and the read-back after it shows that nothing of ours was issued",
                reconcile_first=False, code=NOT_ISSUED)
        if settled:
            return None
        return Defer(timedelta(seconds=max(settles_in_s, self.reconcile_delay_s)))

    @property
    def unknown_outcome_floor_s(self) -> float:
        """The least age (since its first attempt) at which failed read-backs give up an
        unknown outcome: the settle window, in which the original may still land, and then the
        longest wait the backoff ever makes (``max_s``), so that the read-backs have failed for
        at least one whole backoff after the coupon could last have appeared."""
        return self.settle_window_s + self.max_s

    def read_back_delay(self, attempts: int, *, retry_after_s: float | None = None,
                        rng: random.Random | None = None) -> timedelta:
        """The wait before reading back again after the ``attempts``-th attempt's read-back
        failed: the exponential backoff with *equal* jitter (a draw between half the ceiling
        and the ceiling), never below ``reconcile_delay_s`` nor Retry-After.

        Full jitter can draw near zero again and again, and one entity's attempts then pass in
        seconds, inside the very outage that made them fail; half the ceiling guarantees that
        the waits double, while the other half still spreads a fleet's read-backs out.
        """
        ceiling = min(self.max_s, self.base_s * (2 ** max(attempts - 1, 0)))
        draw = (rng or random).uniform(ceiling / 2, ceiling)
        delay = min(max(draw, retry_after_s or 0.0), max(self.max_s, retry_after_s or 0.0))
        return timedelta(seconds=max(delay, self.reconcile_delay_s))

    def read_back_failed(self, verdict: Verdict, *, attempts: int, age_s: float,
                         status: int | None = None, retry_after_s: float | None = None,
                         circuit_open_s: float = 30.0,
                         rng: random.Random | None = None) -> Decision:
        """A read-back that proved nothing: the outcome stays unknown, never re-sent blindly.

        ``age_s``: seconds since the entity's first attempt; ``status``: the read-back's HTTP
        status, if it got one. An outage waits for the circuit and a 429 for Retry-After,
        neither spending the attempt (as for a sent call). Any other failure spends it, so
        ``max_attempts`` still bounds the attempts of every kind an entity gets, but an unknown
        outcome is the costliest dead letter (a person must look in Capillary), and a failing
        read-back says that Capillary is unwell, not that the coupon is absent. Hence:

        - the waits between read-backs double at least (``read_back_delay``): eight attempts
          span minutes of an outage (seconds with the defaults of a test), never a burst;
        - once the attempts are spent, the entity is dead (``unknown_outcome``) only when it
          is at least ``unknown_outcome_floor_s`` old. Until then it is read back again each
          backoff without spending an attempt, so a read-back that succeeds still settles it,
          and the first that fails past the floor ends it: it cannot wait for ever.
        """
        if verdict is Verdict.OUTAGE:
            return Defer(timedelta(seconds=circuit_open_s))
        if status == 429:
            return self.throttled(attempts, retry_after_s=retry_after_s, rng=rng)
        if attempts < self.max_attempts:
            return ScheduleRetry(self.read_back_delay(attempts, retry_after_s=retry_after_s,
                                                      rng=rng), reconcile_first=True)
        left_s = self.unknown_outcome_floor_s - age_s
        if left_s <= 0:
            return DeadLetter(
                f"{UNKNOWN_OUTCOME}: still unknown after {attempts} attempts "
                "(a person checks Capillary; replay reads back before sending)",
                reconcile_first=True, code=UNKNOWN_OUTCOME,
            )
        delay = self.read_back_delay(attempts, retry_after_s=retry_after_s, rng=rng)
        return Defer(min(delay, timedelta(seconds=max(left_s, self.reconcile_delay_s))))

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

        The same as a failed call (``counts_toward_circuit``), probe or not: a failure when the
        answer says something about Capillary's health (an outage, no answer, a 5xx), so that
        an outage seen only through read-backs opens the circuit instead of the fleet reading
        back into it. Otherwise (a 4xx, an unreadable 200) Capillary answered: a probe must
        still settle the circuit, or the fleet stays paused until the probe times out.
        """
        if counts_toward_circuit(verdict, status):
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
