"""The chaos run's judge: the sandbox's ground truth against the events and our ledger."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from coupon_devtools.chaos.ground_truth import Comparison, Recorded, compare
from coupon_devtools.chaos.publishing import plan_deliveries
from coupon_devtools.chaos.recovery import Claimed, Recovery
from coupon_devtools.chaos.report import Report
from worker.domain.model import issue_ref

EXPECTED = {"e1": ("101", (10, 11)), "e2": ("102", (10, 11))}


def coupon(code: str, event_id: str, series: int, customer: str | None = None,
           attempt: str = "0a0b0c") -> dict[str, Any]:
    """A sandbox ledger row as `GET /sandbox/ledger` gives it."""
    if customer is None:
        customer = EXPECTED[event_id][0] if event_id in EXPECTED else "999"
    return {"code": code, "seriesId": series, "customerId": customer,
            "metadata": {"notes": f"Gold tier welcome [{issue_ref(event_id)}.{attempt}]"}}


def all_issued() -> tuple[list[dict[str, Any]], dict[tuple[str, int], Recorded]]:
    issued = [coupon(f"C{e}{s}", e, s) for e in EXPECTED for s in EXPECTED[e][1]]
    ledger = {(e, s): Recorded("issued", (f"C{e}{s}",)) for e in EXPECTED
              for s in EXPECTED[e][1]}
    return issued, ledger


def test_every_entity_issued_once_and_recorded_is_exactly_once() -> None:
    issued, ledger = all_issued()
    # Coupons of other events, or without our reference, are none of this run's business
    issued += [coupon("OTHER", "e9", 10), {"code": "X", "seriesId": 10, "customerId": "101",
                                           "metadata": None}]
    result = compare(EXPECTED, issued, ledger)
    assert result.exactly_once and not result.disagreements
    assert (result.expected, result.issued, result.detected) == (4, 4, 0)


def test_an_entity_never_issued_is_missing_and_says_what_the_ledger_thinks() -> None:
    issued, ledger = all_issued()
    issued = [c for c in issued if c["code"] != "Ce211"]
    ledger[("e2", 11)] = Recorded("dead", (), "unknown_outcome")
    result = compare(EXPECTED, issued, ledger)
    assert result.missing == ["event e2 series 11: never issued; the ledger says dead "
                              "(unknown_outcome)"]
    assert result.dead == Counter({"unknown_outcome": 1})
    assert not result.exactly_once


def test_an_entity_issued_twice_is_counted_and_detected_only_if_the_ledger_flagged_it() -> None:
    issued, ledger = all_issued()
    issued.append(coupon("LATE", "e1", 10, attempt="ffffff"))
    undetected = compare(EXPECTED, issued, ledger)
    assert len(undetected.twice) == 1 and undetected.detected == 0
    assert undetected.disagreements == ["event e1 series 10: the sandbox issued Ce110, LATE; "
                                        "the ledger says issued with Ce110"]
    ledger[("e1", 10)] = Recorded("duplicate_issued", ("Ce110", "LATE"))
    detected = compare(EXPECTED, issued, ledger)
    assert len(detected.twice) == 1 and detected.detected == 1
    assert not detected.disagreements and not detected.exactly_once


def test_a_coupon_with_our_reference_for_another_customer_or_series_is_a_stray() -> None:
    issued, ledger = all_issued()
    issued += [coupon("WRONG", "e1", 10, customer="555"), coupon("ODD", "e2", 12)]
    result = compare(EXPECTED, issued, ledger)
    assert len(result.strays) == 2 and not result.twice and not result.exactly_once


def test_the_ledger_disagreeing_with_the_sandbox_is_reported() -> None:
    issued, ledger = all_issued()
    ledger[("e1", 10)] = Recorded("issued", ("NOPE",))  # a code the sandbox never issued
    ledger[("e1", 11)] = Recorded("retry_wait")  # issued, yet the ledger does not know
    issued = [c for c in issued if c["code"] != "Ce210"]
    ledger[("e2", 10)] = Recorded("issued", ("Ce210",))  # recorded, never issued
    result = compare(EXPECTED, issued, ledger)
    assert result.disagreements == [
        "event e1 series 10: the sandbox issued Ce110; the ledger says issued with NOPE",
        "event e1 series 11: the sandbox issued Ce111; the ledger says retry_wait with no "
        "coupon",
        "event e2 series 10: the ledger records Ce210, which the sandbox never issued",
    ]


def report(result: Comparison, **changes: Any) -> Report:
    base = Report(events=2, messages=2, republished=0, result=result, late=None, struck={},
                  calls={}, killed=[], exited=[], alive=3, healthy=3, workers=3,
                  consuming={"tasks": 3, "retry": 3}, settled_s=1.0, elapsed_s=2.0,
                  script_failures=[])
    return replace(base, **changes)


def test_the_verdict_needs_exactly_once_every_worker_consuming_and_a_settled_ledger() -> None:
    clean = compare(EXPECTED, *all_issued())
    assert report(clean).passed
    assert not report(clean, alive=2).passed
    assert not report(clean, healthy=2).passed
    assert not report(clean, consuming={"tasks": 3, "retry": 2}).passed
    assert not report(clean, settled_s=None).passed
    assert not report(clean, script_failures=["RabbitMQ restart: timed out"]).passed
    issued, ledger = all_issued()
    assert not report(compare(EXPECTED, issued[1:], ledger)).passed


def test_a_late_original_passes_only_when_every_duplicate_was_detected() -> None:
    clean = compare(EXPECTED, *all_issued())
    issued, ledger = all_issued()
    issued.append(coupon("LATE", "e1", 10, attempt="ffffff"))
    assert not report(clean, late=compare(EXPECTED, issued, ledger)).passed
    ledger[("e1", 10)] = Recorded("duplicate_issued", ("Ce110", "LATE"))
    assert report(clean, late=compare(EXPECTED, issued, ledger)).passed


def test_a_killed_workers_claims_are_reported_and_only_losing_one_fails_the_run() -> None:
    clean = compare(EXPECTED, *all_issued())
    quick = Recovery("killed worker's claims", in_flight=2, recovered=2, recovered_s=31.5)
    assert report(clean, worker_kill=quick).passed
    assert quick.row() == ("killed worker's claims", "2/2", "issued, the last 31.5 s after "
                           "the kill (within the 90 s recovery target)")
    # Slow is a figure to read, not a failure: the run proves exactly once, not timing
    slow = replace(quick, recovered_s=120.0)
    assert report(clean, worker_kill=slow).passed and "OVER the 90 s" in slow.row()[2]
    lost = replace(quick, recovered=1, recovered_s=None)
    assert not report(clean, worker_kill=lost).passed
    assert lost.row()[2].startswith("issued, the last never after the kill")


def test_claims_are_attributed_to_the_worker_whose_pool_process_holds_them() -> None:
    claimed = Claimed(datetime.now(UTC), {1: "host:101/task:a", 2: "host:202", 3: "host:101"})
    assert claimed.held_by(lambda pid: pid == 101) == (1, 3)


def test_some_events_are_delivered_twice_the_other_way_in() -> None:
    events = [{"eventId": f"e{i}"} for i in range(40)]
    deliveries = plan_deliveries(events)
    counts = Counter(d.event["eventId"] for d in deliveries)
    assert set(counts) == {e["eventId"] for e in events}
    twice = [e for e, n in counts.items() if n == 2]
    assert twice == ["e7", "e27"]
    assert {d.via for d in deliveries if d.event["eventId"] == "e7"} == {"bus", "task"}
    assert Counter(d.via for d in deliveries)["task"] >= 8
