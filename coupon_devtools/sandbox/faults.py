"""Fault rules: what the sandbox does wrong, to which calls, how often; and the refusals
that a series' behaviour implies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast, get_args

from coupon_devtools.sandbox.config import SeriesSettings
from coupon_devtools.sandbox.inputs import (
    DEFAULT_FAULT_DELAY_S,
    FaultKind,
    FaultPath,
    JsonDict,
    PathClass,
    SandboxInputError,
    as_choice,
    as_int,
    as_number,
    as_opt_str,
    reject_unknown,
)


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
        reject_unknown("fault", fields, _FAULT_FIELDS)
        if "kind" not in fields:
            raise SandboxInputError("fault kind is required")
        kind = cast(FaultKind, as_choice("kind", fields["kind"], get_args(FaultKind)))
        times = as_int("times", fields.get("times", 1), minimum=-1)
        if times == 0:
            raise SandboxInputError("times must be >= 1, or -1 for forever")
        series = fields.get("series")
        customer = fields.get("customer")
        if isinstance(customer, int) and not isinstance(customer, bool):
            customer = str(customer)
        redirect = kind == "redirect_after"
        status = as_int("status", fields.get("status", 307 if redirect else 500), minimum=100)
        if status > 599:
            raise SandboxInputError(f"status must be an HTTP status (100-599), got {status}")
        if redirect and not 300 <= status < 400:
            raise SandboxInputError(f"a redirect's status is a 3xx, got {status}")
        probability = as_number("probability", fields.get("probability", 1.0), minimum=0.0)
        if not 0.0 < probability <= 1.0:
            raise SandboxInputError(f"probability must be > 0 and <= 1, got {probability:g}")
        return cls(
            id=rule_id,
            kind=kind,
            remaining=times,
            series=None if series is None else as_int("series", series),
            customer=as_opt_str("customer", customer),
            path=cast(
                FaultPath, as_choice("path", fields.get("path", "bulk"), get_args(FaultPath))
            ),
            delay_s=as_number(
                "delaySeconds",
                fields.get("delaySeconds", DEFAULT_FAULT_DELAY_S.get(kind, 0.0)),
                minimum=0.0,
            ),
            status=status,
            retry_after_s=as_int(
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


DEFAULT_SERIES: Final = SeriesSettings()
#: What a series' behaviour answers. Doc (error codes): 707 invalid series id, 712 series or
#: campaign expired. "inactive" models "only active series issue" (series properties); its
#: code is not documented (defensive: 712, which the worker reads as permanent, as 707).
BEHAVIOUR_REFUSALS: Final[Mapping[str, tuple[int, str]]] = {
    "invalid": (707, "Invalid series id"),
    "expired": (712, "Series expired"),
    "inactive": (712, "Series is not active"),
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
