"""Unknown outcomes settled end to end: read-backs that fail, lag or page, a replay that reads
back first, and a task killed at its hard time limit, with the real worker and the sandbox."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    publish,
    story,
    wait_for_every_delivery,
    wait_for_state,
)
from tests.conftest import WorkerProcess, run_cli, wait_until
from worker.adapters.capillary.client import CapillaryClient
from worker.adapters.rabbitmq.names import split_worker
from worker.config import Settings

#: Customers and series of their own per case, so that a fault strikes its case only.
ERRORS, LAG, PAGES, MOBILE, EMAIL = "930001", "930002", "930003", "930004", "930005"
SERIES = {ERRORS: 810001, LAG: 810002, PAGES: 810003, MOBILE: 810004, EMAIL: 810005}
BY_IDENTIFIER = {MOBILE: {"mobile": "919800000004"}, EMAIL: {"email": "gold@example.com"}}


def bulk_calls(sandbox: SandboxAdmin, series: int, since: float | None = None) -> list[Any]:
    return [c for c in sandbox.calls(since) if c["path"] == "bulk" and series in c["seriesIds"]]


def read_backs(sandbox: SandboxAdmin, series: int, since: float | None = None) -> list[Any]:
    return [c for c in sandbox.calls(since)
            if c["path"] == "readback" and series in (c.get("seriesIds") or ())]


def cli(settings: Settings, *args: str) -> Any:
    done = run_cli(settings, *args, "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def seed_coupons(settings: Settings, customer: str, series: int, count: int) -> None:
    """Coupons the customer already holds in the series (not ours: no reference of ours)."""
    client = CapillaryClient.from_settings(settings)
    metadata = example_event()["metadata"]
    try:
        for _ in range(count):
            result = client.bulk_issue({"id": customer}, [series], metadata)
            assert result.entries[series].coupon is not None
    finally:
        client.close()


def test_read_backs_that_fail_lag_or_page_end_with_exactly_one_coupon(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Five unknown outcomes at once must not pause the fleet here.
    settings = settings_factory(circuit_failure_threshold=50)
    # Given a customer who already holds 60 coupons of a series: more than one read-back page
    seed_coupons(settings, PAGES, SERIES[PAGES], 60)
    started = time.time()
    # And Capillary issuing every series below, then answering 500 (an unknown outcome)
    for series in SERIES.values():
        sandbox.add_fault(kind="error_after", series=series)
    # And read-backs that fail or answer what cannot be read: a 503, a 429, a reset, a proxy's
    # 502 page, an HTML page with 200
    for fault in ({"kind": "error_before", "status": 503}, {"kind": "rate_limit"},
                  {"kind": "reset_before"}, {"kind": "html_after", "status": 502},
                  {"kind": "readback_unreadable"}):
        sandbox.add_fault(path="readback", series=SERIES[ERRORS], **fault)
    # And a read-back replica that has not seen the write yet (lag inside the settle window)
    sandbox.add_fault(path="readback", series=SERIES[LAG], kind="readback_stale")
    # And customers known by mobile or email only, resolved through the v1.1 look-up; the
    # mobile one's look-up first answers a failure inside a 200
    sandbox.add_fault(path="readback", series=SERIES[MOBILE], kind="readback_failure_status")
    start_worker(settings, concurrency=3)
    events = [example_event(f"read-back-{customer}", series=(series,), customer=customer)
              for customer, series in SERIES.items()]
    for event in events:
        event["customer"] = BY_IDENTIFIER.get(event["customer"]["id"], event["customer"])
    publish(settings, *events)

    # Then each entity ends issued, found by read-back, and was sent to Capillary once
    for event in events:
        done = wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
        coupon, = done["coupons"]
        assert coupon["recorded_via"] == "reconcile", event["eventId"]
    wait_for_every_delivery(settings)
    for customer, series in SERIES.items():
        assert len(bulk_calls(sandbox, series, since=started)) == 1, customer
        issued = [c for c in sandbox.ledger(series=series)
                  if "[cw:" in str((c["metadata"] or {}).get("notes"))]
        assert len(issued) == 1, customer
    assert len(sandbox.ledger(series=SERIES[PAGES])) == 61
    # And every fault struck: the read-back failed five times, lagged, and paged
    assert all(f["applied"] == 1 for f in sandbox.faults()), sandbox.faults()
    assert len(read_backs(sandbox, SERIES[ERRORS])) >= 6
    lag_history = _history(clean_ledger, f"read-back-{LAG}")
    assert ("deferred", "settling") in lag_history, "a read-back that lags is waited out"
    assert len(read_backs(sandbox, SERIES[PAGES])) >= 2, "the coupon was on the second page"


def _history(engine: Engine, event_id: str) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT h.kind, h.error_code FROM entity_history h JOIN entities e "
            "ON e.id = h.entity_id WHERE e.event_id = :e ORDER BY h.id"), {"e": event_id})]


def test_a_replay_of_an_unknown_outcome_reads_back_before_it_sends(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(max_attempts=2, circuit_failure_threshold=50)
    landed, lost = "940001", "940002"
    # Given two calls with an unknown outcome: one issued (then 500), one never landed (500)
    sandbox.add_fault(kind="error_after", customer=landed)
    sandbox.add_fault(kind="error_before", customer=lost)
    # And read-backs failing until both entities are dead with "unknown_outcome"
    sandbox.add_fault(kind="error_before", path="readback", status=503, times=-1)
    start_worker(settings)
    events = [example_event(f"replay-unknown-{c}", series=(544770,), customer=c)
              for c in (landed, lost)]
    publish(settings, *events)
    for event in events:
        failed = wait_for_state(clean_ledger, event["eventId"], "failed", timeout_s=60)
        assert failed["entities"][0]["last_error_code"] == "unknown_outcome"
    dead = cli(settings, "dlq", "list", "--error-code", "unknown_outcome")
    assert len(dead) == 2
    # When Capillary's read-back works again and support replays both
    sandbox.clear_faults()
    replayed_at = time.time()
    cli(settings, "dlq", "replay", *(str(d["id"]) for d in dead), "--reason", "read-back fixed")
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    wait_for_every_delivery(settings)
    # Then the coupon that had landed is found, not sent again
    after = sandbox.calls(replayed_at)
    landed_calls = [c["path"] for c in after if c.get("customerId") == landed]
    assert landed_calls and set(landed_calls) == {"readback"}, landed_calls
    assert story(clean_ledger, events[0]["eventId"])["coupons"][0][  # type: ignore[index]
        "recorded_via"] == "reconcile"
    # And the one that never landed is read back first, then sent once
    lost_calls = [c["path"] for c in after if c.get("customerId") == lost]
    assert lost_calls[0] == "readback" and lost_calls.count("bulk") == 1, lost_calls
    for customer in (landed, lost):
        assert len(sandbox.ledger(customer=customer)) == 1, customer


def _claimer(engine: Engine, event_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT h.worker FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = :e AND h.kind = 'claimed' ORDER BY h.id LIMIT 1"),
            {"e": event_id}).scalar()


def test_a_task_hung_past_its_hard_time_limit_is_killed_and_its_event_issued_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(lease_s=12.0, http_connect_timeout_s=0.5,
                                rate_limit_max_wait_s=1.0)
    assert settings.task_hard_time_limit_s == 7.0
    start_worker(settings, concurrency=1)
    # Given a call in flight (Capillary answers, and issues, after 4 s: time enough to see
    # the claim and stop the process on a busy machine, inside the 7 s hard time limit)
    sandbox.add_fault(kind="latency", delay_seconds=4, customer="950001")
    publish(settings, example_event("hung", series=(544770,), customer="950001"))
    claimer = wait_until(lambda: _claimer(clean_ledger, "hung"), message="the claim")
    pid = int(split_worker(claimer)[0].rpartition(":")[2])
    # When the pool process running it hangs where no signal reaches Python (the soft time
    # limit's exception cannot fire in a stopped process)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # Then the worker kills it at the hard time limit, before the claim's lease runs out
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout_s=20,
                   message="the hung pool process to be killed")
        assert time.monotonic() - stopped < settings.lease_s - 2
        assert story(clean_ledger, "hung")["entities"][0]["state"] == "in_flight"  # type: ignore[index]
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
    # And the event ends issued once: its message went back, its claim expired, and the
    # coupon the hung call had issued was found by read-back
    done = wait_for_state(clean_ledger, "hung", "completed", timeout_s=60)
    wait_for_every_delivery(settings)
    assert done["coupons"][0]["recorded_via"] == "reconcile"
    assert len(sandbox.ledger(customer="950001")) == 1
    assert len(bulk_calls(sandbox, 544770)) == 1
