"""The inbound loyalty event: its schema and the one place where bad input is turned away.

A message is decoded here whatever way it came in (plain JSON on the bus, a Celery task, the
CLI). Anything that is not a valid event raises ``EventRejected`` with a precise reason, so the
caller can store the raw payload beside that reason and acknowledge the message.
"""

from __future__ import annotations

import json
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

from worker.errors import EventRejected

EVENT_ID_MAX_CHARS = 128
SHORT_METADATA_MAX_CHARS = 50
LONG_METADATA_MAX_CHARS = 250
MAX_SERIES_PER_EVENT = 100


class Customer(BaseModel):
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


class Metadata(BaseModel):
    """Issue metadata, with Capillary's own length limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sourceType: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    sourceId: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    sourceActivity: str | None = Field(None, max_length=SHORT_METADATA_MAX_CHARS)
    notes: str | None = Field(None, max_length=LONG_METADATA_MAX_CHARS)
    reason: str | None = Field(None, max_length=LONG_METADATA_MAX_CHARS)


class LoyaltyEvent(BaseModel):
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
        where = ".".join(str(part) for part in error["loc"]) or "event"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _event_id_hint(data: object) -> str | None:
    if isinstance(data, dict):
        candidate = data.get("eventId")
        if isinstance(candidate, str) and 0 < len(candidate) <= EVENT_ID_MAX_CHARS:
            return candidate
    return None


def parse_event_data(data: object) -> LoyaltyEvent:
    """Validate already-decoded JSON data; raise EventRejected with every problem found."""
    if not isinstance(data, dict):
        raise EventRejected(f"event must be a JSON object, got {type(data).__name__}")
    try:
        return LoyaltyEvent.model_validate(data)
    except ValidationError as exc:
        raise EventRejected(_describe(exc), event_id=_event_id_hint(data)) from None


def parse_event_bytes(body: bytes, *, max_bytes: int) -> LoyaltyEvent:
    """Decode and validate a raw message body (UTF-8 JSON, at most ``max_bytes``)."""
    if len(body) > max_bytes:
        raise EventRejected(f"body is {len(body)} bytes, over the {max_bytes}-byte limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventRejected(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EventRejected(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return parse_event_data(data)
