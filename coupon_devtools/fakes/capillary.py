"""A fake ``CouponApi`` for unit tests: scripted faults and a ledger of what it "issued"."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from worker.adapters.capillary.api import (
    BulkIssueResult,
    CallInfo,
    EntryOutcome,
    FoundCoupon,
    ReadBack,
)
from worker.domain.errors import Ambiguous, Retryable
from worker.domain.model import Coupon, EntryError, Verdict
from worker.domain.verdicts import classify_entry_error, classify_transport, classify_unanswered

CallFault = Literal[
    "timeout_after_issue",  # issues, then the answer is lost (read timeout)
    "timeout_before_issue",  # the answer is lost and nothing was issued
    "refused",  # connection refused: nothing sent
    "http_500_json",  # 500 with a JSON error body, nothing issued
    "http_500_json_after_issue",  # issues, then answers 500 with a JSON error body
    "late_original",  # read timeout; the coupon lands only when ``land_late()`` is called
    "rate_limited",  # 429 with Retry-After
    "unauthorized",  # 401
    "bad_request",  # 400: the request itself is refused
    "read_back_fails",  # the next read-back raises Ambiguous
    "read_back_throttled",  # the next read-back answers 429 with Retry-After
]

#: The faults that strike a read-back, not a bulk call.
READ_BACK_FAULTS: frozenset[CallFault] = frozenset({"read_back_fails", "read_back_throttled"})


@dataclass
class FakeIssued:
    customer: dict[str, str]
    series_id: int
    code: str
    notes: str
    at: datetime


def _real_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class FakeCapillary:
    """Issues coupons in memory; faults are queued per call with ``fail_next``.

    ``clock`` is Capillary's clock: it stamps calls and coupons. Unit tests pass theirs (or
    one that runs behind it), so a read-back's ``since`` bound is judged on the same time line
    as the ledger's ``first_attempt_at``.
    """

    series_errors: dict[int, int] = field(default_factory=dict)
    issued: list[FakeIssued] = field(default_factory=list)
    bulk_calls: list[list[int]] = field(default_factory=list)
    read_backs: int = 0
    retry_after_s: float = 2.0
    late: list[FakeIssued] = field(default_factory=list)
    clock: Callable[[], datetime] = _real_clock
    #: The ``since`` of every read-back, in order.
    read_back_since: list[datetime] = field(default_factory=list)
    #: Read-backs fail (a gateway's 503) until this time on ``clock``: an outage of the search.
    read_backs_down_until: datetime | None = None
    _faults: deque[CallFault] = field(default_factory=deque)
    _codes: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    #: Whether ``close`` was called (the process let the API go).
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def fail_next(self, *faults: CallFault) -> None:
        self._faults.extend(faults)

    def land_late(self) -> None:
        """The slow originals finally write their coupons."""
        self.issued.extend(self.late)
        self.late.clear()

    def _call(self, operation: str, status: int | None, outcome: str,
              error: EntryError | None = None) -> CallInfo:
        return CallInfo(operation, self.clock(), 1.0, status, f"req-{len(self.bulk_calls)}",
                        outcome, error)

    def issued_for(self, series_id: int) -> list[FakeIssued]:
        return [i for i in self.issued if i.series_id == series_id]

    def bulk_issue(self, customer: dict[str, str], series_ids: list[int],
                   metadata: dict[str, str]) -> BulkIssueResult:
        self.bulk_calls.append(list(series_ids))
        fault = self._faults.popleft() \
            if self._faults and self._faults[0] not in READ_BACK_FAULTS else None
        if fault in ("timeout_after_issue", "timeout_before_issue", "refused", "late_original"):
            if fault == "timeout_after_issue":
                self._issue(customer, series_ids, metadata)
            if fault == "late_original":
                before = len(self.issued)
                self._issue(customer, series_ids, metadata)
                self.late.extend(self.issued[before:])
                del self.issued[before:]
            code = "connection_refused" if fault == "refused" else "read_timeout"
            return self._whole(series_ids, classify_transport(code), code, None,
                               call_level=True)
        if fault in ("http_500_json", "http_500_json_after_issue"):
            if fault == "http_500_json_after_issue":
                self._issue(customer, series_ids, metadata)
            return self._whole(series_ids, classify_unanswered(500), "http_500", 500,
                               call_level=True)
        if fault == "rate_limited":
            result = self._whole(series_ids, classify_unanswered(429), "http_429", 429,
                                 call_level=True)
            return BulkIssueResult(result.call, result.entries, self.retry_after_s, True)
        if fault == "bad_request":
            return self._whole(series_ids, classify_unanswered(400), "http_400", 400,
                               call_level=True)
        if fault == "unauthorized":
            return self._whole(series_ids, classify_unanswered(401), "http_401", 401,
                               call_level=True)
        entries: dict[int, EntryOutcome] = {}
        for series_id in series_ids:
            code_ = self.series_errors.get(series_id)
            if code_ is not None:
                verdict = classify_entry_error(code_, "")
                entries[series_id] = EntryOutcome(
                    series_id, verdict, error=EntryError(str(code_), f"error {code_}", verdict))
            else:
                coupon = self._issue(customer, [series_id], metadata)[0]
                entries[series_id] = EntryOutcome(series_id, Verdict.ISSUED, coupon=coupon)
        failures = sum(e.verdict is not Verdict.ISSUED for e in entries.values())
        status = 200 if failures == 0 else (500 if failures == len(entries) else 201)
        return BulkIssueResult(self._call("bulk_issue", status, "answered"), entries)

    def _whole(self, series_ids: list[int], verdict: Verdict, code: str, status: int | None,
               *, call_level: bool) -> BulkIssueResult:
        error = EntryError(code, code, verdict)
        return BulkIssueResult(
            self._call("bulk_issue", status, verdict.value, error),
            {s: EntryOutcome(s, verdict, error=error) for s in series_ids},
            call_level_failure=call_level,
        )

    def _issue(self, customer: dict[str, str], series_ids: list[int],
               metadata: dict[str, str]) -> list[Coupon]:
        coupons = []
        for series_id in series_ids:
            code = f"FAKE{next(self._codes):06d}"
            self.issued.append(FakeIssued(customer, series_id, code, metadata.get("notes", ""),
                                          self.clock()))
            coupons.append(Coupon(code=code, series_id=series_id))
        return coupons

    def find_coupons(self, customer: dict[str, str], series_id: int,
                     since: datetime) -> ReadBack:
        self.read_backs += 1
        self.read_back_since.append(since)
        fault = self._faults.popleft() \
            if self._faults and self._faults[0] in READ_BACK_FAULTS else None
        if fault == "read_back_fails":
            raise Ambiguous("read-back timed out")
        if fault == "read_back_throttled":
            raise Retryable("read-back rate limited", status=429,
                            retry_after_s=self.retry_after_s)
        if self.read_backs_down_until is not None and self.clock() < self.read_backs_down_until:
            raise Ambiguous("read-back answered 503", status=503)
        found = tuple(
            FoundCoupon(Coupon(code=i.code, series_id=i.series_id), i.at, {"notes": i.notes})
            for i in self.issued
            if i.series_id == series_id and i.customer == customer and i.at >= since
        )
        return ReadBack(self._call("read_back", 200, "answered"), found)
