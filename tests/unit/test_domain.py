"""Pure rules: what Capillary's answers mean, and the worker's own reference."""

from __future__ import annotations

import pytest

from worker.domain import (
    Verdict,
    classify_entry_error,
    classify_http_status,
    issue_ref,
    notes_with_ref,
)


@pytest.mark.parametrize("code", [730, 786, 787, 789, 794, 796, 798, 5005, 5006])
def test_try_again_codes_are_retryable(code: int) -> None:
    assert classify_entry_error(code) is Verdict.RETRYABLE


@pytest.mark.parametrize(
    "code", [701, 707, 709, 712, 713, 714, 721, 740, 741, 742, 750, 5001, 5002, 5003, 5004, 999]
)
def test_refusals_and_unknown_codes_are_permanent(code: int) -> None:
    assert classify_entry_error(code) is Verdict.PERMANENT


@pytest.mark.parametrize("code", [777, 788, 795, 799])
def test_configuration_codes_are_outages(code: int) -> None:
    assert classify_entry_error(code) is Verdict.OUTAGE


def test_748_may_have_issued() -> None:
    assert classify_entry_error(748) is Verdict.AMBIGUOUS


def test_722_depends_on_its_message() -> None:
    assert classify_entry_error(722, "Unable to create coupon") is Verdict.PERMANENT
    assert classify_entry_error(722, "Unable to create coupon, try again later") \
        is Verdict.RETRYABLE


@pytest.mark.parametrize(
    ("status", "json_body", "verdict"),
    [
        (401, True, Verdict.OUTAGE),
        (403, False, Verdict.OUTAGE),
        (429, False, Verdict.RETRYABLE),
        (521, True, Verdict.RETRYABLE),
        (500, True, Verdict.RETRYABLE),
        (503, True, Verdict.RETRYABLE),
        (500, False, Verdict.AMBIGUOUS),
        (502, False, Verdict.AMBIGUOUS),
        (400, True, Verdict.PERMANENT),
        (404, False, Verdict.PERMANENT),
    ],
)
def test_http_status_without_entries(status: int, json_body: bool, verdict: Verdict) -> None:
    assert classify_http_status(status, has_json_body=json_body) is verdict


def test_issue_ref_is_stable_and_short() -> None:
    assert issue_ref("e-1") == issue_ref("e-1")
    assert issue_ref("e-1") != issue_ref("e-2")
    assert issue_ref("e-1").startswith("cw:") and len(issue_ref("e-1")) == 19


def test_notes_keep_the_reference_within_250_characters() -> None:
    ref = issue_ref("e-1")
    assert notes_with_ref(None, ref) == f"[{ref}]"
    assert notes_with_ref("Gold", ref) == f"Gold [{ref}]"
    long = notes_with_ref("x" * 250, ref)
    assert len(long) <= 250 and long.endswith(f"[{ref}]")
