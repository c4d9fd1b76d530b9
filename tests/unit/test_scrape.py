"""The series read at scrape time: what each reading becomes, and what a failed read leaves."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from worker.adapters.postgres.ratelimit import BucketSpec
from worker.adapters.postgres.vitals import BucketVitals, CircuitVitals, LedgerVitals
from worker.domain.errors import LedgerUnavailable
from worker.metrics import Metrics
from worker.scrape import (
    Configured,
    LedgerReads,
    consumers_collector,
    ledger_collector,
    queues_collector,
)

CONFIGURED = Configured(settle_window_s=120.0)


def scrape(*collectors: object) -> str:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def vitals(**changes: object) -> LedgerVitals:
    values: dict[str, object] = {
        "oldest_retry_s": None, "oldest_unknown_past_settle_s": None, "oldest_dead_s": None,
        "circuits": (), "buckets": ()}
    values.update(changes)
    return LedgerVitals(**values)  # type: ignore[arg-type]


def test_a_ledger_with_nothing_waiting_reads_as_zero_ages_and_a_closed_circuit() -> None:
    body = scrape(ledger_collector(vitals, CONFIGURED))
    assert "coupon_ledger_up 1.0" in body
    # Never opened: no row, and the workers read that as closed
    assert 'coupon_circuit_state{circuit="capillary",state="closed"} 1.0' in body
    assert 'coupon_circuit_state{circuit="capillary",state="open"} 0.0' in body
    assert "coupon_circuit_in_state_seconds{" not in body
    for age in ("retry", "unknown_outcome", "dead_letter"):
        assert f"coupon_{age}_oldest_age_seconds 0.0" in body
    assert "coupon_settle_window_seconds 120.0" in body
    assert "capillary_rate_limit_calls_per_minute" not in body, "no limit configured"


def test_an_open_circuit_and_the_ages_as_on_call_reads_them() -> None:
    reading = vitals(oldest_retry_s=30.0, oldest_unknown_past_settle_s=-20.0,
                     oldest_dead_s=3600.0,
                     circuits=(CircuitVitals("capillary", "half_open", 95.0),))
    body = scrape(ledger_collector(lambda: reading, CONFIGURED))
    assert 'coupon_circuit_state{circuit="capillary",state="half_open"} 1.0' in body
    assert 'coupon_circuit_state{circuit="capillary",state="closed"} 0.0' in body
    assert 'coupon_circuit_in_state_seconds{circuit="capillary"} 95.0' in body
    assert "coupon_retry_oldest_age_seconds 30.0" in body
    # 20 s before its settle time, with a 120 s window: its call was 100 s ago
    assert "coupon_unknown_outcome_oldest_age_seconds 100.0" in body
    assert "coupon_dead_letter_oldest_age_seconds 3600.0" in body


def test_an_unreachable_ledger_says_so_and_leaves_out_what_it_could_not_read() -> None:
    def down() -> LedgerVitals:
        raise LedgerUnavailable("connection refused")

    body = scrape(ledger_collector(down, Configured(120.0, BucketSpec(600, 10), 600)))
    assert "coupon_ledger_up 0.0" in body
    assert "coupon_circuit_state{" not in body and "oldest_age_seconds " not in body
    # What the settings say stays: the alerts still have their yardsticks
    assert "capillary_rate_limit_calls_per_minute 600.0" in body


def test_buckets_give_what_a_call_may_take_now_and_how_long_a_429_holds() -> None:
    spec = BucketSpec(per_minute=600, burst=10)
    reading = vitals(buckets=(BucketVitals("bulk_issue", -3.0, 0.0, 12.5),))
    body = scrape(ledger_collector(lambda: reading, Configured(120.0, spec, 600)))
    assert 'capillary_rate_limit_blocked_seconds{bucket="bulk_issue"} 12.5' in body
    assert 'capillary_rate_limit_tokens{bucket="bulk_issue"} -3.0' in body
    assert "capillary_rate_limit_calls_per_minute 600.0" in body
    # A full bucket never reads above its burst
    assert spec.available(5.0, 3600.0) == 10


def test_paused_consumers_and_queue_backlogs() -> None:
    body = scrape(consumers_collector(lambda: {"q.tasks": True, "q.retry": False}),
                  queues_collector(lambda: {"tasks": ("q.tasks", 7), "dead": ("q.dead", None)}))
    assert 'coupon_consumers_paused{queue="q.tasks"} 1.0' in body
    assert 'coupon_consumers_paused{queue="q.retry"} 0.0' in body
    assert 'coupon_queue_messages_ready{queue="q.tasks",role="tasks"} 7.0' in body
    assert 'queue="q.dead"' not in body, "an unknown count is left out, not a zero"
    assert "coupon_broker_up 1.0" in body


def test_an_unreachable_broker_says_so() -> None:
    def down() -> dict[str, tuple[str, int | None]]:
        raise OSError("refused")

    body = scrape(queues_collector(down))
    assert "coupon_broker_up 0.0" in body
    assert "coupon_queue_messages_ready{" not in body


def test_gauges_set_by_pool_processes_merge_as_the_most_recent() -> None:
    # Under prefork every pool process writes its own samples; the main process serves the
    # latest timestamp any of them wrote, not a sum of timestamps
    metrics = Metrics()
    assert metrics.last_task._multiprocess_mode == "mostrecent"
    assert metrics.last_success._multiprocess_mode == "mostrecent"
    metrics.observe_call("bulk_issue", 503, 10.0)
    assert metrics.registry.get_sample_value(
        "capillary_last_success_timestamp_seconds", {"operation": "bulk_issue"}) is None
    metrics.observe_call("bulk_issue", 200, 10.0)
    assert metrics.registry.get_sample_value(
        "capillary_last_success_timestamp_seconds", {"operation": "bulk_issue"}) > 0
    metrics.read_back("reconcile", "absent")
    assert metrics.registry.get_sample_value(
        "capillary_read_backs_total", {"purpose": "reconcile", "outcome": "absent"}) == 1


def test_after_a_failed_ledger_read_the_scrapes_other_reads_fail_at_once() -> None:
    # Given a ledger that does not answer: each read would wait out its connect timeout
    now = [100.0]
    reads = LedgerReads(hold_s=5.0, clock=lambda: now[0])
    tried: list[str] = []

    def unreachable() -> dict[str, int]:
        tried.append("read")
        now[0] += 5.0  # the connect timeout
        raise LedgerUnavailable("timeout expired")

    # When the first read of a scrape fails
    with pytest.raises(LedgerUnavailable):
        reads.run(unreachable)
    # Then the next one fails at once with its error, without trying
    with pytest.raises(LedgerUnavailable, match="timeout expired"):
        reads.run(unreachable)
    assert tried == ["read"]
    # And once the hold is over, the ledger is tried again (and may answer)
    now[0] += 5.0
    assert reads.run(lambda: {"issued": 1}) == {"issued": 1}
