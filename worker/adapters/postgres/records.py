"""Plain records that cross the ledger seam (no SQLAlchemy types leak to the services)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.adapters.capillary.api import CallInfo
from worker.domain.model import Coupon, EntityState


@dataclass(frozen=True)
class ClaimedEntity:
    """An entity this worker may now call Capillary for, until ``lease_until``."""

    entity_id: int
    series_id: int
    attempts: int  # including the attempt this claim is for
    needs_reconcile: bool
    first_attempt_at: datetime
    #: Whether an unknown outcome's original call can no longer land (database clock).
    settled: bool = True
    #: Seconds until it settles, when it has not yet.
    settles_in_s: float = 0.0


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it works on (part of) one event."""

    event_id: str
    customer: dict[str, str]
    customer_key: str
    metadata: dict[str, str]
    issue_ref: str
    token: str
    entities: tuple[ClaimedEntity, ...]
    skipped: dict[str, int] = field(default_factory=dict)  # state -> entities not claimed


@dataclass(frozen=True)
class Transition:
    """The new state of one claimed entity after an attempt, and why."""

    entity_id: int
    state: EntityState
    kind: str  # the history entry: issued, reconciled, retry_scheduled, dead, deferred...
    attempt: int
    coupon: Coupon | None = None
    recorded_via: str = "issue"
    next_attempt_at: datetime | None = None
    needs_reconcile: bool = False
    verdict: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    request_id: str | None = None
    dead_reason: str | None = None
    refund_attempt: bool = False  # the attempt did not count (deferred by the circuit)
    #: The outcome is unknown: its original may land for this long (settles_at = now + this).
    settle_window_s: float | None = None
    #: Issued by a re-send after an unknown outcome: read back again after this long.
    verify_window_s: float | None = None
    #: A duplicate: every coupon of ours the read-back showed, beyond ``coupon``.
    extra_coupons: tuple[Coupon, ...] = ()


@dataclass(frozen=True)
class RecordedCall:
    """A Capillary call to store, with the entities it was about."""

    info: CallInfo
    entity_ids: tuple[int, ...]
    series_ids: tuple[int, ...]
    issue_ref: str | None = None  # the attempt's own reference, for bulk issue calls


@dataclass(frozen=True)
class Verification:
    """An issued entity to read back once more, in case a late original landed too."""

    entity_id: int
    event_id: str
    series_id: int
    customer: dict[str, str]
    customer_key: str
    issue_ref: str
    first_attempt_at: datetime
    codes: tuple[str, ...]  # the coupons recorded for it so far
    attempts: int


@dataclass(frozen=True)
class DueEntity:
    """An entity whose retry is due, to be put on the retry queue."""

    entity_id: int
    event_id: str
    series_id: int
    customer_key: str
    attempts: int


@dataclass(frozen=True)
class DeadLetterRecord:
    """What goes on the dead-letter queue for one dead entity or rejected event."""

    kind: str  # "entity" or "rejected_event"
    id: int
    event_id: str | None
    customer_key: str | None
    series_id: int | None
    error_code: str | None
    message: str | None
    attempts: int
    at: datetime | None

    def as_message(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "eventId": self.event_id,
            "customer": self.customer_key,
            "seriesId": self.series_id,
            "errorCode": self.error_code,
            "message": self.message,
            "attempts": self.attempts,
            "at": self.at.isoformat() if self.at else None,
        }


@dataclass(frozen=True)
class CircuitState:
    """The fleet-wide pause switch as last read."""

    state: str  # closed | open | half_open
    consecutive_failures: int
    times_opened: int
    open_until: datetime | None
    reason: str | None

    def is_open(self, now: datetime) -> bool:
        return self.state == "open" and self.open_until is not None and now < self.open_until


CLOSED_CIRCUIT = CircuitState("closed", 0, 0, None, None)
