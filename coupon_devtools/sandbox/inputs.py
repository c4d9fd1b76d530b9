"""The sandbox's vocabulary (type aliases, limits), its input error, and the small
validators shared by admin commands, scenarios and API requests."""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, Literal, TypeAlias, cast

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
    "hold",  # holds the call before any work until ``POST /sandbox/release`` (or delaySeconds)
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
    "garbled_after",  # issues, then bytes that are not an answer (a middlebox mangling the
    # stream: over TLS the client's TLS layer fails, over plain HTTP its HTTP parser)
    "redirect_after",  # issues, then a redirect (``status``, 307 unless given) to the same URL
    "odd_numbers_after",  # issues, then the answer with numbers past the ledger's columns
    # Defensive (no published failure example for this endpoint, "never read the status
    # alone"): a gateway or Capillary answering ``status`` (a 400, say) with the real entries.
    "status_after",
    "readback_unreadable",  # read-back answers 200 with an HTML page
    "readback_failure_status",  # read-back answers 200 whose body reports a failure
    "readback_stale",  # read-back answers from a replica that has not seen recent writes
]
Behaviour = Literal["valid", "invalid", "expired", "inactive", "error"]
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

CODE_ALPHABET: Final = string.ascii_uppercase + string.digits
_OFFSET_RE: Final = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
DEFAULT_FAULT_DELAY_S: Final[Mapping[str, float]] = {
    "latency": 1.0, "hold": 60.0, "stall_after": 30.0, "slow_original": 5.0,
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


def utc_iso_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- small validators shared by admin commands and scenarios -------------------------------


def as_str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise SandboxInputError(f"{key} must be a string, got {value!r}")
    return value


def as_opt_str(key: str, value: object) -> str | None:
    return None if value is None else as_str(key, value)


def as_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SandboxInputError(f"{key} must be true or false, got {value!r}")
    return value


def as_int(key: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SandboxInputError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SandboxInputError(f"{key} must be >= {minimum}, got {value}")
    return value


def as_number(key: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SandboxInputError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise SandboxInputError(f"{key} must be a finite number >= {minimum}, got {value}")
    return float(value)


def as_choice(key: str, value: object, choices: Iterable[str]) -> str:
    allowed = tuple(choices)
    if value not in allowed:
        raise SandboxInputError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def as_object(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SandboxInputError(f"{key} must be a JSON object, got {value!r}")
    return cast(Mapping[str, Any], value)


def reject_unknown(what: str, fields: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise SandboxInputError(f"unknown {what} field(s): {', '.join(unknown)}")
