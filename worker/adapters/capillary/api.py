"""The seam between the services and Capillary: what a call returns, whatever went wrong.

``bulk_issue`` never raises for a Capillary-side problem: it returns one ``EntryOutcome`` per
requested series, with the verdict already classified (a timeout becomes AMBIGUOUS for every
series of the call). Read-backs raise ``CapillaryError`` subclasses, since an unanswered
read-back proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from worker.domain.model import Coupon, EntryError, Verdict


@dataclass(frozen=True)
class CallInfo:
    """What every HTTP call leaves behind in the ledger."""

    operation: str
    started_at: datetime
    latency_ms: float
    status: int | None
    request_id: str | None
    outcome: str
    #: What went wrong, in the one shape an entry's error has too.
    error: EntryError | None = None

    @property
    def error_code(self) -> str | None:
        return self.error.code if self.error is not None else None

    @property
    def error_message(self) -> str | None:
        return self.error.message if self.error is not None else None


@dataclass(frozen=True)
class EntryOutcome:
    """The result for one series of a bulk call."""

    series_id: int
    verdict: Verdict
    coupon: Coupon | None = None
    error: EntryError | None = None
    #: Capillary's ``warnings`` for this series (and the parser's own remarks), as text.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BulkIssueResult:
    """Everything a bulk-issue call produced: the call itself and one outcome per series."""

    call: CallInfo
    entries: dict[int, EntryOutcome]
    retry_after_s: float | None = None
    call_level_failure: bool = False
    #: A configuration or auth error seen anywhere in the answer (an entry, the call-level
    #: errors, the status): the fleet pauses, whatever each series' own verdict is.
    outage: EntryError | None = None


@dataclass(frozen=True)
class FoundCoupon:
    """A coupon seen through a read-back API, with the metadata stored when it was issued."""

    coupon: Coupon
    created_at: datetime | None
    issual_details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadBack:
    """The coupons a customer holds in one series, as a read-back call reported them."""

    call: CallInfo
    coupons: tuple[FoundCoupon, ...]


class CouponApi(Protocol):
    """What the services need from Capillary."""

    def bulk_issue(
        self, customer: dict[str, str], series_ids: list[int], metadata: dict[str, str]
    ) -> BulkIssueResult:
        """Issue one coupon of each series to the customer."""
        ...

    def find_coupons(
        self, customer: dict[str, str], series_id: int, since: datetime
    ) -> ReadBack:
        """Coupons of ``series_id`` the customer received since ``since`` (with issue metadata)."""
        ...

    def close(self) -> None:
        """Let go of the connections kept alive, at shutdown."""
        ...
