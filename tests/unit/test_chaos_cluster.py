"""The cluster chaos run's verdict on the failover: every worker back, the node back, and the
entities claimed at the kill issued within the recovery target."""

from __future__ import annotations

from dataclasses import replace

from coupon_devtools.chaos.report import Failover

DONE = Failover(killed="n1@localhost", new_leader="n2@localhost", reconnected_s=(0.03, 0.05),
                consuming_again_s=6.0, down_s=8.0, back_s=12.0, in_flight=4, recovered=4,
                recovered_s=19.9, target_s=90.0)


def test_a_failover_within_the_target_passes_and_reads_as_measured() -> None:
    assert DONE.ok
    rows = {label: (value, text) for label, value, text in DONE.rows()}
    assert rows["reconnected"][0] == "50 ms"
    assert rows["failover"][0] == "6.0 s"
    assert rows["in flight at the kill"] == (
        "4", "4/4 issued, the last 19.9 s after the kill (target 90 s)")


def test_an_entity_never_issued_or_issued_late_fails_it() -> None:
    assert not replace(DONE, recovered=3, recovered_s=None).ok
    assert not replace(DONE, recovered_s=90.5).ok


def test_workers_not_consuming_again_or_a_node_not_back_fails_it() -> None:
    assert not replace(DONE, consuming_again_s=None).ok
    assert not replace(DONE, back_s=None).ok
    assert not replace(DONE, parked=1).ok, "a parked message waits for an operator"
    assert not replace(DONE, parked=None).ok
    # No call in flight at the kill is no failure
    assert replace(DONE, in_flight=0, recovered=0, recovered_s=0.0).ok
