"""Pure rules: entity states, what Capillary's answers mean, and the worker's own reference.

No I/O here. An *entity* is one customer x one coupon series of one event: the unit that is
issued, retried, dead-lettered and replayed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from random import Random
from typing import Any


class EntityState(StrEnum):
    """Where one entity stands. Only ``issued``, ``dead`` and ``discarded`` are at rest."""

    PENDING = "pending"  # known, never attempted
    IN_FLIGHT = "in_flight"  # claimed by a worker that is calling Capillary (has a lease)
    RETRY_WAIT = "retry_wait"  # waits in the ledger until next_attempt_at
    QUEUED = "queued"  # due, and a message for it is on the retry queue
    ISSUED = "issued"
    DEAD = "dead"  # needs a person: replay or discard
    DISCARDED = "discarded"  # closed by a person without issuing
    # A late original landed after a re-send: the customer holds two of our coupons for this
    # entity. Both are recorded; a person decides what to do about the extra one.
    DUPLICATE_ISSUED = "duplicate_issued"


TERMINAL_STATES = frozenset({
    EntityState.ISSUED, EntityState.DEAD, EntityState.DISCARDED, EntityState.DUPLICATE_ISSUED,
})


class EventState(StrEnum):
    """Summary of an event's entities, kept on the event row for quick listing."""

    PROCESSING = "processing"
    COMPLETED = "completed"  # every entity issued or discarded
    FAILED = "failed"  # at rest, with at least one dead entity


class Verdict(StrEnum):
    """What an answer from Capillary (or its absence) means for one entity."""

    ISSUED = "issued"
    RETRYABLE = "retryable"  # certainly not processed: safe to send again
    PERMANENT = "permanent"  # refused for good: dead letter
    AMBIGUOUS = "ambiguous"  # may have been processed: reconcile before sending again
    OUTAGE = "outage"  # credentials / configuration / service down: pause everything


@dataclass(frozen=True)
class Coupon:
    """One coupon as Capillary issued it; timestamps are timezone-aware."""

    code: str
    series_id: int
    capillary_id: int | None = None
    description: str | None = None
    discount_code: str | None = None
    discount_type: str | None = None
    discount_value: Decimal | None = None
    discount_upto: Decimal | None = None
    discount_on: str | None = None
    valid_till: datetime | None = None
    valid_till_date_time: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EntryError:
    """One error of one entry, as Capillary reported it (or as the transport failed)."""

    code: str
    message: str
    verdict: Verdict


ISSUE_REF_PREFIX = "cw:"
ISSUE_REF_HEX_CHARS = 16


def issue_ref(event_id: str) -> str:
    """The worker's own reference for an event, sent in the issue metadata.

    Read-back APIs return the metadata stored at issue time, so a coupon carrying this
    reference (plus the series) is provably ours: that is how an ambiguous call is reconciled.
    """
    digest = hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:ISSUE_REF_HEX_CHARS]
    return f"{ISSUE_REF_PREFIX}{digest}"


def attempt_ref(event_ref: str, rng: Random) -> str:
    """One attempt's reference: the event's, then a short random part of its own."""
    return f"{event_ref}.{rng.getrandbits(24):06x}"


NOTES_MAX_CHARS = 250


def notes_with_ref(notes: str | None, ref: str) -> str:
    """Append the reference to the caller's notes, shortening them to stay within 250 chars."""
    suffix = f"[{ref}]"
    if not notes:
        return suffix
    room = NOTES_MAX_CHARS - len(suffix) - 1
    if len(notes) > room:
        notes = notes[: room - 1] + "\u2026"
    return f"{notes} {suffix}"


ERROR_MEANINGS: dict[str, str] = {
    "701": "customer not found",
    "707": "invalid series id",
    "709": "coupon processing failed",
    "712": "series/campaign expired",
    "713": "coupon expired",
    "714": "campaign over",
    "721": "invalid customer",
    "722": "unable to create coupon",
    "730": "unknown error",
    "740": "fraud customer",
    "742": "issue blocked for customer",
    "748": "coupon service timed out",
    "750": "fraud customer",
    "777": "coupon source not valid",
    "788": "invalid configuration",
    "795": "invalid configuration",
    "799": "invalid configuration",
    "5001": "max series created",
    "5002": "max coupons per user",
    "5004": "one coupon per user",
    "5005": "series code queue empty",
    "5006": "unable to issue number",
    "read_timeout": "no answer in time (may have issued)",
    "connection_reset": "connection dropped (may have issued)",
    "connection_refused": "could not connect",
    "reconcile_failed": "read-back failed",
    "unknown_outcome": "outcome unknown; read-back could not settle it",
    "duplicate_issued": "two of our coupons for one entity (late original)",
    "settling": "waiting for a possible late original",
    "empty_entry": "entry without coupon or error",
    "missing_entry": "answer had no entry",
}


def describe_error(code: str | None) -> str:
    """``712 series/campaign expired``: a code with its meaning, for tables."""
    if code is None:
        return "-"
    meaning = ERROR_MEANINGS.get(code)
    if meaning is None and code.startswith("http_"):
        meaning = f"HTTP {code[5:]}"
    return f"{code} {meaning}" if meaning else code
