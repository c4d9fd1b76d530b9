"""Every retry, backoff, dead-letter and pause decision is made here, and only here.

Handlers never decide whether to retry: they report a ``Verdict`` per entity and this module
turns it into a ``Decision``. Precedence for delays: Capillary's Retry-After (a floor), then the
exponential backoff with full jitter, capped by ``retry_max_s``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from worker.domain import Verdict

if TYPE_CHECKING:
    from worker.config import Settings


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


@dataclass(frozen=True)
class Defer:
    """Capillary or our configuration is broken: wait for the circuit without spending attempts."""

    delay: timedelta


Decision = RecordIssued | ScheduleRetry | DeadLetter | Defer


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts an entity gets and how long it waits between them."""

    max_attempts: int = 8
    base_s: float = 2.0
    max_s: float = 900.0
    reconcile_delay_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            base_s=settings.retry_base_s,
            max_s=settings.retry_max_s,
            reconcile_delay_s=settings.reconcile_delay_s,
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
            return DeadLetter(
                f"gave up after {attempts} attempts"
                + (" (outcome unknown: reconcile before replay)" if ambiguous else ""),
                reconcile_first=ambiguous,
            )
        delay = self.backoff(attempts, retry_after_s=retry_after_s, rng=rng)
        if ambiguous:
            # Read-back APIs may lag the write a little; give the coupon time to show up.
            delay = max(delay, timedelta(seconds=self.reconcile_delay_s))
        return ScheduleRetry(delay, reconcile_first=ambiguous)


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


def counts_toward_circuit(verdict: Verdict) -> bool:
    """Failures that say something about Capillary's health, not about one entity."""
    return verdict in (Verdict.RETRYABLE, Verdict.AMBIGUOUS, Verdict.OUTAGE)
