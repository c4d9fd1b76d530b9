"""Pure rules: entity states, what Capillary's answers mean, and the worker's own reference.

No I/O here. An *entity* is one customer x one coupon series of one event: the unit that is
issued, retried, dead-lettered and replayed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
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
#: What waits in the ledger for its next attempt (a retry, or an unknown outcome settling):
#: what a person may make due at once or give up on (making it a dead letter).
WAITING = frozenset({EntityState.RETRY_WAIT})

_S = EntityState
#: Allowed moves, by whom: the claim (-> in_flight, also re-claiming an abandoned one), the
#: recorded outcome of an attempt (in_flight -> issued / retry_wait / dead), the sweeper
#: (lease expiry in_flight -> retry_wait, due retry_wait -> queued, a lost queued message
#: queued -> retry_wait, a second coupon found by verification issued -> duplicate_issued), a
#: person (replay -> queued, discard -> discarded, giving up on a waiting one -> dead). Not
#: listed: proof that a coupon was issued is recorded whatever the entity's state
#: (``may_record_issued``), because the coupon exists.
TRANSITIONS: dict[EntityState, frozenset[EntityState]] = {
    _S.PENDING: frozenset({_S.IN_FLIGHT}),
    _S.IN_FLIGHT: frozenset({_S.IN_FLIGHT, _S.ISSUED, _S.DUPLICATE_ISSUED, _S.RETRY_WAIT,
                             _S.DEAD}),
    _S.RETRY_WAIT: frozenset({_S.QUEUED, _S.IN_FLIGHT, _S.DEAD}),
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


def event_state(entity_states: Iterable[EntityState]) -> EventState:
    """An event's summary from its entities' states: ``processing`` while one is not at rest,
    ``failed`` at rest with a dead one, ``completed`` otherwise. (The ledger computes it in
    SQL from the same sets: ``worker.adapters.postgres.hot_path.event_state_sql``.)"""
    states = set(entity_states)
    if states - TERMINAL_STATES:
        return EventState.PROCESSING
    if EntityState.DEAD in states:
        return EventState.FAILED
    return EventState.COMPLETED


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
    #: What Capillary's answer warned of for this series, as text.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class EntryError:
    """Capillary's one error shape, from the client to the ledger: an entry's error as Capillary
    reported it, a call's (the transport's failure, a call-level error, the first entry's), a
    configuration or auth error that pauses the fleet. ``code`` is what the ledger stores
    (``entities.last_error_code``, ``api_calls.error_code``) and what the command line and the
    console describe (``describe_error``)."""

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


@dataclass(frozen=True)
class CodeMeaning:
    """What one of Capillary's documented error codes means, written once for every reader.

    ``verdict`` is the classifier's reading of an entry carrying the code; ``holds_one`` says
    the code is Capillary refusing because the customer already holds a coupon of the series
    (after an unknown outcome, that coupon may be ours: it is read back, never guessed).
    ``try_again_retryable`` makes the code retryable when its message says to try again.
    """

    meaning: str
    verdict: Verdict
    holds_one: bool = False
    try_again_retryable: bool = False


_P, _R, _A, _O = Verdict.PERMANENT, Verdict.RETRYABLE, Verdict.AMBIGUOUS, Verdict.OUTAGE
_TRY_LATER = CodeMeaning("processing failed, try again later", _R)

#: Capillary's coupon error codes (the API summary's table), the only place they are read.
CAPILLARY_CODES: dict[int, CodeMeaning] = {
    701: CodeMeaning("customer not found", _P),
    707: CodeMeaning("invalid series id", _P),
    709: CodeMeaning("coupon processing failed (e.g. the customer already holds one)", _P,
                     holds_one=True),
    712: CodeMeaning("series/campaign expired", _P),
    713: CodeMeaning("coupon expired", _P),
    714: CodeMeaning("campaign over", _P),
    721: CodeMeaning("invalid customer", _P),
    722: CodeMeaning("unable to create coupon", _P, try_again_retryable=True),
    730: CodeMeaning("unknown error", _R),
    740: CodeMeaning("fraud customer", _P),
    742: CodeMeaning("issue blocked for customer", _P),
    # The coupon service timed out: an entry that admits it does not know.
    748: CodeMeaning("coupon service timed out (may have issued)", _A),
    750: CodeMeaning("fraud customer", _P),
    # Configuration: every call would fail alike, so the fleet pauses instead of
    # dead-lettering each entity.
    777: CodeMeaning("coupon source not valid (configuration)", _O),
    **{code: _TRY_LATER for code in (786, 787, 789, 790, 791, 792, 793, 794, 796, 797, 798)},
    788: CodeMeaning("invalid configuration", _O),
    795: CodeMeaning("invalid configuration", _O),
    799: CodeMeaning("invalid configuration", _O),
    5001: CodeMeaning("max series created", _P),
    5002: CodeMeaning("max coupons per user (the customer already holds the maximum)", _P,
                      holds_one=True),
    5004: CodeMeaning("one coupon per user (the customer already holds one)", _P,
                      holds_one=True),
    5005: CodeMeaning("series code queue empty", _R),
    5006: CodeMeaning("unable to issue number", _R),
}

#: The codes that say "the customer already holds a coupon of this series", as listed codes.
HOLDS_ONE_CODES = frozenset(str(c) for c, m in CAPILLARY_CODES.items() if m.holds_one)
#: The codes that pause the fleet wherever they appear (an entry, a call-level error body).
CONFIGURATION_CODES = frozenset(c for c, m in CAPILLARY_CODES.items() if m.verdict is _O)


def code_meaning(code: int | None, message: str = "") -> CodeMeaning:
    """The meaning of a code; one we do not know (or none) is a permanent refusal, so that a
    person looks at it instead of the worker hammering the API."""
    known = CAPILLARY_CODES.get(code) if code is not None else None
    if known is None:
        return CodeMeaning("not in Capillary's documented table", _P)
    if known.try_again_retryable and "try again" in message.lower():
        return CodeMeaning(known.meaning, _R)
    return known


#: The codes the answer parser gives a series whose entries broke an assumption about
#: Capillary (each is unknown: read back before anything is sent again).
COUNTS_DISAGREE = "counts_disagree"
CONFLICTING_ENTRIES = "conflicting_entries"
MISSING_ENTRY = "missing_entry"
EMPTY_ENTRY = "empty_entry"
ODD_ENTRY_CODES = frozenset({COUNTS_DISAGREE, CONFLICTING_ENTRIES, MISSING_ENTRY, EMPTY_ENTRY})

#: The worker's own codes, for what no Capillary code says.
WORKER_CODES: dict[str, str] = {
    "read_timeout": "no answer in time (may have issued)",
    "connection_reset": "connection dropped (may have issued)",
    "connection_refused": "could not connect",
    "reconcile_failed": "read-back failed",
    "unknown_outcome": "outcome unknown; read-back could not settle it",
    "not_issued": "attempts spent; a read-back proved nothing issued (a replay sends again)",
    "outcome_unrecordable": "the ledger refused to store the outcome (may have issued)",
    "duplicate_issued": "two of our coupons for one entity (late original)",
    "settling": "waiting for a possible late original",
    "empty_entry": "entry without coupon or error",
    "missing_entry": "answer had no entry",
    "counts_disagree": "totalCount/failureCount disagree with the entries (read back)",
    "conflicting_entries": "repeated entries for one series disagree (read back)",
}

#: Every code a listing may show, with its meaning (Capillary's, then the worker's own).
ERROR_MEANINGS: dict[str, str] = {
    **{str(code): m.meaning for code, m in CAPILLARY_CODES.items()},
    **WORKER_CODES,
}


def describe_error(code: str | None) -> str:
    """``712 series/campaign expired``: a code with its meaning, for tables."""
    if code is None:
        return "-"
    meaning = ERROR_MEANINGS.get(code)
    if meaning is None and code.startswith("http_"):
        meaning = f"HTTP {code[5:]}"
    return f"{code} {meaning}" if meaning else code
