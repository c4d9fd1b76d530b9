"""Pure rules: what Capillary's answers mean (the unknown-outcome rule), and our references."""

from __future__ import annotations

import random

import pytest

from worker.domain.model import Verdict, attempt_ref, issue_ref, notes_with_ref
from worker.domain.verdicts import (
    classify_entry_error,
    classify_transport,
    classify_unanswered,
    counts_toward_circuit,
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
    ("status", "verdict"),
    [
        # Refused at the door: provably not issued.
        (401, Verdict.OUTAGE),
        (403, Verdict.OUTAGE),
        (429, Verdict.RETRYABLE),
        (421, Verdict.RETRYABLE),
        (425, Verdict.RETRYABLE),
        (407, Verdict.OUTAGE),
        (400, Verdict.PERMANENT),
        (404, Verdict.PERMANENT),
        (413, Verdict.PERMANENT),
        # A gateway's request timeout may come after it forwarded the call.
        (408, Verdict.AMBIGUOUS),
        # Any 5xx, whatever its body, and a success without entries: unknown.
        (500, Verdict.AMBIGUOUS),
        (502, Verdict.AMBIGUOUS),
        (503, Verdict.AMBIGUOUS),
        (504, Verdict.AMBIGUOUS),
        (521, Verdict.AMBIGUOUS),
        (200, Verdict.AMBIGUOUS),
        (201, Verdict.AMBIGUOUS),
        (302, Verdict.AMBIGUOUS),
    ],
)
def test_http_answers_without_entries(status: int, verdict: Verdict) -> None:
    assert classify_unanswered(status) is verdict


@pytest.mark.parametrize(
    ("failure", "verdict"),
    [
        ("connection_refused", Verdict.RETRYABLE),
        ("connect_timeout", Verdict.RETRYABLE),
        ("tls_error", Verdict.RETRYABLE),
        ("tls_dropped", Verdict.AMBIGUOUS),
        ("client_config", Verdict.OUTAGE),
        ("read_timeout", Verdict.AMBIGUOUS),
        ("connection_reset", Verdict.AMBIGUOUS),
        ("transport_error", Verdict.AMBIGUOUS),
    ],
)
def test_transport_failures_are_unknown_once_sent(failure: str, verdict: Verdict) -> None:
    assert classify_transport(failure) is verdict


@pytest.mark.parametrize(
    ("verdict", "status", "counts"),
    [
        (Verdict.AMBIGUOUS, None, True),  # reset, read timeout
        (Verdict.RETRYABLE, None, True),  # connection refused
        (Verdict.AMBIGUOUS, 502, True),
        (Verdict.OUTAGE, 401, True),
        (Verdict.PERMANENT, 400, False),  # one bad event says nothing about Capillary
        (Verdict.PERMANENT, 404, False),
        (Verdict.RETRYABLE, 429, False),
    ],
)
def test_only_outages_count_toward_the_circuit(verdict: Verdict, status: int | None,
                                               counts: bool) -> None:
    assert counts_toward_circuit(verdict, status) is counts


def test_issue_ref_is_stable_across_processes_and_releases() -> None:
    # Pinned values, not a second call: a reference that changed between two worker processes
    # or across a deploy (Python's hash(), a new digest) would stop reconciliation from
    # recognising coupons issued before it.
    assert issue_ref("e-1") == "cw:b94f523196aaacd8"
    assert issue_ref("e-2") == "cw:761d230a06e678ef"


def test_notes_keep_the_reference_within_250_characters() -> None:
    ref = issue_ref("e-1")
    assert notes_with_ref(None, ref) == f"[{ref}]"
    assert notes_with_ref("Gold", ref) == f"Gold [{ref}]"
    long = notes_with_ref("x" * 250, ref)
    assert len(long) <= 250 and long.endswith(f"[{ref}]")


def test_each_attempt_has_its_own_reference_under_the_events() -> None:
    rng = random.Random(7)
    ref = issue_ref("e-1")
    first, second = attempt_ref(ref, rng), attempt_ref(ref, rng)
    assert first != second
    assert first.startswith(ref + ".") and second.startswith(ref + ".")
    assert len(notes_with_ref("x" * 250, first)) <= 250


def test_an_events_summary_follows_its_entities() -> None:
    from worker.domain.model import EntityState, EventState, event_state

    assert event_state([EntityState.ISSUED, EntityState.RETRY_WAIT]) is EventState.PROCESSING
    assert event_state([EntityState.ISSUED, EntityState.DEAD]) is EventState.FAILED
    assert event_state([EntityState.DEAD, EntityState.IN_FLIGHT]) is EventState.PROCESSING
    assert event_state([EntityState.ISSUED, EntityState.DISCARDED,
                        EntityState.DUPLICATE_ISSUED]) is EventState.COMPLETED
