"""The runtime's decisions: requeues, deferral jitter, the one-probe rule, pauses, back-pressure."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from worker.domain import policy, runtime_policy
from worker.domain.model import DeadMessageKind
from worker.domain.policy import DEFER_JITTER_S, RetryPolicy, retries_to_dispatch
from worker.domain.runtime_policy import (
    BACKLOG_MIN,
    BACKLOG_PER_SLOT,
    CONSUME,
    FAILED_DELIVERY_PAUSE_BASE_S,
    FAILED_DELIVERY_PAUSE_MAX_S,
    LEDGER_DOWN_PAUSE_S,
    KeepAsDeadLetter,
    Requeue,
    after_failed_delivery,
    bridge_high_water,
    bridge_room,
    consumption_for_circuit,
    consumption_for_ledger_down,
    requeue,
)

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def test_a_ledger_outage_requeues_after_a_pause_and_a_time_limit_at_once() -> None:
    assert requeue(ledger_down=True).pause_s == LEDGER_DOWN_PAUSE_S > 0
    assert requeue(ledger_down=False).pause_s == 0


def test_a_deferral_is_spread_over_the_jitter_window() -> None:
    rng = random.Random(3)
    delays = [RetryPolicy().deferred(timedelta(seconds=30), rng=rng).delay.total_seconds()
              for _ in range(200)]
    assert all(30 <= d <= 30 + DEFER_JITTER_S for d in delays)
    assert max(delays) - min(delays) > DEFER_JITTER_S * 0.8


def test_a_closed_circuit_dispatches_a_batch() -> None:
    assert retries_to_dispatch(circuit_state="closed", open_until=None, now=NOW, batch=50) == 50


def test_an_open_circuit_dispatches_nothing_while_its_pause_lasts() -> None:
    later = NOW + timedelta(seconds=10)
    assert retries_to_dispatch(circuit_state="open", open_until=later, now=NOW, batch=50) == 0


def test_an_open_circuit_whose_pause_is_over_dispatches_exactly_one_probe() -> None:
    earlier = NOW - timedelta(seconds=1)
    assert retries_to_dispatch(circuit_state="open", open_until=earlier, now=NOW, batch=50) == 1
    assert retries_to_dispatch(circuit_state="open", open_until=None, now=NOW, batch=50) == 1


def test_a_half_open_circuit_dispatches_nothing_while_its_probe_is_out() -> None:
    earlier = NOW - timedelta(seconds=1)
    assert retries_to_dispatch(circuit_state="half_open", open_until=earlier, now=NOW,
                               batch=50) == 0


def test_fresh_events_pause_while_the_circuit_is_open_but_retries_keep_flowing() -> None:
    pause = consumption_for_circuit(circuit_state="open", reason="http_503",
                                    open_until=NOW + timedelta(seconds=5), now=NOW)
    assert pause.roles == {"tasks"}
    assert pause.reason == "circuit open: http_503"


def test_consumers_resume_when_the_circuit_pause_is_over_or_it_is_closed() -> None:
    over = consumption_for_circuit(circuit_state="open", reason="http_503",
                                   open_until=NOW - timedelta(seconds=1), now=NOW)
    closed = consumption_for_circuit(circuit_state="closed", reason=None, open_until=None,
                                     now=NOW)
    assert over == closed == CONSUME
    assert not CONSUME.paused


def test_a_ledger_outage_pauses_both_the_tasks_and_the_retries() -> None:
    pause = consumption_for_ledger_down("connection refused")
    assert pause.paused
    assert pause.roles == {"tasks", "retry"}
    assert pause.reason == "database unavailable: connection refused"


def test_the_high_water_mark_grows_with_the_pool_and_has_a_floor() -> None:
    assert bridge_high_water(None) == BACKLOG_MIN
    assert bridge_high_water(1) == BACKLOG_MIN
    assert bridge_high_water(8) == 8 * BACKLOG_PER_SLOT


def test_the_bridge_has_room_for_what_the_task_queue_lacks_below_its_mark() -> None:
    assert bridge_room(32, 10) == 22
    assert bridge_room(32, 40) == 0


def test_every_publish_retries_for_a_bounded_time() -> None:
    retry = runtime_policy.PUBLISH_RETRY_POLICY
    assert retry["max_retries"] == 5
    assert retry["interval_max"] <= 2.0


def test_a_near_rate_limit_slot_is_waited_for() -> None:
    assert policy.rate_limit_slot(0.4, max_wait_s=30.0) == policy.WaitForSlot(0.4)


def test_a_far_rate_limit_slot_defers_instead_of_holding_a_process() -> None:
    slot = policy.rate_limit_slot(45.0, max_wait_s=30.0)
    assert slot == policy.Defer(timedelta(seconds=45.0))


def test_a_429_holds_the_fleet_for_retry_after_or_else_the_base_delay() -> None:
    retry = RetryPolicy(base_s=2.0)
    assert retry.throttle_penalty_s(7.0) == 7.0
    assert retry.throttle_penalty_s(None) == 2.0


def test_a_failed_delivery_goes_back_after_a_pause_doubling_up_to_its_cap() -> None:
    error = RuntimeError("a bug of ours")
    pauses = [after_failed_delivery(n, error, limit=10) for n in range(0, 9)]
    assert [p.pause_s for p in pauses if isinstance(p, Requeue)] == [
        FAILED_DELIVERY_PAUSE_BASE_S, FAILED_DELIVERY_PAUSE_BASE_S,
        2 * FAILED_DELIVERY_PAUSE_BASE_S, 4 * FAILED_DELIVERY_PAUSE_BASE_S,
        8 * FAILED_DELIVERY_PAUSE_BASE_S, FAILED_DELIVERY_PAUSE_MAX_S,
        FAILED_DELIVERY_PAUSE_MAX_S, FAILED_DELIVERY_PAUSE_MAX_S, FAILED_DELIVERY_PAUSE_MAX_S]
    assert after_failed_delivery(10, error, limit=10) == KeepAsDeadLetter(
        DeadMessageKind.INTERNAL_ERROR)
