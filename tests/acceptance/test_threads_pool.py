"""The worker on Celery's threads pool keeps the prefork pool's promises without a signal:
each event issued once, duplicates absorbed, a SIGKILL mid-call recovered, an attempt that
outlives its deadline losing its claim to another worker, and one process's metrics."""

from __future__ import annotations

from collections.abc import Callable

import requests
from sqlalchemy import Engine, text

from coupon_devtools.harness.processes import free_port
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    metric_value,
    publish,
    wait_for_every_delivery,
    wait_for_state,
    workers_that_claimed,
)
from tests.conftest import WorkerProcess, wait_until
from worker.config import Settings


def bulk_calls(sandbox: SandboxAdmin) -> list[dict[str, object]]:
    return [c for c in sandbox.calls() if c["path"] == "bulk"]


def test_a_backlog_with_duplicates_is_issued_once_per_entity_by_one_threaded_process(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(metrics_port=free_port())
    # Given one worker on the threads pool, 16 threads, and a slow Capillary
    worker = start_worker(settings, concurrency=16, pool="threads")
    sandbox.configure(latency_seconds=0.3)
    # When 40 events are published, every one of them twice (bus and task queue)
    events = [example_event(f"threads-{n}", series=(544770, 553379), customer=f"7{n:05d}")
              for n in range(40)]
    publish(settings, *events, via="bus")
    publish(settings, *events, via="task")
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=90)
    wait_for_every_delivery(settings)
    # Then each entity was sent to Capillary once: 80 coupons, 40 calls
    assert len(sandbox.ledger()) == 80 and len(bulk_calls(sandbox)) == 40
    # And the calls ran side by side (40 calls of 0.3 s one after another take 12 s)
    started = sorted(float(c["t"]) for c in bulk_calls(sandbox))  # type: ignore[arg-type]
    assert started[-1] - started[0] < 8.0, started[-1] - started[0]
    # And one process did it all, without a pool child: the main process claimed
    assert workers_that_claimed(clean_ledger, [worker.process.pid]) == {worker.process.pid}
    # And its metrics count every task of its threads, with no multiprocess directory
    scraped = requests.get(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10)
    assert metric_value(scraped.text, "coupons_issued_total") == 80, scraped.text[-2000:]
    assert metric_value(scraped.text, "coupon_events_received_total", outcome="new") == 40
    assert metric_value(scraped.text, "coupon_events_received_total", outcome="duplicate") == 40
    assert "metrics.single_process" not in worker.log()


def test_sigkill_mid_call_on_the_threads_pool_loses_nothing_and_issues_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(http_timeout_s=3.0, http_connect_timeout_s=0.5,
                                rate_limit_max_wait_s=1.0, lease_s=12.0)
    # Given a threaded worker whose Capillary call issues and then stalls
    worker = start_worker(settings, concurrency=8, pool="threads")
    sandbox.add_fault(kind="stall_after", delay_seconds=10, series=544770)
    publish(settings, example_event("threads-killed", series=(544770,)))
    wait_until(lambda: len(sandbox.ledger()) == 1, message="the sandbox to issue")
    # When the worker is killed with SIGKILL mid-call
    worker.kill()
    # Then a new worker finishes the event by reading it back, without issuing again
    start_worker(settings, concurrency=8, pool="threads")
    done = wait_for_state(clean_ledger, "threads-killed", "completed", timeout_s=60)
    wait_for_every_delivery(settings)
    assert len(sandbox.ledger()) == 1 and len(bulk_calls(sandbox)) == 1
    assert done["coupons"][0]["recorded_via"] == "reconcile"


def test_an_attempt_past_its_deadline_loses_its_claim_to_another_worker_and_sends_nothing_more(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # No hard time limit ends a thread: an attempt of many slow calls, each inside its
    # timeouts, outlives its deadline (lease - 5 s = 10 s). Claims renewed every second.
    settings = settings_factory(
        http_timeout_s=4.0, http_connect_timeout_s=0.5, rate_limit_max_wait_s=1.0,
        lease_s=15.0, claim_heartbeat_s=1.0, settle_window_s=5.0,
        capillary_max_series_per_call=1, prefetch_multiplier=1)
    series = (544770, 553379, 600001, 600002, 600003, 600004, 600005)
    # Given a worker with one thread, and a Capillary that takes 2.5 s per call
    hung = start_worker(settings, concurrency=1, pool="threads")
    sandbox.add_fault(kind="latency", delay_seconds=2.5, times=-1)
    publish(settings, example_event("threads-overdue", series=series))
    wait_until(lambda: bulk_calls(sandbox), message="the first call")
    # And another worker beside it
    other = start_worker(settings, concurrency=4, pool="threads")
    # Then the event completes, every series issued exactly once at Capillary
    wait_for_state(clean_ledger, "threads-overdue", "completed", timeout_s=90)
    wait_for_every_delivery(settings, timeout_s=60)
    assert sorted(c["seriesId"] for c in sandbox.ledger()) == sorted(series)
    sent = [s for c in bulk_calls(sandbox) for s in c["seriesIds"]]  # type: ignore[attr-defined]
    assert sorted(sent) == sorted(series), sent
    # Because the claim lapsed once its renewals stopped at the deadline, and the other
    # worker took what was left
    with clean_ledger.connect() as conn:
        kinds = conn.execute(text(
            "SELECT h.kind FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = 'threads-overdue'")).scalars().all()
    assert "lease_expired" in kinds, kinds
    pids = [hung.process.pid, other.process.pid]
    assert workers_that_claimed(clean_ledger, pids) == set(pids)
    # And the overdue thread sent nothing once its claim had lapsed: it said so
    wait_until(lambda: "lapsed before its call was sent" in hung.log(),
               message="the overdue thread to give up its call")
