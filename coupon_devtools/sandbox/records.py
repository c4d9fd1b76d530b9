"""What passes through the sandbox: parsed requests, answers, issued coupons, the call log;
and the error bodies of each API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from coupon_devtools.sandbox.inputs import (
    DEFAULT_READBACK_LIMIT,
    METADATA_LIMITS,
    JsonDict,
    PathClass,
    ReadbackApi,
    SandboxInputError,
    utc_iso_ms,
)


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """A status and JSON body for the HTTP layer to send as is."""

    status: int
    body: JsonDict
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BulkRequest:
    """A validated bulk-issue request; ``series_ids`` are deduplicated in request order."""

    series_ids: tuple[int, ...]
    customer: Mapping[str, Any]
    customer_id: str
    metadata: Mapping[str, Any] | None
    source: str | None


@dataclass(frozen=True, slots=True)
class ReadbackQuery:
    """A validated read-back query, for any of the three read-back APIs."""

    api: ReadbackApi
    customer_ids: tuple[str, ...]
    series_ids: tuple[int, ...] = ()
    include_details: bool = False
    start_date: date | None = None
    descending: bool = False
    limit: int = DEFAULT_READBACK_LIMIT
    offset: int = 0


@dataclass(frozen=True, slots=True)
class IssuedCoupon:
    """One coupon the sandbox really issued: a ground-truth ledger row."""

    id: int
    code: str
    series_id: int
    customer_id: str
    customer: Mapping[str, Any]
    metadata: Mapping[str, Any] | None
    source: str | None
    issued_at: datetime
    request_id: str
    principal: str
    valid_till: str
    valid_till_date_time: str

    def to_json(self) -> JsonDict:
        """The wire form returned by ``GET /sandbox/ledger``."""
        return {
            "id": self.id,
            "code": self.code,
            "seriesId": self.series_id,
            "customerId": self.customer_id,
            "customer": dict(self.customer),
            "metadata": None if self.metadata is None else dict(self.metadata),
            "source": self.source,
            "issuedAt": utc_iso_ms(self.issued_at),
            "requestId": self.request_id,
            "principal": self.principal,
            "validTill": self.valid_till,
            "validTillDateTime": self.valid_till_date_time,
        }


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One Capillary call as the sandbox saw it (admin calls are not recorded)."""

    t: float
    path: PathClass
    status: int
    principal: str | None
    series_ids: tuple[int, ...]
    customer_id: str | None
    request_id: str

    def to_json(self) -> JsonDict:
        """The wire form returned by ``GET /sandbox/calls``."""
        return {
            "t": self.t,
            "path": self.path,
            "status": self.status,
            "principal": self.principal,
            "seriesIds": list(self.series_ids),
            "customerId": self.customer_id,
            "requestId": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class TokenGrant:
    principal: str
    expires_at: float


def error_body(path: PathClass, code: int, message: str) -> JsonDict:
    """A gateway-level error body (auth, rate limit, injected faults) in the path's shape."""
    entry = {"status": False, "code": code, "message": message}
    if path == "bulk":
        return {"response": [], "errors": [entry]}
    return {"data": None, "errors": [entry]}


def readback_error(api: ReadbackApi, message: str) -> ApiAnswer:
    """A 400 answer for a bad read-back query, in that API's shape."""
    if api == "v11_customer_coupons":
        return ApiAnswer(400, {"response": {"status": v11_status(False, 400, message)}})
    return ApiAnswer(400, {"data": None, "errors": [entry_error(400, message)]})


def readback_failure(api: ReadbackApi) -> ApiAnswer:
    """A 200 whose body says the read-back failed, in that API's shape."""
    message = "Internal error while fetching coupons"
    if api == "v11_customer_coupons":
        return ApiAnswer(200, {"response": {"status": v11_status(False, 500, message)}})
    return ApiAnswer(200, {"data": [], "errors": [entry_error(500, message)]})


def readback_stale(api: ReadbackApi, customer_id: str) -> ApiAnswer:
    """What a replica that has not caught up answers: the customer, and none of the coupons."""
    if api == "v11_customer_coupons":
        return ApiAnswer(200, {"response": {
            "status": v11_status(True, 200, "SUCCESS"),
            "customers": {"customer": [{"id": customer_id, "coupons": {"coupon": []}}]}}})
    if api == "v2_coupon":
        return ApiAnswer(200, {"data": [], "errors": None})
    return ApiAnswer(200, {"customers": [{"id": customer_id, "coupons": []}],
                           "pagination": {"limit": DEFAULT_READBACK_LIMIT, "offset": 0,
                                          "total": 0}})


def v11_status(success: bool, code: int, message: str) -> JsonDict:
    return {"success": success, "code": code, "message": message}


def entry_error(code: int, message: str) -> JsonDict:
    return {"status": False, "code": code, "message": message}


def issual_details(metadata: Mapping[str, Any] | None) -> JsonDict:
    meta = metadata or {}
    return {key: meta.get(key) for key in METADATA_LIMITS}


def split_csv(key: str, raw: str) -> list[str]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise SandboxInputError(f"{key} must not be empty")
    return parts


def int_list(key: str, raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in split_csv(key, raw))
    except ValueError as exc:
        raise SandboxInputError(f"{key} must be integers, got {raw!r}") from exc


def query_int(query: Mapping[str, str], key: str, default: int, *, maximum: int) -> int:
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SandboxInputError(f"{key} must be an integer, got {raw!r}") from exc
    if value < 0 or value > maximum:
        raise SandboxInputError(f"{key} must be between 0 and {maximum}, got {value}")
    return value
