"""In-memory state and rules of the sandbox Capillary server.

Nothing here speaks HTTP: :mod:`coupon_devtools.sandbox.server` is a thin aiohttp skin over
:class:`SandboxState`, so every rule (auth, validation, issuance, rate limits, faults, read-backs)
can be exercised directly with injected clocks. The ledger kept here is the ground truth of what
the sandbox really issued, which is what exactly-once tests compare the worker's ledger against.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import string
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, cast, get_args

JsonDict: TypeAlias = dict[str, Any]
Clock: TypeAlias = Callable[[], datetime]
"""Returns the current wall-clock time as an aware datetime."""
Monotonic: TypeAlias = Callable[[], float]
"""Returns monotonic seconds; used for token expiry and rate-limit windows."""

FixedOffset: TypeAlias = timezone
"""A fixed UTC offset (the name ``timezone`` is taken by a config field)."""

PathClass = Literal["bulk", "readback", "token"]
FaultPath = Literal["bulk", "readback", "token", "any"]
FaultKind = Literal[
    "latency",
    "error_before",
    "error_after",
    "empty_500_before",
    "stall_after",
    "rate_limit",
    "busy_521",
    "reset_before",
    "reset_after",
    # What a real server, gateway or replica can do that the ones above do not:
    "error_json_after",  # issues, then answers ``status`` with a JSON error body, no entries
    "html_after",  # issues, then a proxy's HTML error page with ``status``
    "slow_original",  # holds the request ``delaySeconds``, then issues (the client gave up)
    "readback_unreadable",  # read-back answers 200 with an HTML page
    "readback_failure_status",  # read-back answers 200 whose body reports a failure
    "readback_stale",  # read-back answers from a replica that has not seen recent writes
]
Behaviour = Literal["valid", "invalid", "expired", "error"]
DiscountType = Literal["ABS", "PERC"]
ReadbackApi = Literal["v2_coupon", "v11_customer_coupons", "v2_customers_coupons"]

RATE_WINDOW_S: Final = 60.0
CALL_LOG_LIMIT: Final = 200_000
FIRST_SYNTHETIC_CUSTOMER_ID: Final = 900_000_001
FIRST_COUPON_ID: Final = 10_000_001
COUPON_CODE_LENGTH: Final = 10
DEFAULT_READBACK_LIMIT: Final = 10
MAX_READBACK_LIMIT: Final = 1000
MAX_TOKEN_TTL_S: Final = 86_400
CALL_STATUS_CONNECTION_RESET: Final = 0
"""Status recorded in the call log when the sandbox answered with a TCP reset, not HTTP."""

METADATA_LIMITS: Final[Mapping[str, int]] = {
    "sourceType": 50,
    "sourceId": 50,
    "sourceActivity": 50,
    "notes": 250,
    "reason": 250,
}
CUSTOMER_IDENTIFIERS: Final = ("id", "mobile", "email", "externalId")
BUSY_MESSAGE: Final = "Multiple actions are running for the same customer, try later"

_CODE_ALPHABET: Final = string.ascii_uppercase + string.digits
_OFFSET_RE: Final = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
_DEFAULT_FAULT_DELAY_S: Final[Mapping[str, float]] = {
    "latency": 1.0, "stall_after": 30.0, "slow_original": 5.0,
}
#: The v2 coupon read-back serves at most this many rows a page, whatever limit is asked.
MAX_V2_COUPON_PAGE: Final = 50


class SandboxInputError(ValueError):
    """A request, admin command or scenario the sandbox refuses; the message says why."""


def md5_hex(password: str) -> str:
    """Capillary's password digest: MD5 of the UTF-8 password, lower-case hex."""
    return hashlib.md5(password.encode(), usedforsecurity=False).hexdigest()


def basic_auth_header(username: str, password: str) -> str:
    """The ``Authorization`` value Capillary expects: the password is MD5-hashed first."""
    token = base64.b64encode(f"{username}:{md5_hex(password)}".encode()).decode("ascii")
    return f"Basic {token}"


@functools.lru_cache(maxsize=64)
def parse_offset(text: str) -> timezone:
    """Parse a UTC offset such as ``+05:30``, ``-0300``, ``Z`` or ``UTC``."""
    if text in ("Z", "UTC"):
        return UTC
    match = _OFFSET_RE.match(text)
    if match is None:
        raise SandboxInputError(f"timezone must look like +05:30 or Z, got {text!r}")
    sign, hours, minutes = match.groups()
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    if delta >= timedelta(hours=24) or int(minutes) >= 60:
        raise SandboxInputError(f"timezone offset out of range: {text!r}")
    return timezone(-delta if sign == "-" else delta)


def render_time(moment: datetime, tz: timezone) -> str:
    """ISO 8601 to the second in ``tz``; UTC is written with ``Z`` as Capillary's EU hosts do."""
    text = moment.astimezone(tz).isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _utc_iso_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- small validators shared by admin commands and scenarios -------------------------------


def _as_str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise SandboxInputError(f"{key} must be a string, got {value!r}")
    return value


def _as_opt_str(key: str, value: object) -> str | None:
    return None if value is None else _as_str(key, value)


def _as_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SandboxInputError(f"{key} must be true or false, got {value!r}")
    return value


def _as_int(key: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SandboxInputError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SandboxInputError(f"{key} must be >= {minimum}, got {value}")
    return value


def _as_number(key: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SandboxInputError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise SandboxInputError(f"{key} must be a finite number >= {minimum}, got {value}")
    return float(value)


def _as_choice(key: str, value: object, choices: Iterable[str]) -> str:
    allowed = tuple(choices)
    if value not in allowed:
        raise SandboxInputError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _as_object(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SandboxInputError(f"{key} must be a JSON object, got {value!r}")
    return cast(Mapping[str, Any], value)


def _reject_unknown(what: str, fields: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise SandboxInputError(f"unknown {what} field(s): {', '.join(unknown)}")


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxOptions:
    """How a sandbox starts, and what :meth:`SandboxState.reset` returns it to.

    ``scenario`` is the JSON shape read by :func:`load_scenario`:
    ``{"series": {"<id>": {series fields}}, "unknownCustomers": [...], "config": {...}}``.
    """

    users: Mapping[str, str] = field(default_factory=lambda: {"store.server": "server123"})
    oauth_clients: Mapping[str, str] = field(default_factory=lambda: {"demo-key": "demo-secret"})
    token_ttl_seconds: int = 300
    latency_seconds: float = 0.0
    rate_limit_per_minute: int | None = None
    timezone: str = "+00:00"
    strict_series: bool = False
    scenario: Mapping[str, Any] | None = None
    #: Seeds the coupon codes and the probabilistic faults, so that a run can be repeated
    #: (as far as the order of the calls it receives repeats); None draws a fresh seed.
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Runtime settings, changed by ``PUT /sandbox/config`` (camelCase keys on the wire)."""

    latency_s: float = 0.0
    rate_limit_per_minute: int | None = None
    token_ttl_s: int = 300
    timezone: str = "+00:00"
    strict_series: bool = False

    @property
    def tz(self) -> FixedOffset:
        """The configured offset as a tzinfo."""
        return parse_offset(self.timezone)

    @classmethod
    def from_options(cls, options: SandboxOptions) -> SandboxConfig:
        """The configuration a sandbox starts with (before any scenario ``config``)."""
        return cls().updated(
            {
                "latencySeconds": options.latency_seconds,
                "rateLimitPerMinute": options.rate_limit_per_minute,
                "tokenTtlSeconds": options.token_ttl_seconds,
                "timezone": options.timezone,
                "strictSeries": options.strict_series,
            }
        )

    def updated(self, fields: Mapping[str, Any]) -> SandboxConfig:
        """A copy with the given camelCase fields changed; unknown or bad fields are refused."""
        _reject_unknown("config", fields, _CONFIG_FIELDS)
        changes: dict[str, Any] = {}
        for key, value in fields.items():
            attr, parse = _CONFIG_FIELDS[key]
            changes[attr] = parse(key, value)
        return replace(self, **changes)

    def to_json(self) -> JsonDict:
        """The wire form, as ``PUT /sandbox/config`` accepts it."""
        return {
            "latencySeconds": self.latency_s,
            "rateLimitPerMinute": self.rate_limit_per_minute,
            "tokenTtlSeconds": self.token_ttl_s,
            "timezone": self.timezone,
            "strictSeries": self.strict_series,
        }


def _parse_rate_limit(key: str, value: object) -> int | None:
    return None if value is None else _as_int(key, value, minimum=1)


def _parse_timezone(key: str, value: object) -> str:
    text = _as_str(key, value)
    parse_offset(text)
    return text


_CONFIG_FIELDS: Final[Mapping[str, tuple[str, Callable[[str, object], Any]]]] = {
    "latencySeconds": ("latency_s", lambda k, v: _as_number(k, v, minimum=0.0)),
    "rateLimitPerMinute": ("rate_limit_per_minute", _parse_rate_limit),
    "tokenTtlSeconds": (
        "token_ttl_s",
        lambda k, v: min(_as_int(k, v, minimum=1), MAX_TOKEN_TTL_S),
    ),
    "timezone": ("timezone", _parse_timezone),
    "strictSeries": ("strict_series", _as_bool),
}


@dataclass(frozen=True, slots=True)
class SeriesSettings:
    """How one coupon series behaves; unconfigured series use the defaults."""

    description: str | None = None
    discount_code: str | None = None
    discount_type: DiscountType = "ABS"
    discount_value: float = 100.0
    discount_upto: float = 0.0
    valid_days: int = 30
    max_per_user: int | None = None
    behaviour: Behaviour = "valid"
    error_code: int = 730
    error_message: str = "Unknown error"
    issue_on_error: bool = False

    def updated(self, fields: Mapping[str, Any]) -> SeriesSettings:
        """A copy with the given camelCase fields changed; unknown or bad fields are refused."""
        _reject_unknown("series", fields, _SERIES_FIELDS)
        changes: dict[str, Any] = {}
        for key, value in fields.items():
            attr, parse = _SERIES_FIELDS[key]
            changes[attr] = parse(key, value)
        return replace(self, **changes)

    def to_json(self, series_id: int) -> JsonDict:
        """The wire form, with defaults filled in for this series."""
        return {
            "seriesId": series_id,
            "description": self.description_for(series_id),
            "discountCode": self.discount_code_for(series_id),
            "discountType": self.discount_type,
            "discountValue": self.discount_value,
            "discountUpto": self.discount_upto,
            "validDays": self.valid_days,
            "maxPerUser": self.max_per_user,
            "behaviour": self.behaviour,
            "errorCode": self.error_code,
            "errorMessage": self.error_message,
            "issueOnError": self.issue_on_error,
        }

    def description_for(self, series_id: int) -> str:
        """The description issued coupons carry."""
        return self.description if self.description is not None else f"Sandbox series {series_id}"

    def discount_code_for(self, series_id: int) -> str:
        """The discount code issued coupons carry."""
        return self.discount_code if self.discount_code is not None else f"TIER{series_id}"


def _parse_max_per_user(key: str, value: object) -> int | None:
    if value is None:
        return None
    number = _as_int(key, value, minimum=-1)
    # Capillary spells "no limit" as -1 (maxVouchersPerUser); keep one spelling inside.
    return None if number == -1 else number


_SERIES_FIELDS: Final[Mapping[str, tuple[str, Callable[[str, object], Any]]]] = {
    "description": ("description", _as_opt_str),
    "discountCode": ("discount_code", _as_opt_str),
    "discountType": ("discount_type", lambda k, v: _as_choice(k, v, get_args(DiscountType))),
    "discountValue": ("discount_value", lambda k, v: _as_number(k, v, minimum=0.0)),
    "discountUpto": ("discount_upto", lambda k, v: _as_number(k, v, minimum=0.0)),
    "validDays": ("valid_days", lambda k, v: _as_int(k, v, minimum=0)),
    "maxPerUser": ("max_per_user", _parse_max_per_user),
    "behaviour": ("behaviour", lambda k, v: _as_choice(k, v, get_args(Behaviour))),
    "errorCode": ("error_code", lambda k, v: _as_int(k, v, minimum=1)),
    "errorMessage": ("error_message", _as_str),
    "issueOnError": ("issue_on_error", _as_bool),
}


@dataclass(slots=True)
class FaultRule:
    """One injected fault; ``remaining`` counts down, -1 means forever.

    ``probability`` below 1 makes a rule strike only some of the calls it matches (a fault
    "at a low rate"); a matching call it spares is not counted and goes on to the next rule.
    """

    id: int
    kind: FaultKind
    remaining: int = 1
    series: int | None = None
    customer: str | None = None
    path: FaultPath = "bulk"
    delay_s: float = 0.0
    status: int = 500
    retry_after_s: int = 1
    probability: float = 1.0
    applied: int = 0

    @classmethod
    def from_json(cls, rule_id: int, fields: Mapping[str, Any]) -> FaultRule:
        """Build a rule from the ``POST /sandbox/faults`` body."""
        _reject_unknown("fault", fields, _FAULT_FIELDS)
        if "kind" not in fields:
            raise SandboxInputError("fault kind is required")
        kind = cast(FaultKind, _as_choice("kind", fields["kind"], get_args(FaultKind)))
        times = _as_int("times", fields.get("times", 1), minimum=-1)
        if times == 0:
            raise SandboxInputError("times must be >= 1, or -1 for forever")
        series = fields.get("series")
        customer = fields.get("customer")
        if isinstance(customer, int) and not isinstance(customer, bool):
            customer = str(customer)
        status = _as_int("status", fields.get("status", 500), minimum=100)
        if status > 599:
            raise SandboxInputError(f"status must be an HTTP status (100-599), got {status}")
        probability = _as_number("probability", fields.get("probability", 1.0), minimum=0.0)
        if not 0.0 < probability <= 1.0:
            raise SandboxInputError(f"probability must be > 0 and <= 1, got {probability:g}")
        return cls(
            id=rule_id,
            kind=kind,
            remaining=times,
            series=None if series is None else _as_int("series", series),
            customer=_as_opt_str("customer", customer),
            path=cast(
                FaultPath, _as_choice("path", fields.get("path", "bulk"), get_args(FaultPath))
            ),
            delay_s=_as_number(
                "delaySeconds",
                fields.get("delaySeconds", _DEFAULT_FAULT_DELAY_S.get(kind, 0.0)),
                minimum=0.0,
            ),
            status=status,
            retry_after_s=_as_int(
                "retryAfterSeconds", fields.get("retryAfterSeconds", 1), minimum=0
            ),
            probability=probability,
        )

    def matches(self, path: PathClass, series_ids: Iterable[int], customer_id: str | None) -> bool:
        """Whether a call on ``path`` about these series and customer triggers this rule."""
        if self.remaining == 0 or self.path not in ("any", path):
            return False
        if self.series is not None and self.series not in series_ids:
            return False
        return self.customer is None or self.customer == customer_id

    def to_json(self) -> JsonDict:
        """The wire form listed by ``GET /sandbox/faults``."""
        return {
            "id": self.id,
            "kind": self.kind,
            "times": self.remaining,
            "applied": self.applied,
            "series": self.series,
            "customer": self.customer,
            "path": self.path,
            "delaySeconds": self.delay_s,
            "status": self.status,
            "retryAfterSeconds": self.retry_after_s,
            "probability": self.probability,
        }


_DEFAULT_SERIES: Final = SeriesSettings()
_BEHAVIOUR_REFUSALS: Final[Mapping[str, tuple[int, str]]] = {
    "invalid": (707, "Invalid series id"),
    "expired": (712, "Series expired"),
}

_FAULT_FIELDS: Final = (
    "kind",
    "times",
    "series",
    "customer",
    "path",
    "delaySeconds",
    "status",
    "retryAfterSeconds",
    "probability",
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario: series settings, unknown customers and config overrides."""

    series: Mapping[int, SeriesSettings] = field(default_factory=dict)
    unknown_customers: frozenset[str] = frozenset()
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Scenario:
        """Validate the scenario JSON shape (see :class:`SandboxOptions`)."""
        if data is None:
            return cls()
        data = _as_object("scenario", data)
        _reject_unknown("scenario", data, ("series", "unknownCustomers", "config"))
        series: dict[int, SeriesSettings] = {}
        for raw_id, fields in _as_object("series", data.get("series", {})).items():
            try:
                series_id = int(raw_id)
            except ValueError as exc:
                raise SandboxInputError(f"series id must be an integer, got {raw_id!r}") from exc
            series[series_id] = SeriesSettings().updated(_as_object(f"series {raw_id}", fields))
        unknown = data.get("unknownCustomers", [])
        if not isinstance(unknown, list):
            raise SandboxInputError("unknownCustomers must be a list of customer ids")
        config = _as_object("config", data.get("config", {}))
        SandboxConfig().updated(config)
        return cls(
            series=series,
            unknown_customers=frozenset(str(c) for c in unknown),
            config=dict(config),
        )


def load_scenario(path: str | Path) -> dict[str, Any]:
    """Read and validate a scenario JSON file; returns the dict for ``SandboxOptions.scenario``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SandboxInputError(f"scenario {path} is not valid JSON: {exc}") from exc
    Scenario.from_json(_as_object("scenario", data))
    return cast(dict[str, Any], data)


# --- records -------------------------------------------------------------------------------


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
            "issuedAt": _utc_iso_ms(self.issued_at),
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
class _TokenGrant:
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
        return ApiAnswer(400, {"response": {"status": _v11_status(False, 400, message)}})
    return ApiAnswer(400, {"data": None, "errors": [_entry_error(400, message)]})


def readback_failure(api: ReadbackApi) -> ApiAnswer:
    """A 200 whose body says the read-back failed, in that API's shape."""
    message = "Internal error while fetching coupons"
    if api == "v11_customer_coupons":
        return ApiAnswer(200, {"response": {"status": _v11_status(False, 500, message)}})
    return ApiAnswer(200, {"data": [], "errors": [_entry_error(500, message)]})


def readback_stale(api: ReadbackApi, customer_id: str) -> ApiAnswer:
    """What a replica that has not caught up answers: the customer, and none of the coupons."""
    if api == "v11_customer_coupons":
        return ApiAnswer(200, {"response": {
            "status": _v11_status(True, 200, "SUCCESS"),
            "customers": {"customer": [{"id": customer_id, "coupons": {"coupon": []}}]}}})
    if api == "v2_coupon":
        return ApiAnswer(200, {"data": [], "errors": None})
    return ApiAnswer(200, {"customers": [{"id": customer_id, "coupons": []}],
                           "pagination": {"limit": DEFAULT_READBACK_LIMIT, "offset": 0,
                                          "total": 0}})


def _v11_status(success: bool, code: int, message: str) -> JsonDict:
    return {"success": success, "code": code, "message": message}


def _entry_error(code: int, message: str) -> JsonDict:
    return {"status": False, "code": code, "message": message}


def _issual_details(metadata: Mapping[str, Any] | None) -> JsonDict:
    meta = metadata or {}
    return {key: meta.get(key) for key in METADATA_LIMITS}


def _split_csv(key: str, raw: str) -> list[str]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise SandboxInputError(f"{key} must not be empty")
    return parts


def _int_list(key: str, raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _split_csv(key, raw))
    except ValueError as exc:
        raise SandboxInputError(f"{key} must be integers, got {raw!r}") from exc


def _query_int(query: Mapping[str, str], key: str, default: int, *, maximum: int) -> int:
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


# --- the state -----------------------------------------------------------------------------


class SandboxState:
    """Everything the sandbox knows, and the rules that change it.

    Not thread-safe by design: the server mutates it only from its event loop, and every method
    is synchronous, so a request's decisions are atomic with respect to other requests.
    """

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        clock: Clock | None = None,
        monotonic: Monotonic | None = None,
        call_log_limit: int = CALL_LOG_LIMIT,
    ) -> None:
        self.options = options if options is not None else SandboxOptions()
        self._now: Clock = clock if clock is not None else (lambda: datetime.now(UTC))
        self._monotonic: Monotonic = monotonic if monotonic is not None else time.monotonic
        self._scenario = Scenario.from_json(self.options.scenario)
        self._base_config = SandboxConfig.from_options(self.options).updated(self._scenario.config)
        self._password_digests = {u: md5_hex(p) for u, p in self.options.users.items()}
        self._call_log_limit = call_log_limit
        self._random = random.Random(self.options.seed)
        self.reset()

    # --- lifecycle and admin ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything since start, then re-apply the start options and scenario."""
        self.config: SandboxConfig = self._base_config
        self._series: dict[int, SeriesSettings] = dict(self._scenario.series)
        self._unknown_customers: set[str] = set(self._scenario.unknown_customers)
        self._registry: dict[tuple[str, str], str] = {}
        self._next_synthetic_id = FIRST_SYNTHETIC_CUSTOMER_ID
        self._tokens: dict[str, _TokenGrant] = {}
        self._faults: list[FaultRule] = []
        self._next_fault_id = 1
        # Apart from the codes' generator, so that faults repeat after a reset even though
        # the codes issued before it were drawn from the same seed.
        self._fault_random = random.Random(self.options.seed)
        self._ledger: list[IssuedCoupon] = []
        self._by_customer: dict[str, list[IssuedCoupon]] = {}
        self._held: dict[tuple[str, int], int] = {}
        self._codes: set[str] = set()
        self._next_coupon_id = FIRST_COUPON_ID
        self._calls: deque[CallRecord] = deque(maxlen=self._call_log_limit)
        self._windows: dict[str, deque[float]] = {}
        self._path_counts: dict[str, int] = {"bulk": 0, "readback": 0, "token": 0}
        self._status_counts: dict[str, int] = {}
        self._rate_limited = 0

    def configure(self, fields: Mapping[str, Any]) -> SandboxConfig:
        """Apply a partial config update (camelCase keys); returns the new config."""
        self.config = self.config.updated(fields)
        return self.config

    def set_series(self, series_id: int, fields: Mapping[str, Any]) -> SeriesSettings:
        """Partially update one series' settings; returns the new settings."""
        settings = self._series.get(series_id, SeriesSettings()).updated(fields)
        self._series[series_id] = settings
        return settings

    def series_settings(self, series_id: int) -> SeriesSettings | None:
        """The configured settings of a series, or None when it was never configured."""
        return self._series.get(series_id)

    def set_customer(self, customer_id: str, *, exists: bool) -> None:
        """Mark a (resolved) customer id as known or unknown to Capillary."""
        if exists:
            self._unknown_customers.discard(customer_id)
        else:
            self._unknown_customers.add(customer_id)

    def add_fault(self, fields: Mapping[str, Any]) -> int:
        """Register a fault rule (see :class:`FaultRule`); returns its id."""
        rule = FaultRule.from_json(self._next_fault_id, fields)
        self._next_fault_id += 1
        self._faults.append(rule)
        return rule.id

    def clear_faults(self) -> int:
        """Remove every fault rule; returns how many there were."""
        count = len(self._faults)
        self._faults.clear()
        return count

    def faults(self) -> list[JsonDict]:
        """Every fault rule, including spent ones, in registration order."""
        return [rule.to_json() for rule in self._faults]

    def take_fault(
        self, path: PathClass, series_ids: Iterable[int], customer_id: str | None
    ) -> FaultRule | None:
        """The first matching rule with uses left that strikes (see ``probability``), after
        consuming one use of it."""
        ids = tuple(series_ids)
        for rule in self._faults:
            if rule.matches(path, ids, customer_id):
                if rule.probability < 1.0 and self._fault_random.random() >= rule.probability:
                    continue
                if rule.remaining > 0:
                    rule.remaining -= 1
                rule.applied += 1
                return replace(rule)
        return None

    # --- authentication and rate limits ----------------------------------------------------

    def authenticate_basic(self, header_value: str) -> str | None:
        """The username of a valid ``Basic`` header (MD5-hashed password), else None."""
        scheme, _, encoded = header_value.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, digest = decoded.partition(":")
        expected = self._password_digests.get(username)
        if not sep or expected is None:
            return None
        return username if hmac.compare_digest(digest, expected) else None

    def generate_token(self, key: str, secret: str) -> ApiAnswer:
        """Answer ``POST /v3/oauth/token/generate`` for these credentials."""
        expected = self.options.oauth_clients.get(key)
        if expected is None or not hmac.compare_digest(secret, expected):
            return ApiAnswer(
                401, {"data": None, "errors": [_entry_error(401, "Invalid key or secret")]}
            )
        now_mono = self._monotonic()
        self._tokens = {t: g for t, g in self._tokens.items() if g.expires_at > now_mono}
        ttl_s = self.config.token_ttl_s
        token = self._make_jwt(key, ttl_s)
        self._tokens[token] = _TokenGrant(principal=key, expires_at=now_mono + ttl_s)
        return ApiAnswer(200, {"data": {"accessToken": token, "ttlSeconds": ttl_s}, "errors": None})

    def _make_jwt(self, key: str, ttl_s: int) -> str:
        def b64(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

        issued = int(self._now().timestamp())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"sub": key, "iat": issued, "exp": issued + ttl_s, "jti": uuid.uuid4().hex}
        return ".".join(
            (
                b64(json.dumps(header).encode()),
                b64(json.dumps(claims).encode()),
                b64(secrets.token_bytes(32)),
            )
        )

    def principal_for_token(self, token: str) -> str | None:
        """The OAuth key a live token was issued to; None when unknown, revoked or expired."""
        grant = self._tokens.get(token)
        if grant is None:
            return None
        if self._monotonic() >= grant.expires_at:
            del self._tokens[token]
            return None
        return grant.principal

    def revoke_tokens(self) -> int:
        """Invalidate every outstanding OAuth token; returns how many there were."""
        count = len(self._tokens)
        self._tokens.clear()
        return count

    def take_rate_slot(self, principal: str) -> int | None:
        """Consume one call of the principal's rolling minute.

        Returns None when the call may proceed, else the whole seconds until a slot frees (>= 1);
        refused calls do not consume a slot.
        """
        limit = self.config.rate_limit_per_minute
        if limit is None:
            return None
        now = self._monotonic()
        window = self._windows.setdefault(principal, deque())
        while window and window[0] <= now - RATE_WINDOW_S:
            window.popleft()
        if len(window) < limit:
            window.append(now)
            return None
        return max(1, math.ceil(window[-limit] + RATE_WINDOW_S - now))

    # --- customers -------------------------------------------------------------------------

    def resolve_identifier(self, kind: str, value: str) -> str:
        """The customer id for an identifier; mobile/email/externalId get stable synthetic ids."""
        if kind == "id":
            return value
        key = (kind, value)
        customer_id = self._registry.get(key)
        if customer_id is None:
            customer_id = str(self._next_synthetic_id)
            self._next_synthetic_id += 1
            self._registry[key] = customer_id
        return customer_id

    def is_unknown_customer(self, customer_id: str) -> bool:
        """Whether the customer was marked as not existing."""
        return customer_id in self._unknown_customers

    # --- bulk issue ------------------------------------------------------------------------

    def parse_bulk_request(self, raw: bytes | str, source: str | None) -> BulkRequest:
        """Validate a bulk-issue body; raises :class:`SandboxInputError` with the precise reason."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SandboxInputError(f"Malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise SandboxInputError("Request body must be a JSON object")
        series_ids = self._parse_series_ids(body.get("seriesIds"))
        kind, value, customer = self._parse_customer(body.get("customer"))
        metadata = self._parse_metadata(body.get("metadata"))
        return BulkRequest(
            series_ids=series_ids,
            customer=customer,
            customer_id=self.resolve_identifier(kind, value),
            metadata=metadata,
            source=source,
        )

    @staticmethod
    def _parse_series_ids(raw: object) -> tuple[int, ...]:
        if raw is None:
            raise SandboxInputError("seriesIds is required")
        if not isinstance(raw, list) or not raw:
            raise SandboxInputError("seriesIds must be a non-empty array of integers")
        for index, item in enumerate(raw):
            if isinstance(item, bool) or not isinstance(item, int):
                raise SandboxInputError(f"seriesIds[{index}] must be an integer, got {item!r}")
        # dict.fromkeys keeps the first occurrence's position.
        return tuple(dict.fromkeys(cast(list[int], raw)))

    @staticmethod
    def _parse_customer(raw: object) -> tuple[str, str, JsonDict]:
        if raw is None:
            raise SandboxInputError("customer is required")
        if not isinstance(raw, dict):
            raise SandboxInputError("customer must be a JSON object")
        for kind in CUSTOMER_IDENTIFIERS:
            value = raw.get(kind)
            if value is None or value == "":
                continue
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise SandboxInputError(f"customer.{kind} must be a string, got {value!r}")
            return kind, str(value), dict(raw)
        raise SandboxInputError("customer must carry one of: " + ", ".join(CUSTOMER_IDENTIFIERS))

    @staticmethod
    def _parse_metadata(raw: object) -> JsonDict | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise SandboxInputError("metadata must be a JSON object")
        for key, limit in METADATA_LIMITS.items():
            value = raw.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise SandboxInputError(f"metadata.{key} must be a string, got {value!r}")
            if len(value) > limit:
                raise SandboxInputError(
                    f"metadata.{key} exceeds {limit} characters (got {len(value)})"
                )
        return dict(raw)

    def issue_bulk(self, request: BulkRequest, *, principal: str, request_id: str) -> ApiAnswer:
        """Process a validated bulk-issue request: one entry per series, ledger updated."""
        now = self._now()
        entries: list[JsonDict] = []
        failures = 0
        for series_id in request.series_ids:
            result, error = self._issue_one(
                series_id, request, now=now, principal=principal, request_id=request_id
            )
            if error is not None:
                failures += 1
            entries.append(
                {
                    "entityId": series_id,
                    "result": result,
                    "errors": [] if error is None else [error],
                    "warnings": [],
                }
            )
        total = len(entries)
        status = 200 if failures == 0 else 500 if failures == total else 201
        return ApiAnswer(
            status, {"response": entries, "totalCount": total, "failureCount": failures}
        )

    def _issue_one(
        self,
        series_id: int,
        request: BulkRequest,
        *,
        now: datetime,
        principal: str,
        request_id: str,
    ) -> tuple[JsonDict | None, JsonDict | None]:
        settings, refusal = self._settings_or_refusal(series_id, request.customer_id)
        if refusal is not None:
            return None, refusal
        held = self._held.get((request.customer_id, series_id), 0)
        at_cap = settings.max_per_user is not None and held >= settings.max_per_user
        coupon = None
        if not at_cap and (settings.behaviour == "valid" or settings.issue_on_error):
            coupon = self._issue(
                series_id,
                request,
                settings=settings,
                now=now,
                principal=principal,
                request_id=request_id,
            )
        if settings.behaviour == "error":
            # issueOnError simulates an ambiguous failure (748): issued, yet reported as failed.
            return None, _entry_error(settings.error_code, settings.error_message)
        if coupon is None:
            return None, _entry_error(5002, "Max coupons per user exceeded")
        return coupon, None

    def _settings_or_refusal(
        self, series_id: int, customer_id: str
    ) -> tuple[SeriesSettings, JsonDict | None]:
        if customer_id in self._unknown_customers:
            return _DEFAULT_SERIES, _entry_error(701, "Customer not found")
        settings = self._series.get(series_id)
        if settings is None:
            if self.config.strict_series:
                return _DEFAULT_SERIES, _entry_error(707, "Invalid series id")
            settings = _DEFAULT_SERIES
        refusal = _BEHAVIOUR_REFUSALS.get(settings.behaviour)
        return settings, None if refusal is None else _entry_error(*refusal)

    def _issue(
        self,
        series_id: int,
        request: BulkRequest,
        *,
        settings: SeriesSettings,
        now: datetime,
        principal: str,
        request_id: str,
    ) -> JsonDict:
        tz = self.config.tz
        expiry = now.astimezone(tz).date() + timedelta(days=settings.valid_days)
        # Capillary stores the expiry date at UTC midnight and renders that instant in the
        # host's zone (the docs show 2026-06-11T05:30:00+05:30 for India), so validTill is
        # not local midnight; validTillDateTime is the real end of the day in the zone.
        valid_till = render_time(datetime(expiry.year, expiry.month, expiry.day, tzinfo=UTC), tz)
        valid_till_dt = render_time(
            datetime(expiry.year, expiry.month, expiry.day, 23, 59, 59, tzinfo=tz), tz
        )
        code = self._new_code()
        coupon_id = self._next_coupon_id
        self._next_coupon_id += 1
        record = IssuedCoupon(
            id=coupon_id,
            code=code,
            series_id=series_id,
            customer_id=request.customer_id,
            customer=request.customer,
            metadata=request.metadata,
            source=request.source,
            issued_at=now,
            request_id=request_id,
            principal=principal,
            valid_till=valid_till,
            valid_till_date_time=valid_till_dt,
        )
        self._ledger.append(record)
        self._by_customer.setdefault(request.customer_id, []).append(record)
        key = (request.customer_id, series_id)
        self._held[key] = self._held.get(key, 0) + 1
        return {
            "id": coupon_id,
            "code": code,
            "seriesId": series_id,
            "description": settings.description_for(series_id),
            "discountCode": settings.discount_code_for(series_id),
            "validTill": valid_till,
            "validTillDateTime": valid_till_dt,
            "discountType": settings.discount_type,
            "discountValue": settings.discount_value,
            "discountUpto": settings.discount_upto,
            "discountOn": "BILL",
            "detailedInfo": {},
            "redemptionCount": 0,
        }

    def _new_code(self) -> str:
        while True:
            code = "".join(self._random.choices(_CODE_ALPHABET, k=COUPON_CODE_LENGTH))
            if code not in self._codes:
                self._codes.add(code)
                return code

    # --- read-backs ------------------------------------------------------------------------

    def parse_readback(self, api: ReadbackApi, query: Mapping[str, str]) -> ReadbackQuery:
        """Validate a read-back query string; raises :class:`SandboxInputError`."""
        if api == "v2_coupon":
            raw_ids = query.get("issuedToIds")
            if not raw_ids:
                raise SandboxInputError("issuedToIds is required")
            series = query.get("seriesId")
            return ReadbackQuery(
                api=api,
                customer_ids=tuple(_split_csv("issuedToIds", raw_ids)),
                series_ids=_int_list("seriesId", series) if series else (),
                include_details=query.get("includeIssualDetails", "").lower() == "true",
                limit=min(_query_int(query, "limit", DEFAULT_READBACK_LIMIT,
                                     maximum=MAX_READBACK_LIMIT), MAX_V2_COUPON_PAGE),
                offset=_query_int(query, "offset", 0, maximum=10**9),
            )
        if api == "v11_customer_coupons":
            return self._parse_v11(query)
        raw_id = query.get("id")
        if not raw_id:
            raise SandboxInputError("id is required")
        return ReadbackQuery(
            api=api,
            customer_ids=(raw_id,),
            limit=_query_int(query, "limit", DEFAULT_READBACK_LIMIT, maximum=MAX_READBACK_LIMIT),
            offset=_query_int(query, "offset", 0, maximum=10**9),
        )

    def _parse_v11(self, query: Mapping[str, str]) -> ReadbackQuery:
        for param, kind in (
            ("id", "id"),
            ("mobile", "mobile"),
            ("email", "email"),
            ("external_id", "externalId"),
        ):
            raw = query.get(param)
            if raw:
                customer_ids = tuple(
                    self.resolve_identifier(kind, v) for v in _split_csv(param, raw)
                )
                break
        else:
            raise SandboxInputError("one of id, mobile, email, external_id is required")
        start_date = None
        if raw_start := query.get("start_date"):
            try:
                start_date = date.fromisoformat(raw_start)
            except ValueError as exc:
                raise SandboxInputError(
                    f"start_date must be YYYY-MM-DD, got {raw_start!r}"
                ) from exc
        order_by = query.get("order_by", "created_date")
        if order_by != "created_date":
            raise SandboxInputError(f"order_by supports only created_date, got {order_by!r}")
        sort_order = query.get("sort_order", "asc").lower()
        if sort_order not in ("asc", "desc"):
            raise SandboxInputError(f"sort_order must be asc or desc, got {sort_order!r}")
        series = query.get("series_id")
        return ReadbackQuery(
            api="v11_customer_coupons",
            customer_ids=customer_ids,
            series_ids=_int_list("series_id", series) if series else (),
            start_date=start_date,
            descending=sort_order == "desc",
        )

    def answer_readback(self, query: ReadbackQuery) -> ApiAnswer:
        """Answer a validated read-back query from the ledger."""
        tz = self.config.tz
        if query.api == "v2_coupon":
            data: list[JsonDict] = []
            for customer_id in query.customer_ids:
                for coupon in self._coupons_of(customer_id, query.series_ids):
                    item: JsonDict = {
                        "id": coupon.id,
                        "code": coupon.code,
                        "seriesId": coupon.series_id,
                        "issuedTo": coupon.customer_id,
                        "issuedDate": render_time(coupon.issued_at, tz),
                        "validTill": coupon.valid_till,
                        "validTillDateTime": coupon.valid_till_date_time,
                    }
                    if query.include_details:
                        item["couponIssualDetails"] = _issual_details(coupon.metadata)
                    data.append(item)
            shown = data[query.offset : query.offset + query.limit]
            return ApiAnswer(200, {"data": shown, "errors": None})
        if query.api == "v11_customer_coupons":
            return ApiAnswer(200, self._v11_body(query, tz))
        customer_id = query.customer_ids[0]
        coupons = self._coupons_of(customer_id, ())
        page = coupons[query.offset : query.offset + query.limit]
        return ApiAnswer(
            200,
            {
                "customers": [
                    {
                        "id": customer_id,
                        "coupons": [
                            {
                                "code": c.code,
                                "seriesId": c.series_id,
                                "createdDate": render_time(c.issued_at, tz),
                                "validTill": c.valid_till,
                                "validTillDateTime": c.valid_till_date_time,
                            }
                            for c in page
                        ],
                    }
                ],
                "pagination": {
                    "limit": query.limit,
                    "offset": query.offset,
                    "total": len(coupons),
                },
            },
        )

    def _v11_body(self, query: ReadbackQuery, tz: timezone) -> JsonDict:
        customers: list[JsonDict] = []
        for customer_id in query.customer_ids:
            coupons = [
                c
                for c in self._coupons_of(customer_id, query.series_ids)
                if query.start_date is None or c.issued_at.astimezone(tz).date() >= query.start_date
            ]
            if query.descending:
                coupons.reverse()
            customers.append(
                {
                    "id": customer_id,
                    "coupons": {
                        "coupon": [
                            {
                                "id": c.id,
                                "code": c.code,
                                "series_id": c.series_id,
                                "created_date": render_time(c.issued_at, tz),
                                "valid_till": c.valid_till,
                            }
                            for c in coupons
                        ]
                    },
                }
            )
        return {
            "response": {
                "status": _v11_status(True, 200, "SUCCESS"),
                "customers": {"customer": customers},
            }
        }

    def _coupons_of(self, customer_id: str, series_ids: tuple[int, ...]) -> list[IssuedCoupon]:
        coupons = self._by_customer.get(customer_id, [])
        if not series_ids:
            return list(coupons)
        return [c for c in coupons if c.series_id in series_ids]

    # --- ground truth, call log, stats -----------------------------------------------------

    def ledger(self, customer: str | None = None, series: int | None = None) -> list[JsonDict]:
        """Every coupon really issued since the last reset, oldest first, optionally filtered."""
        rows = self._by_customer.get(customer, []) if customer is not None else self._ledger
        return [r.to_json() for r in rows if series is None or r.series_id == series]

    @property
    def issued_count(self) -> int:
        """How many coupons were really issued since the last reset."""
        return len(self._ledger)

    def record_call(
        self,
        path: PathClass,
        status: int,
        *,
        principal: str | None,
        series_ids: tuple[int, ...],
        customer_id: str | None,
        request_id: str,
    ) -> None:
        """Append a Capillary call to the bounded call log and count it."""
        self._calls.append(
            CallRecord(
                t=self._now().timestamp(),
                path=path,
                status=status,
                principal=principal,
                series_ids=series_ids,
                customer_id=customer_id,
                request_id=request_id,
            )
        )
        self._path_counts[path] += 1
        key = str(status)
        self._status_counts[key] = self._status_counts.get(key, 0) + 1
        if status == 429:
            self._rate_limited += 1

    def calls(self, since: float | None = None) -> list[JsonDict]:
        """The call log (oldest first), optionally only calls at or after ``since`` (epoch s)."""
        return [c.to_json() for c in self._calls if since is None or c.t >= since]

    def stats(self) -> JsonDict:
        """Counters since the last reset (status 0 counts answers that were TCP resets)."""
        return {
            "calls": dict(self._path_counts),
            "statuses": dict(self._status_counts),
            "issued": len(self._ledger),
            "rateLimited": self._rate_limited,
        }
