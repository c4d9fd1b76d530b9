"""Reading Capillary's bulk-issue answers: one reading whatever the status, tolerant parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.adapters.capillary.answers import parse_bulk_answer, parse_error, parse_timestamp
from worker.domain.model import Verdict

A, B = 544770, 553379
IST = timezone(timedelta(hours=5, minutes=30))


def coupon(series: int, code: str = "CODE1", **extra: object) -> dict[str, object]:
    return {"entityId": series, "result": {"code": code, "seriesId": series, **extra},
            "errors": [], "warnings": []}


def refusal(series: int, code: object = 712, message: str = "Series expired") -> dict[str, object]:
    return {"entityId": series, "result": None,
            "errors": [{"status": False, "code": code, "message": message}]}


@pytest.mark.parametrize("status", [200, 201, 400, 404, 422, 429, 500, 521])
def test_entries_speak_per_series_whatever_the_status(status: int) -> None:
    parsed = parse_bulk_answer([A, B], status, {"response": [coupon(A), refusal(B)]})
    assert not parsed.unreadable
    assert parsed.entries[A].verdict is Verdict.ISSUED
    assert parsed.entries[A].coupon is not None and parsed.entries[A].coupon.code == "CODE1"
    assert parsed.entries[B].verdict is Verdict.PERMANENT
    assert parsed.entries[B].error is not None and parsed.entries[B].error.code == "712"


@pytest.mark.parametrize(("status", "verdict"), [
    (400, Verdict.PERMANENT), (429, Verdict.RETRYABLE), (401, Verdict.OUTAGE),
    (500, Verdict.AMBIGUOUS), (200, Verdict.AMBIGUOUS),
])
def test_the_status_decides_only_when_no_entry_can_be_read(status: int,
                                                           verdict: Verdict) -> None:
    parsed = parse_bulk_answer([A], status, {"errors": [{"code": 400, "message": "bad"}]})
    assert parsed.unreadable and parsed.entries[A].verdict is verdict


@pytest.mark.parametrize("status", [200, 400, 500])
@pytest.mark.parametrize("code", [788, "795", 799.0, 777])
def test_a_configuration_code_pauses_wherever_it_appears(status: int, code: object) -> None:
    # In an entry
    in_entry = parse_bulk_answer([A, B], status, {"response": [coupon(A), refusal(B, code)]})
    assert in_entry.outage is not None and in_entry.entries[B].verdict is Verdict.OUTAGE
    assert in_entry.entries[A].verdict is Verdict.ISSUED
    # In the call-level errors of an answer without entries: the fleet pauses, and the series
    # waits (a 4xx: not issued) or is read back first (a 2xx or 5xx may have issued)
    call_level = parse_bulk_answer([A], status, {"errors": [{"code": code, "message": "cfg"}]})
    assert call_level.outage is not None
    assert call_level.entries[A].verdict is (
        Verdict.OUTAGE if status == 400 else Verdict.AMBIGUOUS)
    assert call_level.entries[A].error is not None
    assert call_level.entries[A].error.code == str(int(float(str(code))))


def test_an_entry_with_a_coupon_is_issued_even_with_errors() -> None:
    row = coupon(A) | {"errors": [{"code": 730, "message": "unknown"}]}
    entry = parse_bulk_answer([A], 500, {"response": [row]}).entries[A]
    assert entry.verdict is Verdict.ISSUED and entry.coupon is not None
    assert any("730" in w for w in entry.warnings)


@pytest.mark.parametrize(("body", "why"), [
    ({"response": [coupon(A), refusal(B)], "failureCount": 0, "totalCount": 2}, "failureCount"),
    ({"response": [coupon(A), refusal(B)], "failureCount": 1, "totalCount": 3}, "totalCount"),
    ({"response": [coupon(A), refusal(B)], "failureCount": "many"}, "failureCount"),
])
def test_counts_that_disagree_make_every_series_without_a_coupon_unknown(
        body: dict[str, object], why: str) -> None:
    parsed = parse_bulk_answer([A, B], 201, body)
    assert parsed.entries[A].verdict is Verdict.ISSUED, "a coupon entry is issued, always"
    refused = parsed.entries[B]
    assert refused.verdict is Verdict.AMBIGUOUS
    assert refused.error is not None and refused.error.code == "counts_disagree"
    assert why in refused.error.message and "712" in refused.error.message


def test_counts_that_agree_change_nothing() -> None:
    parsed = parse_bulk_answer([A, B], 201, {"response": [coupon(A), refusal(B)],
                                             "failureCount": "1", "totalCount": 2})
    assert parsed.entries[B].verdict is Verdict.PERMANENT


def test_the_series_falls_back_to_the_results_series_id() -> None:
    row = coupon(A)
    row["entityId"] = 987654  # a coupon id, say, not the series
    parsed = parse_bulk_answer([A], 200, {"response": [row]})
    assert parsed.entries[A].verdict is Verdict.ISSUED


def test_entries_in_any_order_repeated_extra_or_missing() -> None:
    rows: list[object] = [refusal(B), "garbage", None, coupon(999), coupon(A), coupon(A)]
    parsed = parse_bulk_answer([A, B, 3], 201, {"response": rows})
    assert parsed.entries[A].verdict is Verdict.ISSUED
    assert parsed.entries[B].verdict is Verdict.PERMANENT
    missing = parsed.entries[3]
    assert missing.verdict is Verdict.AMBIGUOUS and missing.error
    assert missing.error.code == "missing_entry"


def test_repeated_entries_that_disagree_are_unknown() -> None:
    rows = [refusal(A, 712), refusal(A, 730, "Unknown error")]
    entry = parse_bulk_answer([A], 500, {"response": rows}).entries[A]
    assert entry.verdict is Verdict.AMBIGUOUS
    assert entry.error is not None and entry.error.code == "conflicting_entries"


def test_two_coupons_for_one_series_keep_the_first_and_warn_of_the_other() -> None:
    rows = [coupon(A, "FIRST"), coupon(A, "SECOND")]
    entry = parse_bulk_answer([A], 200, {"response": rows}).entries[A]
    assert entry.coupon is not None and entry.coupon.code == "FIRST"
    assert any("SECOND" in w for w in entry.warnings)


@pytest.mark.parametrize(("item", "code", "verdict"), [
    ({"code": "709", "message": "user already has a coupon"}, "709", Verdict.PERMANENT),
    ({"code": 5005.0, "message": "queue empty"}, "5005", Verdict.RETRYABLE),
    ("748: coupon service timed out", "748", Verdict.AMBIGUOUS),
    ("Coupon processing failed", "http_201", Verdict.PERMANENT),
    (42, "http_201", Verdict.PERMANENT),
])
def test_errors_as_objects_or_strings_codes_as_numbers_or_strings(
        item: object, code: str, verdict: Verdict) -> None:
    error = parse_error(item, 201)
    assert (error.code, error.verdict) == (code, verdict)


def test_warnings_are_kept_as_text() -> None:
    row = coupon(A) | {"warnings": [{"code": 9001, "message": "expiry capped"}, "low stock"]}
    entry = parse_bulk_answer([A], 200, {"response": [row]}).entries[A]
    assert entry.warnings == ("9001 expiry capped", "low stock")


@pytest.mark.parametrize(("value", "end_of_day", "expected"), [
    ("2026-06-11T05:30:00+05:30", False, datetime(2026, 6, 11, 0, 0, tzinfo=UTC)),
    ("2026-06-11T00:00:00Z", False, datetime(2026, 6, 11, 0, 0, tzinfo=UTC)),
    # No offset: the organisation's zone
    ("2026-06-11T10:00:00", False, datetime(2026, 6, 11, 10, 0, tzinfo=IST)),
    ("2026-06-11 10:00:00", False, datetime(2026, 6, 11, 10, 0, tzinfo=IST)),
    # A date alone: its midnight, or its last second for an expiry moment, in that zone
    ("2026-06-11", False, datetime(2026, 6, 11, 0, 0, tzinfo=IST)),
    ("2026-06-11", True, datetime(2026, 6, 11, 23, 59, 59, tzinfo=IST)),
    ("not a date", False, None),
    ("", False, None),
])
def test_dates_with_or_without_time_and_offset(value: str, end_of_day: bool,
                                               expected: datetime | None) -> None:
    parsed = parse_timestamp(value, IST, end_of_day=end_of_day)
    assert parsed == expected
    assert parsed is None or parsed.tzinfo is not None


def test_a_date_only_expiry_is_read_in_the_organisations_zone() -> None:
    row = coupon(A, validTill="2026-06-11", validTillDateTime="2026-06-11")
    entry = parse_bulk_answer([A], 200, {"response": [row]}, IST).entries[A]
    assert entry.coupon is not None
    assert entry.coupon.valid_till == datetime(2026, 6, 11, tzinfo=IST)
    assert entry.coupon.valid_till_date_time == datetime(2026, 6, 11, 23, 59, 59, tzinfo=IST)


@pytest.mark.parametrize("status", [200, 400, 500])
def test_an_auth_error_in_the_call_level_errors_pauses_too(status: int) -> None:
    parsed = parse_bulk_answer([A], status, {"errors": [{"code": 401, "message": "Invalid "
                                                         "or expired token"}]})
    assert parsed.outage is not None and parsed.outage.verdict is Verdict.OUTAGE
    assert parsed.outage.code == "401"


def test_a_date_only_issue_date_in_a_read_back_keeps_a_coupon_issued_that_day() -> None:
    from worker.adapters.capillary.api import CallInfo
    from worker.adapters.capillary.client import CapillaryClient

    # Given a read-back row whose issuedDate is a date alone (no time, no offset)
    client = CapillaryClient("http://127.0.0.1:9", timezone=IST)
    call = CallInfo("read_back", datetime(2026, 6, 11, tzinfo=UTC), 1.0, 200, "r", "answered")
    row = {"code": "OURS01", "seriesId": A, "issuedDate": "2026-06-11",
           "couponIssualDetails": {"notes": "[cw:0]"}}
    found = client._found_coupon(row, A, call)
    # Then it counts as issued at the end of that day, so a first attempt made that morning
    # still finds it (never "absent", and sent again)
    assert found is not None
    assert found.created_at == datetime(2026, 6, 11, 23, 59, 59, tzinfo=IST)
