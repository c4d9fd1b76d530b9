"""The rules at their edges: boundaries, defaults and exact decisions.

Written against the survivors of ``make mutation``: each test pins a boundary or a value that
a plausible slip in ``worker/domain/model.py`` or ``worker/domain/policy.py`` would move.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from worker.bootstrap import circuit_policy, retry_policy
from worker.config import load_settings
from worker.domain.model import (
    NOTES_MAX_CHARS,
    EntityState,
    IllegalTransition,
    Verdict,
    attempt_ref,
    check_transition,
    describe_error,
    issue_ref,
    notes_with_ref,
)
from worker.domain.policy import (
    CircuitPolicy,
    DeadLetter,
    Defer,
    RecordDuplicate,
    RetryPolicy,
    ScheduleRetry,
    WaitForSlot,
    rate_limit_slot,
    retries_to_dispatch,
)
from worker.domain.runtime_policy import consumption_for_circuit
from worker.domain.verdicts import counts_toward_circuit

POLICY = RetryPolicy(max_attempts=3, base_s=1.0, max_s=60.0, reconcile_delay_s=2.0,
                     settle_window_s=20.0)
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
REF = issue_ref("e-1")


def test_an_illegal_move_says_which_it_was() -> None:
    # It is a bug in the ledger, found from the log: the message is all there is to go on.
    with pytest.raises(IllegalTransition, match="cannot move from issued to pending"):
        check_transition(EntityState.ISSUED, EntityState.PENDING)


# -- references and notes --------------------------------------------------------------------


def test_an_attempts_own_part_is_always_six_hex_digits() -> None:
    rng = random.Random(11)
    tails = [attempt_ref(REF, rng).removeprefix(REF + ".") for _ in range(200)]
    assert all(len(t) == 6 and int(t, 16) >= 0 for t in tails)


def test_notes_that_fit_exactly_are_kept_whole() -> None:
    room = NOTES_MAX_CHARS - len(f"[{REF}]") - 1
    fits = "n" * room
    assert notes_with_ref(fits, REF) == f"{fits} [{REF}]"
    assert len(notes_with_ref(fits, REF)) == NOTES_MAX_CHARS


def test_notes_one_character_too_long_are_cut_to_exactly_the_limit() -> None:
    room = NOTES_MAX_CHARS - len(f"[{REF}]") - 1
    notes = "abcdefghij" * 30
    cut = notes_with_ref(notes[: room + 1], REF)
    assert cut == notes[: room - 1] + "\u2026" + f" [{REF}]"
    assert len(cut) == NOTES_MAX_CHARS


@pytest.mark.parametrize(
    ("code", "shown"),
    [
        (None, "-"),
        ("712", "712 series/campaign expired"),
        ("http_503", "http_503 HTTP 503"),
        ("unheard_of", "unheard_of"),
    ],
)
def test_error_codes_are_shown_with_their_meaning(code: str | None, shown: str) -> None:
    assert describe_error(code) == shown


# -- what failures mean ------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "counts"), [(499, False), (500, True)])
def test_the_circuit_counts_from_the_first_5xx(status: int, counts: bool) -> None:
    assert counts_toward_circuit(Verdict.AMBIGUOUS, status) is counts


# -- decisions ----------------------------------------------------------------------------------


def test_an_outage_defers_for_the_default_circuit_pause() -> None:
    assert POLICY.decide(Verdict.OUTAGE, attempts=1) == Defer(timedelta(seconds=30))
    assert POLICY.read_back_failed(Verdict.OUTAGE, attempts=1, age_s=0.0) == Defer(
        timedelta(seconds=30))


def test_dead_letters_say_why_and_whether_to_read_back_first() -> None:
    assert POLICY.decide(Verdict.PERMANENT, attempts=1) == DeadLetter(
        "refused by Capillary", reconcile_first=False)
    assert POLICY.decide(Verdict.RETRYABLE, attempts=3) == DeadLetter(
        "gave up after 3 attempts", reconcile_first=False)
    assert POLICY.read_back_failed(Verdict.AMBIGUOUS, attempts=3, age_s=1e6) == DeadLetter(
        "unknown_outcome: still unknown after 3 attempts "
        "(a person checks Capillary; replay reads back before sending)",
        reconcile_first=True, code="unknown_outcome")
    assert POLICY.after_read_back(0, settled=True, settles_in_s=0, attempts=4) == DeadLetter(
        "gave up after 3 attempts: the last one's outcome was unknown, and the read-back after "
        "it shows that nothing of ours was issued", reconcile_first=False, code="not_issued")


def test_retry_after_and_the_callers_random_source_reach_the_backoff() -> None:
    # Retry-After is a floor for a retry, a read-back that failed and a 429 alike
    retry = POLICY.decide(Verdict.RETRYABLE, attempts=1, retry_after_s=50.0)
    assert isinstance(retry, ScheduleRetry) and retry.delay == timedelta(seconds=50)
    failed = POLICY.read_back_failed(Verdict.AMBIGUOUS, attempts=1, age_s=0.0,
                                     retry_after_s=50.0)
    assert isinstance(failed, ScheduleRetry) and failed.delay == timedelta(seconds=50)
    assert POLICY.throttled(1, retry_after_s=50.0) == Defer(timedelta(seconds=50))
    # And the draw comes from the random source given (seeded in tests and the bench)
    expected = POLICY.backoff(3, rng=random.Random(4))
    decided = POLICY.decide(Verdict.RETRYABLE, attempts=2, rng=random.Random(4))
    assert isinstance(decided, ScheduleRetry)
    assert decided.delay == POLICY.backoff(2, rng=random.Random(4))
    assert POLICY.throttled(3, retry_after_s=None, rng=random.Random(4)) == Defer(expected)
    many = RetryPolicy(max_attempts=9, base_s=1.0, max_s=60.0, reconcile_delay_s=0.0)
    failed = many.read_back_failed(Verdict.AMBIGUOUS, attempts=5, age_s=0.0,
                                   rng=random.Random(4))
    assert isinstance(failed, ScheduleRetry)
    assert failed.delay == many.read_back_delay(5, rng=random.Random(4))
    assert failed.delay == timedelta(seconds=random.Random(4).uniform(8.0, 16.0))
    jitter = random.Random(4).uniform(0.0, 5.0)
    assert POLICY.deferred(timedelta(seconds=10), rng=random.Random(4)) == Defer(
        timedelta(seconds=10 + jitter))


def test_two_coupons_of_ours_are_a_duplicate() -> None:
    assert isinstance(POLICY.after_read_back(2, settled=True, settles_in_s=0, attempts=1),
                      RecordDuplicate)


def test_a_rate_limit_slot_exactly_at_the_limit_is_waited_for() -> None:
    assert rate_limit_slot(5.0, max_wait_s=5.0) == WaitForSlot(5.0)
    assert isinstance(rate_limit_slot(5.01, max_wait_s=5.0), Defer)


def test_the_probe_is_due_the_instant_the_pause_ends() -> None:
    assert retries_to_dispatch(circuit_state="open", open_until=NOW, now=NOW, batch=9) == 1
    assert retries_to_dispatch(circuit_state="open", open_until=NOW,
                               now=NOW - timedelta(microseconds=1), batch=9) == 0


def test_fresh_events_are_consumed_when_the_circuit_is_closed_or_its_pause_over() -> None:
    later = NOW + timedelta(seconds=30)
    closed = consumption_for_circuit(circuit_state="closed", reason=None, open_until=later,
                                     now=NOW)
    assert not closed.paused, "a closed circuit pauses nothing, whatever open_until says"
    over = consumption_for_circuit(circuit_state="open", reason="down", open_until=NOW,
                                   now=NOW)
    assert not over.paused
    assert consumption_for_circuit(circuit_state="open", reason="down", open_until=later,
                                   now=NOW).paused


def test_policies_are_built_from_the_settings() -> None:
    settings = load_settings(max_attempts=5, retry_base_s=3.0, retry_max_s=400.0,
                             reconcile_delay_s=4.0, settle_window_s=130.0,
                             circuit_failure_threshold=7, circuit_open_s=45.0)
    assert retry_policy(settings) == RetryPolicy(
        max_attempts=5, base_s=3.0, max_s=400.0, reconcile_delay_s=4.0, settle_window_s=130.0)
    assert circuit_policy(settings) == CircuitPolicy(
        failure_threshold=7, open_s=45.0, max_open_s=600.0)
    long_pause = load_settings(circuit_open_s=900.0)
    assert circuit_policy(long_pause).max_open_s == 900.0
