"""Every outcome rule and every retry, backoff, dead-letter and pause decision lives here.

Two halves. First, *the unknown-outcome rule*: what an answer from Capillary (or its absence)
proves about each series of a bulk-issue call. A series is "not issued" only when the answer says
so for that series (an entry with errors), or when the request provably never reached
Capillary's application; everything else is *unknown* (``Verdict.AMBIGUOUS``) and is settled by
a read-back before anything is sent again. Second, the decisions: handlers report a ``Verdict``
per entity and this module turns it into a ``Decision``. Precedence for delays: Capillary's
Retry-After (a floor), then the exponential backoff with full jitter, capped by ``retry_max_s``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from worker.domain import Verdict

if TYPE_CHECKING:
    from worker.config import Settings

# -- the unknown-outcome rule ---------------------------------------------------------------

#: Per-entry error codes, from the coupon error table of the API summary. An entry that
#: carries errors is Capillary saying, for that series, that it did not issue.
RETRYABLE_CODES = frozenset(
    {730, 5005, 5006, *range(786, 788), *range(789, 795), *range(796, 799)}
)
#: 748 "coupon service timed out": an entry that admits it does not know.
UNKNOWN_CODES = frozenset({748})
OUTAGE_CODES = frozenset({777, 788, 795, 799})
TRY_AGAIN_CODES = frozenset({722})

#: Transport failures that happen before the request is written: it never reached Capillary.
NOT_SENT_FAILURES = frozenset({"connection_refused", "connect_timeout", "tls_error"})


def classify_entry_error(code: int | None, message: str = "") -> Verdict:
    """The verdict for one ``errors[]`` entry of a bulk-issue answer.

    A code we do not know is permanent, so that a person looks at it instead of the worker
    hammering the API.
    """
    if code is None:
        return Verdict.PERMANENT
    if code in OUTAGE_CODES:
        return Verdict.OUTAGE
    if code in UNKNOWN_CODES:
        return Verdict.AMBIGUOUS
    if code in RETRYABLE_CODES:
        return Verdict.RETRYABLE
    if code in TRY_AGAIN_CODES and "try again" in message.lower():
        return Verdict.RETRYABLE
    return Verdict.PERMANENT


def classify_unanswered(status: int) -> Verdict:
    """The verdict for every series of a call whose HTTP answer has no readable entry.

    Only answers that refuse the request before the application acts prove "not issued":
    429 (throttled at the door), 401/403 (not authenticated), another 4xx (the request itself
    is rejected). Any 5xx, with a JSON error body or an HTML page or nothing, and a 2xx or 3xx
    without readable entries, is unknown: a gateway, a crash after the write or a timeout inside
    Capillary all answer that way after the coupon exists.
    """
    if status == 429:
        return Verdict.RETRYABLE
    if status in (401, 403):
        return Verdict.OUTAGE
    if 400 <= status < 500:
        return Verdict.PERMANENT
    return Verdict.AMBIGUOUS


def classify_transport(failure: str) -> Verdict:
    """The verdict for a call that got no HTTP answer at all.

    A refused connection, a connect timeout or a failed TLS handshake happen before a byte of
    the request is sent; a reset, a read timeout or anything else after sending is unknown.
    """
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
               circuit_open_s: float = 30.0, rng: random.Random | None = None) -> Decision:
        """What to do with an entity after its ``attempts``-th attempt ended with ``verdict``."""
        if verdict is Verdict.ISSUED:
            return RecordIssued()
        if verdict is Verdict.OUTAGE:
            return Defer(timedelta(seconds=circuit_open_s))
        if verdict is Verdict.PERMANENT:
            return DeadLetter("refused by Capillary", reconcile_first=False)
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

