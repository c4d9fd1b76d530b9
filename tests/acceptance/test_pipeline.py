"""The real worker in a subprocess, real RabbitMQ, real PostgreSQL, the sandbox as Capillary."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine, text

from coupon_devtools.harness.processes import free_port
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    metric_value,
    publish,
    publish_raw,
    queue_counts,
    queue_ready,
    refusing,
    story,
    wait_for_every_delivery,
    wait_for_state,
    workers_that_claimed,
)
from tests.conftest import WorkerProcess, coupon_worker_command, run_cli, settings_env, wait_until
from worker.config import Settings

EVENT_ID = "tier-upgrade-566881933-2026-11-25"


def bulk_calls(sandbox: SandboxAdmin) -> list[dict[str, object]]:
    return [c for c in sandbox.calls() if c["path"] == "bulk"]


def test_the_same_event_twice_gives_one_set_of_coupons(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a worker
    start_worker(settings)
    # When the example event is published twice on the bus
    publish(settings, example_event(), example_event())
    # Then it completes with one coupon per series, matching the sandbox's own ledger
    done = wait_for_state(clean_ledger, EVENT_ID, "completed")
    # (only once RabbitMQ delivered both messages and the worker acknowledged both)
    wait_for_every_delivery(settings)
    ours = sorted((c["series_id"], c["code"]) for c in done["coupons"])
    theirs = sorted((c["seriesId"], c["code"]) for c in sandbox.ledger())
    assert ours == theirs and len(ours) == 2
    assert len(bulk_calls(sandbox)) == 1
    assert all(c["valid_till_date_time"] for c in done["coupons"])

    # And `events show` tells the same story, as a table and as JSON
    shown = run_cli(settings, "events", "show", EVENT_ID, "--json")
    data = json.loads(shown.stdout)
    assert data["state"] == "completed"
    assert {c["code"] for c in data["coupons"]} == {code for _s, code in ours}
    table = run_cli(settings, "events", "show", EVENT_ID)
    assert all(code in table.stdout for _s, code in ours)


def test_both_ways_in_make_one_call(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    publish(settings, example_event(), via="task")
    publish(settings, example_event(), via="bus")
    wait_for_state(clean_ledger, EVENT_ID, "completed")
    wait_for_every_delivery(settings)
    assert len(bulk_calls(sandbox)) == 1
    assert len(sandbox.ledger()) == 2


def test_bad_input_is_recorded_and_the_worker_keeps_consuming(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings)
    bad = {
        "invalid JSON": b"{this is not json",
        "wrong types": json.dumps({**example_event("bad-types"), "seriesIds": "544770"}).encode(),
        "missing fields": json.dumps({"eventId": "bad-missing"}).encode(),
        "oversize metadata": json.dumps(
            {**example_event("bad-meta"), "metadata": {"notes": "x" * 251}}).encode(),
        "empty series": json.dumps({**example_event("bad-empty"), "seriesIds": []}).encode(),
        "10 MB body": b'{"eventId": "bad-huge", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}',
    }
    publish_raw(settings, *bad.values())
    publish(settings, example_event("good-after-bad"))

    wait_for_state(clean_ledger, "good-after-bad", "completed")

    def rejections() -> list[tuple[str, int, str]]:
        with clean_ledger.connect() as conn:
            return [tuple(r) for r in conn.execute(text(  # type: ignore[misc]
                "SELECT reason, size_bytes, coalesce(event_id, '') FROM rejected_events "
                "ORDER BY id"))]

    rows = wait_until(lambda: len(rejections()) == len(bad) and rejections(),
                      message="every bad message to be recorded")
    reasons = [r[0] for r in rows]
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert any("seriesIds: must be a JSON array" in r for r in reasons)
    assert any("customer: Field required" in r for r in reasons)
    assert any("metadata.notes" in r for r in reasons)
    assert any("must list at least one series id" in r for r in reasons)
    huge = next(r for r in rows if "over the" in r[0])
    assert huge[1] == len(bad["10 MB body"]), "the raw payload is kept whole"
    with clean_ledger.connect() as conn:
        raw = conn.execute(text("SELECT raw FROM rejected_events WHERE reason LIKE 'invalid%'"))
        assert raw.scalar() == bad["invalid JSON"]
    assert "event.rejected" in worker.log()
    # The rejected events are announced on the dead-letter queue for alerting.
    wait_until(lambda: _unpublished(clean_ledger) == 0, message="dead letters to be published")


def _unpublished(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM rejected_events WHERE dead_published_at IS NULL")).scalar() or 0)


def test_two_workers_racing_on_the_same_event_call_capillary_once_per_entity(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given two worker processes, each with two pool processes, and a slow Capillary
    workers = [start_worker(settings, concurrency=2) for _ in range(2)]
    sandbox.configure(latency_seconds=0.3)
    # When the same events are published many times at the same moment, both ways in
    events = [example_event(f"race-{n}", series=(544770, 553379, 600001)) for n in range(5)]
    barrier = threading.Barrier(4)

    def burst(via: str) -> None:
        barrier.wait()
        publish(settings, *(events * 2), via=via)

    threads = [threading.Thread(target=burst, args=(via,)) for via in ("bus", "task") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(5):
        wait_for_state(clean_ledger, f"race-{n}", "completed", timeout_s=60)
    # Then, once all 40 messages were delivered and acknowledged (five events complete long
    # before the last duplicate is consumed), each entity was sent to Capillary exactly once
    wait_for_every_delivery(settings)
    sent = [(c["customerId"], s) for c in bulk_calls(sandbox) for s in c["seriesIds"]]  # type: ignore[union-attr]
    assert len(sent) == 15 and len(sandbox.ledger()) == 15
    # And both workers took part: claims by pool processes of each worker, not of one
    main_pids = [w.process.pid for w in workers]
    assert workers_that_claimed(clean_ledger, main_pids) == set(main_pids)


def short_lease(settings_factory: Callable[..., Settings]) -> Settings:
    """Settings whose claims expire soon, so a killed worker's entity comes back quickly."""
    return settings_factory(http_timeout_s=3.0, http_connect_timeout_s=0.5,
                            rate_limit_max_wait_s=1.0, lease_s=12.0)


def test_sigkill_mid_call_loses_nothing_and_issues_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = short_lease(settings_factory)
    # Given a worker whose Capillary call issues and then stalls
    worker = start_worker(settings)
    sandbox.add_fault(kind="stall_after", delay_seconds=10, series=544770)
    publish(settings, example_event("killed-after-issue", series=(544770,)))
    wait_until(lambda: len(sandbox.ledger()) == 1, message="the sandbox to issue")
    # When the worker is killed with SIGKILL mid-call (main process and children)
    worker.kill()
    # Then a new worker finishes the event by reconciling, without issuing again
    start_worker(settings)
    done = wait_for_state(clean_ledger, "killed-after-issue", "completed", timeout_s=60)
    wait_for_every_delivery(settings)  # the killed worker's message, redelivered, too
    assert len(sandbox.ledger()) == 1
    assert done["coupons"][0]["code"] == sandbox.ledger()[0]["code"]
    assert done["coupons"][0]["recorded_via"] == "reconcile"
    assert len(bulk_calls(sandbox)) == 1


def heartbeat_leases(settings_factory: Callable[..., Settings]) -> Settings:
    """A long claim deadline (two minutes, the default), with claims renewed every second."""
    return settings_factory(http_timeout_s=8.0, http_connect_timeout_s=0.5,
                            rate_limit_max_wait_s=1.0, lease_s=120.0, claim_heartbeat_s=1.0,
                            settle_window_s=10.0)


def test_a_killed_workers_landed_call_is_read_back_within_a_heartbeat_lease(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = heartbeat_leases(settings_factory)
    assert settings.claim_lease_s == 3.0
    # Given a worker whose Capillary call issues and then stalls
    worker = start_worker(settings)
    sandbox.add_fault(kind="stall_after", delay_seconds=30, series=544770)
    publish(settings, example_event("killed-heartbeat", series=(544770,)))
    wait_until(lambda: len(sandbox.ledger()) == 1, message="the sandbox to issue")
    # When the worker is SIGKILLed mid-call
    worker.kill()
    start_worker(settings)
    # Then its claim comes back after its short lease, not after the two-minute deadline, and
    # the read-back finds the coupon at once (no settle window for a call that landed)
    done = wait_for_state(clean_ledger, "killed-heartbeat", "completed", timeout_s=45)
    assert done["coupons"][0]["recorded_via"] == "reconcile"
    assert len(sandbox.ledger()) == 1 and len(bulk_calls(sandbox)) == 1


def test_a_call_longer_than_the_lease_keeps_its_claim_while_the_worker_lives(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = heartbeat_leases(settings_factory)
    start_worker(settings)
    # Given a call that takes twice the claim's 3 s lease
    sandbox.add_fault(kind="latency", delay_seconds=6, series=553379)
    publish(settings, example_event("slow-call", series=(553379,)))
    # Then the heartbeat keeps the claim: the sweeper never takes it back mid-call
    done = wait_for_state(clean_ledger, "slow-call", "completed", timeout_s=45)
    assert done["coupons"][0]["recorded_via"] == "issue"
    with clean_ledger.connect() as conn:
        kinds = conn.execute(text(
            "SELECT h.kind FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = 'slow-call'")).scalars().all()
    assert "lease_expired" not in kinds, kinds
    assert len(bulk_calls(sandbox)) == 1


def test_sigkill_before_the_call_answered_issues_exactly_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = short_lease(settings_factory)
    worker = start_worker(settings)
    # Capillary is slow to answer and has not issued when the worker dies.
    sandbox.add_fault(kind="latency", delay_seconds=2.5, series=553379)
    publish(settings, example_event("killed-before-issue", series=(553379,)))
    wait_until(lambda: story(clean_ledger, "killed-before-issue") is not None,
               message="the event to be claimed")
    worker.kill()
    start_worker(settings)
    wait_for_state(clean_ledger, "killed-before-issue", "completed", timeout_s=60)
    wait_for_every_delivery(settings)
    assert len(sandbox.ledger(series=553379)) == 1


def test_quorum_queues_work_end_to_end(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(queue_type="quorum")
    start_worker(settings)
    sandbox.add_fault(kind="error_before", status=503, times=1)
    publish(settings, example_event("quorum-1"))
    publish(settings, example_event("quorum-2"), via="task")
    wait_for_state(clean_ledger, "quorum-1", "completed")
    wait_for_state(clean_ledger, "quorum-2", "completed")
    assert len(sandbox.ledger()) == 4


@pytest.mark.parametrize("intake", ["direct", "bridge"])
def test_a_bus_backlog_stays_on_the_bus_instead_of_flooding_the_task_queue(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], intake: str,
) -> None:
    settings = settings_factory(bus_intake=intake)
    # Given 150 events waiting on the bus before any worker runs, and a slow Capillary
    sandbox.configure(latency_seconds=0.05)
    publish(settings, *(example_event(f"backlog-{n}", series=(544770,), customer=f"6{n:05d}")
                        for n in range(150)))
    start_worker(settings, concurrency=2)
    # While it drains, the task queue stays short: the rest waits on the bus
    depths, taken = [], []
    for _ in range(10):
        time.sleep(0.3)
        depths.append(queue_ready(settings, settings.tasks_queue))
        taken.append(queue_counts(settings)[settings.events_queue][1])
    assert max(depths) <= 32 + 20, depths  # high-water mark + the bridge's prefetch
    if intake == "direct":
        # Read directly, the bus is the only queue: the worker holds its prefetch per pool slot
        assert max(depths) == 0 and max(taken) <= 2 * settings.prefetch_multiplier, \
            (depths, taken)
    for n in range(150):
        wait_for_state(clean_ledger, f"backlog-{n}", "completed", timeout_s=60)


def test_pools_that_cannot_keep_an_attempt_inside_its_claim_are_refused(
        settings: Settings) -> None:
    env = settings_env(settings)
    by_cli = subprocess.run([coupon_worker_command(), "worker", "-P", "gevent"], env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert by_cli.returncode == 2 and "'gevent' is not one of 'prefork', 'threads'" \
        in by_cli.stderr
    celery = str(Path(coupon_worker_command()).with_name("celery"))
    by_celery = subprocess.run(
        [celery, "-A", "worker.entrypoints.celery.app", "worker", "-P", "solo"], env=env,
        capture_output=True, text=True, check=False, timeout=60)
    assert by_celery.returncode != 0
    assert "runs on the prefork or threads pool, not celery.concurrency.solo" \
        in by_celery.stdout + by_celery.stderr


def test_the_publish_command_takes_a_file_or_stdin_and_refuses_invalid_lines(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    start_worker(settings)
    lines = tmp_path / "events.jsonl"
    lines.write_text("\n".join([
        json.dumps(example_event("cli-1")),
        '{"eventId": "cli-bad", "seriesIds": []}',
        json.dumps(example_event("cli-2", series=(553379,))),
    ]) + "\n")
    env = settings_env(settings)
    done = subprocess.run([coupon_worker_command(), "publish", str(lines)], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1, "an invalid line is reported"
    assert "line 2: not published" in done.stderr and "customer: Field required" in done.stderr
    assert "published 2 message(s)" in done.stdout
    piped = subprocess.run([coupon_worker_command(), "publish", "-", "--via", "task"], env=env,
                           input=json.dumps(example_event("cli-3")), capture_output=True,
                           text=True, check=True)
    assert f"to {settings.tasks_queue}" in piped.stdout
    for event_id in ("cli-1", "cli-2", "cli-3"):
        wait_for_state(clean_ledger, event_id, "completed")
    assert story(clean_ledger, "cli-bad") is None, "never published"


def test_the_bridge_acknowledges_a_bus_message_only_once_its_task_is_confirmed(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(bus_intake="bridge", metrics_port=free_port())
    worker = start_worker(settings)

    def refusals() -> float:
        scraped = requests.get(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5)
        return metric_value(scraped.text, "coupon_bridge_forward_failures_total")

    # Given RabbitMQ refuses (nacks) every task message the bridge forwards
    with refusing(settings, settings.tasks_queue):
        publish(settings, example_event("confirm-first", series=(544770,)))
        # (a refused publish leaves no state but the worker's own count of it)
        wait_until(refusals, message="the broker to refuse the forwarded task")
        # Then the bus message is still on the bus, and nothing was taken in
        assert sum(queue_counts(settings)[settings.events_queue]) == 1
        assert story(clean_ledger, "confirm-first") is None
    # And once the broker accepts again, the same message is forwarded and issued, once
    wait_for_state(clean_ledger, "confirm-first", "completed")
    wait_for_every_delivery(settings)
    assert len(sandbox.ledger()) == 1
    # Held while refused, not bounced off the broker in a loop: one refusal, counted and
    # logged once
    assert refusals() == 1
    assert worker.log().count("bridge.forward_failed") == 1
