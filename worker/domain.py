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

# -- the entity state machine ---------------------------------------------------------------
# One table, used by the SQL ledger's statements and by the in-memory fake alike.

#: Claimed by a delivery of its event: never attempted. (An ``in_flight`` entity whose lease
#: ran out is claimable by anyone: its worker is gone, and it is reconciled first.)
CLAIMABLE_FRESH = frozenset({EntityState.PENDING})
#: Claimed by a ``coupons.retry`` task: queued by the sweeper or by a replay, or waiting...
CLAIMABLE_FOR_RETRY = frozenset({EntityState.QUEUED, EntityState.RETRY_WAIT})
#: ...where waiting ones are claimable only once their ``next_attempt_at`` has come.
CLAIMABLE_WHEN_DUE = frozenset({EntityState.RETRY_WAIT})
#: The coupon exists (once or, detected afterwards, twice).
ISSUED_STATES = frozenset({EntityState.ISSUED, EntityState.DUPLICATE_ISSUED})
#: What a person may replay (``dlq replay``) and, for a whole event, also what still waits.
REPLAYABLE = frozenset({EntityState.DEAD})
EVENT_REPLAYABLE = frozenset({EntityState.DEAD, EntityState.RETRY_WAIT})
#: What a person may discard (``dlq discard``).
DISCARDABLE = frozenset({EntityState.DEAD})

_S = EntityState
#: Allowed moves, by whom: the claim (-> in_flight, also re-claiming an abandoned one), the
#: recorded outcome of an attempt (in_flight -> issued / retry_wait / dead), the sweeper
#: (lease expiry in_flight -> retry_wait, due retry_wait -> queued, a lost queued message
#: queued -> retry_wait, a second coupon found by verification issued -> duplicate_issued), a
#: person (replay -> queued, discard -> discarded). Not listed: proof that a coupon was issued
#: is recorded whatever the entity's state (``may_record_issued``), because the coupon exists.
TRANSITIONS: dict[EntityState, frozenset[EntityState]] = {
    _S.PENDING: frozenset({_S.IN_FLIGHT}),
    _S.IN_FLIGHT: frozenset({_S.IN_FLIGHT, _S.ISSUED, _S.DUPLICATE_ISSUED, _S.RETRY_WAIT,
                             _S.DEAD}),
    _S.RETRY_WAIT: frozenset({_S.QUEUED, _S.IN_FLIGHT}),
    _S.QUEUED: frozenset({_S.IN_FLIGHT, _S.RETRY_WAIT}),
    _S.ISSUED: frozenset({_S.DUPLICATE_ISSUED}),
    _S.DEAD: frozenset({_S.QUEUED, _S.DISCARDED}),
    _S.DISCARDED: frozenset(),
    _S.DUPLICATE_ISSUED: frozenset(),
}


def may_record_issued(current: EntityState) -> bool:
    """Whether an issued coupon may be recorded on an entity that is not in a claim of ours.

    Always, unless it is already recorded as issued: a late answer or a read-back proving the
    coupon exists must not be lost because the claim moved on meanwhile.
    """
    return current not in ISSUED_STATES


def can_transition(current: EntityState, new: EntityState) -> bool:
    """Whether an entity in ``current`` may move to ``new``."""
    return new in TRANSITIONS[current] or (new in ISSUED_STATES and may_record_issued(current))


class IllegalTransition(ValueError):
    """A move the state machine does not allow: a bug in the ledger, never bad input."""


def check_transition(current: EntityState, new: EntityState) -> EntityState:
    """``new``, when ``current`` may move there; raises ``IllegalTransition`` otherwise."""
    if not can_transition(current, new):
        raise IllegalTransition(f"an entity cannot move from {current} to {new}")
    return new


class EventState(StrEnum):
    """Summary of an event's entities, kept on the event row for quick listing."""

    PROCESSING = "processing"
    COMPLETED = "completed"  # every entity issued or discarded
    FAILED = "failed"  # at rest, with at least one dead entity


class DeadMessageKind(StrEnum):
    """Why a message was kept instead of issued: only ``INVALID`` is the sender's doing."""

    INVALID = "invalid"  # its own bytes: not a valid event (a rejection)
    INTERNAL_ERROR = "internal_error"  # our code failed on it, redelivery after redelivery
    INFRASTRUCTURE = "infrastructure"  # the database or another dependency kept refusing it


DEAD_MESSAGE_KINDS = tuple(k.value for k in DeadMessageKind)


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
    "outcome_unrecordable": "the ledger refused to store the outcome (may have issued)",
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
