"""Retry policy: full-jitter backoff, Retry-After, attempts, and what each verdict leads to."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from worker.domain.model import Verdict
from worker.domain.policy import (
    OUTCOME_UNRECORDABLE,
    CircuitPolicy,
    DeadLetter,
    Defer,
    HeldCoupon,
    RecordIssued,
    RetryPolicy,
    ScheduleRetry,
    refused_holding,
    unrecordable,
)

POLICY = RetryPolicy(max_attempts=5, base_s=2.0, max_s=60.0, reconcile_delay_s=3.0)


def test_backoff_is_a_full_jitter_draw_under_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (20, 60.0)]:
        draws = [POLICY.backoff(attempt, rng=rng).total_seconds() for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Spread, not a constant: jitter covers most of the range.
        assert max(draws) - min(draws) > ceiling * 0.8


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(1)
    assert all(POLICY.backoff(1, retry_after_s=30, rng=rng) >= timedelta(seconds=30)
               for _ in range(50))


def test_issued_is_recorded() -> None:
    assert POLICY.decide(Verdict.ISSUED, attempts=1) == RecordIssued()


def test_permanent_goes_straight_to_the_dead_letters() -> None:
    decision = POLICY.decide(Verdict.PERMANENT, attempts=1)
    assert isinstance(decision, DeadLetter) and not decision.reconcile_first


def test_retryable_is_retried_until_attempts_run_out() -> None:
    assert isinstance(POLICY.decide(Verdict.RETRYABLE, attempts=4), ScheduleRetry)
    dead = POLICY.decide(Verdict.RETRYABLE, attempts=5)
    assert isinstance(dead, DeadLetter) and "after 5 attempts" in dead.reason


def test_ambiguous_reconciles_first_and_waits_for_read_back() -> None:
    decision = POLICY.decide(Verdict.AMBIGUOUS, attempts=1, rng=random.Random(3))
    assert isinstance(decision, ScheduleRetry)
    assert decision.reconcile_first and decision.delay >= timedelta(seconds=3)
    # Out of attempts, an unknown outcome is read back once more, never sent again
    exhausted = POLICY.decide(Verdict.AMBIGUOUS, attempts=5, rng=random.Random(3))
    assert isinstance(exhausted, ScheduleRetry) and exhausted.reconcile_first
    # That read-back decides: ours is recorded, none (once the original can no longer land)
    # is a dead letter a replay may send again at once
    assert POLICY.after_read_back(1, settled=True, settles_in_s=0, attempts=6) == RecordIssued()
    assert POLICY.after_read_back(0, settled=True, settles_in_s=0, attempts=5) is None
    gave_up = POLICY.after_read_back(0, settled=True, settles_in_s=0, attempts=6)
    assert isinstance(gave_up, DeadLetter) and not gave_up.reconcile_first
    assert gave_up.code == "not_issued" and gave_up.reason.startswith("gave up after 5 attempts")
    assert isinstance(POLICY.after_read_back(0, settled=False, settles_in_s=9, attempts=6),
                      Defer)


def test_outage_defers_without_dead_lettering() -> None:
    decision = POLICY.decide(Verdict.OUTAGE, attempts=99, circuit_open_s=30)
    assert decision == Defer(timedelta(seconds=30))


def test_circuit_opens_at_once_on_outage_and_after_a_run_of_failures() -> None:
    circuit = CircuitPolicy(failure_threshold=3, open_s=10, max_open_s=60)
    assert circuit.opens_after(Verdict.OUTAGE, 1)
    assert not circuit.opens_after(Verdict.RETRYABLE, 2)
    assert circuit.opens_after(Verdict.AMBIGUOUS, 3)
    assert [circuit.open_for(n).total_seconds() for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_a_refusal_says_what_its_code_means_from_the_domains_table() -> None:
    decision = POLICY.decide(Verdict.PERMANENT, attempts=1, error_code="5002")
    assert isinstance(decision, DeadLetter)
    assert decision.reason == "refused by Capillary (5002 max coupons per user (the customer " \
        "already holds the maximum))"


def test_one_code_one_meaning_and_already_holds_one_is_written_once() -> None:
    from worker.domain.model import CAPILLARY_CODES, ERROR_MEANINGS, HOLDS_ONE_CODES
    from worker.domain.policy import ONE_PER_CUSTOMER_CODES
    from worker.domain.verdicts import classify_entry_error

    assert HOLDS_ONE_CODES == ONE_PER_CUSTOMER_CODES == {"709", "5002", "5004"}
    for code, meaning in CAPILLARY_CODES.items():
        assert ERROR_MEANINGS[str(code)] == meaning.meaning
        assert classify_entry_error(code) is meaning.verdict


# -- the dead letters support reads: refusals after an unknown outcome, unrecordable outcomes --

HOLDS_ONE = "5004"
HOLDS_ONE_REASON = "refused by Capillary (5004 one coupon per user (the customer already holds " \
    "one))"
AFTER_UNKNOWN = ", after an earlier attempt whose outcome stayed unknown: "


def _held(n: int) -> list[HeldCoupon]:
    return [HeldCoupon(f"C{i}", datetime(2026, 11, 26, 8, i, 30, 123456, tzinfo=UTC))
            for i in range(1, n + 1)]


def test_a_refusal_to_a_holder_lists_the_customers_coupons_with_their_issue_times() -> None:
    held = [HeldCoupon("AB12", datetime(2026, 11, 26, 8, 0, 5, 999, tzinfo=UTC)),
            HeldCoupon("CD34", None)]
    decision = refused_holding(HOLDS_ONE, held)
    assert decision == DeadLetter(
        HOLDS_ONE_REASON + AFTER_UNKNOWN + "the read-back shows the customer's coupon "
        "AB12 (issued 2026-11-26T08:00:05+00:00), CD34 of this series, not ours (its notes "
        "lack this event's reference)", reconcile_first=True)


def test_a_refusal_to_a_holder_shows_five_coupons_and_counts_the_rest() -> None:
    five = refused_holding(HOLDS_ONE, _held(5)).reason
    assert "C5 (issued 2026-11-26T08:05:30+00:00) of this series" in five
    assert " more" not in five
    six = refused_holding(HOLDS_ONE, _held(6)).reason
    assert "C5 (issued 2026-11-26T08:05:30+00:00) and 1 more of this series" in six
    assert "C6" not in six


def test_a_refusal_after_an_empty_read_back_says_the_customer_holds_none() -> None:
    assert refused_holding("709", []) == DeadLetter(
        "refused by Capillary (709 coupon processing failed (e.g. the customer already holds "
        "one))" + AFTER_UNKNOWN + "the read-back shows no coupon of this series for the customer",
        reconcile_first=True)


def test_an_unrecordable_outcome_is_dead_lettered_to_be_checked_in_capillary() -> None:
    assert unrecordable("coupon AB12", "value too long") == DeadLetter(
        "the ledger refused to record this attempt's outcome (coupon AB12): value too long; "
        "Capillary may hold a coupon for it: check before replaying (a replay reads back "
        "first)", reconcile_first=True, code=OUTCOME_UNRECORDABLE)


# -- read-backs that fail -------------------------------------------------------------------

#: The chaos profile's settings: a settle window of 5 s, a backoff of 0.5 s capped at 8 s.
QUICK = RetryPolicy(max_attempts=8, base_s=0.5, max_s=8.0, reconcile_delay_s=0.5,
                    settle_window_s=5.0)


class Unlucky(random.Random):
    """Every draw at the bottom of its range: the fastest the policy can ever retry."""

    def uniform(self, a: float, b: float) -> float:
        return a


def read_back_until_decided(policy: RetryPolicy, *, attempts: int = 1,
                            age_s: float = 0.0) -> tuple[DeadLetter, float, int]:
    """Fail every read-back, the clock moving by each delay decided: the dead letter, the
    entity's age when it was written and how many read-backs were made."""
    for made in range(1, 1000):
        decision = policy.read_back_failed(Verdict.AMBIGUOUS, attempts=attempts, age_s=age_s,
                                           status=503, rng=Unlucky())
        if isinstance(decision, DeadLetter):
            return decision, age_s, made
        assert isinstance(decision, ScheduleRetry | Defer)
        assert decision.delay > timedelta(0)
        age_s += decision.delay.total_seconds()
        # A scheduled retry spends the attempt; a deferral gives it back.
        attempts += isinstance(decision, ScheduleRetry)
        assert attempts <= policy.max_attempts
    raise AssertionError("failed read-backs never gave the entity up")


def test_a_failed_read_backs_wait_doubles_at_least() -> None:
    rng = random.Random(5)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        draws = [QUICK.read_back_delay(attempt, rng=rng).total_seconds() for _ in range(200)]
        assert all(max(ceiling / 2, 0.5) <= d <= ceiling for d in draws), attempt
    assert QUICK.read_back_delay(1, retry_after_s=30.0) == timedelta(seconds=30)


def test_failed_read_backs_never_give_an_unknown_outcome_up_before_the_floor() -> None:
    # The chaos run's flake: full jitter drew near zero, eight read-backs failed within one
    # outage of a few seconds and the entity was dead while its coupon existed.
    assert QUICK.unknown_outcome_floor_s == 13.0
    dead, age_s, made = read_back_until_decided(QUICK)
    assert dead.code == "unknown_outcome" and dead.reconcile_first
    assert age_s >= QUICK.unknown_outcome_floor_s
    # ... and it still ends: one backoff past the floor at most, a bounded number of tries.
    assert age_s < QUICK.unknown_outcome_floor_s + QUICK.max_s and made < 20


def test_the_production_defaults_keep_reading_back_for_a_quarter_of_an_hour() -> None:
    defaults = RetryPolicy()
    dead, age_s, made = read_back_until_decided(defaults)
    assert dead.code == "unknown_outcome"
    assert defaults.unknown_outcome_floor_s == 120.0 + 900.0 <= age_s
    assert made <= 20


def test_spent_attempts_wait_for_the_floor_without_spending_more() -> None:
    young = QUICK.read_back_failed(Verdict.AMBIGUOUS, attempts=8, age_s=12.0, rng=Unlucky())
    # At most what is left of the floor: the next read-back that fails past it ends the entity.
    assert young == Defer(timedelta(seconds=1.0))
    old = QUICK.read_back_failed(Verdict.AMBIGUOUS, attempts=8, age_s=13.0)
    assert isinstance(old, DeadLetter) and old.code == "unknown_outcome"
    assert "after 8 attempts" in old.reason


def test_an_old_entity_with_attempts_left_is_read_back_again() -> None:
    # Age alone never gives up: an entity that waited hours behind an open circuit still gets
    # its attempts.
    again = QUICK.read_back_failed(Verdict.AMBIGUOUS, attempts=3, age_s=86400.0)
    assert isinstance(again, ScheduleRetry) and again.reconcile_first


def test_a_throttled_read_back_waits_for_retry_after_without_spending_the_attempt() -> None:
    for attempts, age_s in [(1, 0.0), (8, 86400.0)]:
        assert QUICK.read_back_failed(Verdict.AMBIGUOUS, attempts=attempts, age_s=age_s,
                                      status=429, retry_after_s=20.0) == Defer(
            timedelta(seconds=20))
