"""The inbound loyalty event: its schema and the one place where bad input is turned away.

A message is decoded here whatever way it came in (plain JSON on the bus, a Celery task, the
CLI). Anything that is not a valid event raises ``EventRejected`` with a precise reason, so the
caller can store the raw payload beside that reason and acknowledge the message.

Valid JSON is not enough: an event must also fit the ledger. PostgreSQL refuses NUL characters
and lone surrogates in text, the series columns are 32-bit, and a deeply nested body makes the
JSON parser raise ``RecursionError``. Each of these is a rejection with its own reason here,
never an error further down where the message would be lost.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.domain.errors import EventRejected
from worker.domain.text import codepoint, first_lone_surrogate, printable

EVENT_ID_MAX_CHARS = 128
SHORT_METADATA_MAX_CHARS = 50
LONG_METADATA_MAX_CHARS = 250
#: An event with more series than a call takes is issued in several calls
#: (``CAPILLARY_MAX_SERIES_PER_CALL``); this bounds one event's claim and statements.
MAX_SERIES_PER_EVENT = 1000
# The ledger's series columns are PostgreSQL integers.
SERIES_ID_MAX = 2**31 - 1
# An event is three levels deep; this leaves room for producers' extra fields while keeping the
# parser far from the interpreter's recursion limit.
MAX_JSON_DEPTH = 32
TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
# A reason quotes the sender's keys: bounded, so one message cannot make a megabyte reason.
MAX_REASON_CHARS = 2000
MAX_PROBLEMS = 10
LOC_PART_MAX_CHARS = 64


def _storable(value: object) -> object:
    """Refuse text PostgreSQL cannot store, naming the character (runs before str parsing)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"contains a NUL character ({codepoint(chr(0))}), "
                             "which cannot be stored")
        surrogate = first_lone_surrogate(value)
        if surrogate is not None:
            raise ValueError(f"contains a lone surrogate ({codepoint(surrogate)}), "
                             "which is not valid Unicode")
    return value


def _storable_keys(data: object) -> object:
    """Refuse object keys PostgreSQL cannot store, before pydantic reads them as text."""
    if isinstance(data, dict):
        for key in data:
            try:
                _storable(key)
            except ValueError as exc:
                raise ValueError(f"key {printable(str(key), limit=LOC_PART_MAX_CHARS)} "
                                 f"{exc}") from None
    return data


class _Storable(BaseModel):
    """Every text field and key of an event must be storable in PostgreSQL."""

    @model_validator(mode="before")
    @classmethod
    def _keys_fit_the_ledger(cls, data: object) -> object:
        return _storable_keys(data)

    @field_validator("*", mode="before")
    @classmethod
    def _text_fits_the_ledger(cls, value: object) -> object:
        return _storable(value)


class Customer(_Storable):
    """Who gets the coupons: at least one identifier, as Capillary accepts them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=64)
    mobile: str | None = Field(None, min_length=1, max_length=32)
    email: str | None = Field(None, min_length=3, max_length=254)
    externalId: str | None = Field(None, min_length=1, max_length=128)

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: object) -> object:
        # Loyalty platforms send customer ids both as numbers and strings; Capillary treats them
        # as text. Booleans are not ids even though Python counts them as ints.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @model_validator(mode="after")
    def _one_identifier(self) -> Customer:
        if not (self.id or self.mobile or self.email or self.externalId):
            raise ValueError("customer needs at least one of id, mobile, email, externalId")
        return self

    @property
    def key(self) -> str:
        """A stable, searchable label: ``id:566881933``, ``mobile:...``."""
        for name in ("id", "mobile", "email", "externalId"):
            value = getattr(self, name)
            if value:
                return f"{name}:{value}"
        raise AssertionError("validated customer has an identifier")

    def as_api(self) -> dict[str, str]:
        """The customer object as the bulk-issue body wants it."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Metadata(_Storable):
    """Issue metadata, with Capillary's own length limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sourceType: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    sourceId: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    sourceActivity: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    notes: str | None = Field(None, max_length=LONG_METADATA_MAX_CHARS)
    reason: str | None = Field(None, max_length=LONG_METADATA_MAX_CHARS)


class LoyaltyEvent(_Storable):
    """"Give this customer these coupon series", keyed by ``eventId`` for idempotency."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    eventId: str = Field(min_length=1, max_length=EVENT_ID_MAX_CHARS)
    eventType: str = Field("CouponIssueRequested", min_length=1, max_length=64)
    occurredAt: datetime | None = None
    customer: Customer
    seriesIds: tuple[StrictInt, ...] = Field(min_length=1)
    metadata: Metadata = Field(default_factory=Metadata)

    @field_validator("eventId")
    @classmethod
    def _printable_key(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("eventId must be printable with no leading or trailing spaces")
        return value

    @field_validator("occurredAt")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("occurredAt needs a time zone, e.g. 2026-11-25T10:00:00Z")
        return value

    @field_validator("seriesIds", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise ValueError("must be a JSON array of positive integers")
        if not value:
            raise ValueError("must list at least one series id")
        return value

    @field_validator("seriesIds")
    @classmethod
    def _positive_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(series_id <= 0 for series_id in value):
            raise ValueError("every series id must be a positive integer")
        too_big = next((series_id for series_id in value if series_id > SERIES_ID_MAX), None)
        if too_big is not None:
            raise ValueError(f"series id {too_big} is above {SERIES_ID_MAX}, the largest "
                             "series id the ledger stores")
        unique = tuple(dict.fromkeys(value))
        if len(unique) > MAX_SERIES_PER_EVENT:
            raise ValueError(f"at most {MAX_SERIES_PER_EVENT} distinct series per event")
        return unique

    def to_message(self) -> dict[str, Any]:
        """The event as JSON-ready data (what producers publish and the ledger stores)."""
        return self.model_dump(mode="json", exclude_none=True)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        # Locations name the sender's own keys (a forbidden extra key, say): escaped and cut.
        where = ".".join(printable(str(part), limit=LOC_PART_MAX_CHARS)
                         for part in error["loc"]) or "event"
        message = printable(error["msg"].removeprefix("Value error, "))
        problems.append(f"{where}: {message}")
    return _bounded(problems)


def _bounded(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    suffix = f" (and {more} more problems)" if more else ""
    reason = "; ".join(shown)
    if len(reason) + len(suffix) > MAX_REASON_CHARS:
        more_text = suffix or " (more problems)"
        reason = printable(reason, limit=MAX_REASON_CHARS - len(more_text))
        return reason + more_text
    return reason + suffix


def _event_id_hint(data: object) -> str | None:
    """The event id a rejected message claims, as a printable, storable label (or None)."""
    if isinstance(data, dict):
        candidate = data.get("eventId")
        if isinstance(candidate, str) and 0 < len(candidate) <= EVENT_ID_MAX_CHARS:
            return printable(candidate)
    return None


def _json_type(data: object) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "true" if data else "false"
    if isinstance(data, int | float):
        return "a number"
    if isinstance(data, str):
        return "a string"
    if isinstance(data, list | tuple):
        return "an array"
    return type(data).__name__


def _deeper_than(data: object, limit: int) -> bool:
    """Whether arrays/objects nest more than ``limit`` levels; iterative, so never recursing."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return False


def _validate(data: object) -> LoyaltyEvent:
    if not isinstance(data, dict):
        raise EventRejected(f"event must be a JSON object, got {_json_type(data)}")
    try:
        return LoyaltyEvent.model_validate(data)
    except ValidationError as exc:
        raise EventRejected(_describe(exc), event_id=_event_id_hint(data)) from None


def parse_event_data(data: object) -> LoyaltyEvent:
    """Validate already-decoded JSON data; raise EventRejected with every problem found."""
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise EventRejected(TOO_DEEP, event_id=_event_id_hint(data))
    return _validate(data)


def oversize_reason(size: int, max_bytes: int) -> str:
    return f"body is {size} bytes, over the {max_bytes}-byte limit"


_EVENT_ID_IN_PREFIX = re.compile(rb'"eventId"\s*:\s*"([^"\\]{1,128})"')


def event_id_in_prefix(body: bytes, prefix_bytes: int = 4096) -> str | None:
    """The eventId near the start of a body too large to parse, as a printable label."""
    found = _EVENT_ID_IN_PREFIX.search(body[:prefix_bytes])
    if found is None:
        return None
    return printable(found.group(1).decode("utf-8", errors="backslashreplace"))


def parse_event_bytes(body: bytes, *, max_bytes: int) -> LoyaltyEvent:
    """Decode and validate a raw message body (UTF-8 JSON, at most ``max_bytes``)."""
    if len(body) > max_bytes:
        raise EventRejected(oversize_reason(len(body), max_bytes),
                            event_id=event_id_in_prefix(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventRejected(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise EventRejected(TOO_DEEP) from None
    except json.JSONDecodeError as exc:
        raise EventRejected(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        # Numbers longer than Python converts (4300 digits) fail outside the JSON grammar.
        detail = printable(str(exc).split(";")[0], limit=200)
        raise EventRejected(f"invalid JSON: {detail}") from None
    # Counting brackets is cheap and bounds the depth; only bodies with many of them are walked.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than(
            data, MAX_JSON_DEPTH):
        raise EventRejected(TOO_DEEP, event_id=_event_id_hint(data))
    return _validate(data)
