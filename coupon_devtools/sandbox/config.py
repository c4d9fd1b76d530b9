"""How the sandbox is configured: the server's options and settings, and each series'
behaviour."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, get_args

from coupon_devtools.sandbox.inputs import (
    MAX_TOKEN_TTL_S,
    Behaviour,
    DiscountType,
    FixedOffset,
    JsonDict,
    SandboxInputError,
    as_bool,
    as_choice,
    as_int,
    as_number,
    as_opt_str,
    as_str,
    parse_offset,
    reject_unknown,
)


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
    #: Entries in an order of their own, not the request's (see ``SandboxConfig``).
    shuffle_entries: bool = False
    #: Coupons stay invisible to the read-backs this long after they are issued.
    readback_lag_seconds: float = 0.0
    #: A second bulk issue for a customer while one is in progress answers 521.
    one_action_per_customer: bool = False
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
    # Defensive assumption (the API summary promises "one entry per series", never an order):
    # the entries of a bulk-issue answer come in an order of their own.
    shuffle_entries: bool = False
    # Defensive assumption (nothing documents how soon a read-back shows a coupon): read-backs
    # served by a replica that lags the write by this many seconds.
    readback_lag_s: float = 0.0
    # Doc (status codes): 521 "multiple actions are running for the same customer, try
    # later". On: a bulk issue arriving while another for the same customer is still being
    # processed (held by a fault's delay) is answered 521, and issues nothing.
    one_action_per_customer: bool = False

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
                "shuffleEntries": options.shuffle_entries,
                "readbackLagSeconds": options.readback_lag_seconds,
                "oneActionPerCustomer": options.one_action_per_customer,
            }
        )

    def updated(self, fields: Mapping[str, Any]) -> SandboxConfig:
        """A copy with the given camelCase fields changed; unknown or bad fields are refused."""
        reject_unknown("config", fields, _CONFIG_FIELDS)
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
            "shuffleEntries": self.shuffle_entries,
            "readbackLagSeconds": self.readback_lag_s,
            "oneActionPerCustomer": self.one_action_per_customer,
        }


def _parse_rate_limit(key: str, value: object) -> int | None:
    return None if value is None else as_int(key, value, minimum=1)


def _parse_timezone(key: str, value: object) -> str:
    text = as_str(key, value)
    parse_offset(text)
    return text


_CONFIG_FIELDS: Final[Mapping[str, tuple[str, Callable[[str, object], Any]]]] = {
    "latencySeconds": ("latency_s", lambda k, v: as_number(k, v, minimum=0.0)),
    "rateLimitPerMinute": ("rate_limit_per_minute", _parse_rate_limit),
    "tokenTtlSeconds": (
        "token_ttl_s",
        lambda k, v: min(as_int(k, v, minimum=1), MAX_TOKEN_TTL_S),
    ),
    "timezone": ("timezone", _parse_timezone),
    "strictSeries": ("strict_series", as_bool),
    "shuffleEntries": ("shuffle_entries", as_bool),
    "readbackLagSeconds": ("readback_lag_s", lambda k, v: as_number(k, v, minimum=0.0)),
    "oneActionPerCustomer": ("one_action_per_customer", as_bool),
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
    #: Doc (series properties): ``maxVouchersPerUser`` (-1 no limit; refused with 5002 "max
    #: coupons per user exceeded" once reached).
    max_per_user: int | None = None
    #: Doc (idempotency): ``isMultipleVouchersPerUserAllowed=false`` refuses a second coupon
    #: of the series to a customer (709, "user already has a coupon").
    multiple_per_user: bool = True
    #: Doc (response): ``warnings[]`` per entry; their shape is not documented (defensive:
    #: ``{"code", "message"}`` objects, as the errors are).
    warnings: tuple[str, ...] = ()
    behaviour: Behaviour = "valid"
    error_code: int = 730
    error_message: str = "Unknown error"
    issue_on_error: bool = False

    def updated(self, fields: Mapping[str, Any]) -> SeriesSettings:
        """A copy with the given camelCase fields changed; unknown or bad fields are refused."""
        reject_unknown("series", fields, _SERIES_FIELDS)
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
            "isMultipleVouchersPerUserAllowed": self.multiple_per_user,
            "warnings": list(self.warnings),
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
    number = as_int(key, value, minimum=-1)
    # Capillary spells "no limit" as -1 (maxVouchersPerUser); keep one spelling inside.
    return None if number == -1 else number


def _parse_warnings(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SandboxInputError(f"{key} must be a list of strings, got {value!r}")
    return tuple(as_str(key, item) for item in value)


_SERIES_FIELDS: Final[Mapping[str, tuple[str, Callable[[str, object], Any]]]] = {
    "description": ("description", as_opt_str),
    "discountCode": ("discount_code", as_opt_str),
    "discountType": ("discount_type", lambda k, v: as_choice(k, v, get_args(DiscountType))),
    "discountValue": ("discount_value", lambda k, v: as_number(k, v, minimum=0.0)),
    "discountUpto": ("discount_upto", lambda k, v: as_number(k, v, minimum=0.0)),
    "validDays": ("valid_days", lambda k, v: as_int(k, v, minimum=0)),
    "maxPerUser": ("max_per_user", _parse_max_per_user),
    "maxVouchersPerUser": ("max_per_user", _parse_max_per_user),
    "isMultipleVouchersPerUserAllowed": ("multiple_per_user", as_bool),
    "warnings": ("warnings", _parse_warnings),
    "behaviour": ("behaviour", lambda k, v: as_choice(k, v, get_args(Behaviour))),
    "errorCode": ("error_code", lambda k, v: as_int(k, v, minimum=1)),
    "errorMessage": ("error_message", as_str),
    "issueOnError": ("issue_on_error", as_bool),
}
