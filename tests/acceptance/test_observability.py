"""Operators' view: Flower reads real tasks, Prometheus scrapes real counts, logs keep secrets."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu import Connection, Exchange, Queue
from sqlalchemy import Engine, text

from coupon_devtools.harness.processes import free_port, spawn
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    metric_value,
    publish,
    wait_for_circuit_opened,
    wait_for_state,
)
from tests.conftest import (
    REPO_ROOT,
    WorkerProcess,
    coupon_worker_command,
    settings_env,
    wait_until,
)
from worker import __version__
from worker.adapters.rabbitmq.names import TASK_MARK
from worker.config import Settings


@pytest.fixture
def flower(settings: Settings, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = settings_env(settings)
    env["FLOWER_BASIC_AUTH"] = "support:s3cret"
    process = spawn("flower", [coupon_worker_command(), "flower", "--port", str(port)], env,
                    tmp_path, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout_s=30, message="Flower to answer")
        yield url
    finally:
        process.stop(grace_s=10)


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthcheck", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_flower_shows_processed_tasks_with_readable_arguments(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], flower: str,
) -> None:
    start_worker(settings)
    assert requests.get(f"{flower}/api/tasks", timeout=5).status_code == 401, "behind auth"
    publish(settings, example_event("flower-1"))
    publish(settings, example_event("flower-2"), via="task")
    wait_for_state(clean_ledger, "flower-1", "completed")
    wait_for_state(clean_ledger, "flower-2", "completed")
    auth = ("support", "s3cret")

    def seen() -> dict[str, dict[str, object]] | None:
        tasks = requests.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        done = {t["name"]: t for t in tasks.values() if t.get("state") == "SUCCESS"}
        return done if {"coupons.ingest", "coupons.issue"} <= set(done) else None

    tasks = wait_until(seen, timeout_s=30, message="Flower to show both tasks succeeded")
    ingest = tasks["coupons.ingest"]
    assert "event=flower-1" in str(ingest["kwargs"])
    assert "customer=id:566881933" in str(ingest["kwargs"])
    assert "series=[544770, 553379]" in str(ingest["kwargs"])
    assert "server123" not in str(tasks)
    assert "event=flower-2" in str(tasks["coupons.issue"]["kwargs"])
    # The worker's page tells its release and schema (the stats' coupon_worker entry)
    workers = requests.get(f"{flower}/api/workers?refresh=1", auth=auth, timeout=15).json()
    (name,) = workers
    assert workers[name]["stats"]["coupon_worker"]["version"] == __version__
    page = requests.get(f"{flower}/worker/{name}", auth=auth, timeout=15).text
    assert "coupon_worker" in page and __version__ in page


def test_task_events_reach_monitors_several_to_a_message(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a monitor bound to Celery's event exchange, as Flower is
    with Connection(settings.broker_url) as connection:
        monitor = Queue(f"test-monitor-{uuid.uuid4().hex}", Exchange("celeryev", type="topic"),
                        routing_key="task.#", exclusive=True)(connection.channel())
        monitor.declare()
        worker = start_worker(settings, concurrency=2)
        # When a dozen events are issued, and the worker is stopped as soon as they are
        ids = [f"monitored-{i}" for i in range(12)]
        publish(settings, *(example_event(event_id, series=(544770,)) for event_id in ids))
        for event_id in ids:
            wait_for_state(clean_ledger, event_id, "completed")
        worker.stop()
        events: list[dict[str, Any]] = []
        messages = 0

        def every_success_seen() -> bool:
            nonlocal messages
            while (message := monitor.get(no_ack=True)) is not None:
                messages += 1
                body = message.decode()
                events.extend(body if isinstance(body, list) else [body])
            return sum(e["type"] == "task-succeeded" for e in events) >= len(ids)

        wait_until(every_success_seen, timeout_s=15, message="every task-succeeded event")
    # Then each task's received, started and succeeded events all arrived, the last ones
    # before the worker closed...
    kinds = Counter(e["type"] for e in events)
    assert kinds["task-received"] == kinds["task-started"] == kinds["task-succeeded"] == 12
    # ...sent together rather than one publish each (the main loop also feeds the pool)
    assert len(events) >= 3 * messages, (len(events), messages)
    # And the log has each event's own lines, which name its task for Flower, without
    # Celery's two lines per task, which say the same
    log = worker.log()
    for task_id in (e["uuid"] for e in events if e["type"] == "task-succeeded"):
        assert f"{TASK_MARK}{task_id}" in log, task_id
    assert sum(" event.claimed " in line for line in log.splitlines()) == 12
    assert sum(" entity.issued " in line for line in log.splitlines()) == 12
    assert "] received" not in log and "] succeeded in" not in log


def test_metrics_are_scraped_from_a_running_worker(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    port = free_port()
    settings = settings_factory(metrics_port=port)
    worker = start_worker(settings, concurrency=2)
    sandbox.set_series(707001, behaviour="invalid")
    sandbox.add_fault(kind="error_before", status=503, times=1, customer="555")
    publish(settings, example_event("m-1"), example_event("m-2", series=(544770, 707001)),
            example_event("m-3", series=(553379,), customer="555"))
    wait_for_state(clean_ledger, "m-1", "completed")
    wait_for_state(clean_ledger, "m-2", "failed")
    wait_for_state(clean_ledger, "m-3", "completed")

    def scrape() -> str | None:
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return body if metric_value(body, "coupons_issued_total", via="issue") >= 4 else None

    body = wait_until(scrape, message="the counters to reach the run's totals")
    assert metric_value(body, "coupons_issued_total", via="issue") == 4
    assert metric_value(body, "coupon_dead_letters_total", error_code="707") == 1
    assert metric_value(body, "coupon_retries_scheduled_total") == 1
    assert metric_value(body, "coupon_entities_failed_total", classification="permanent") == 1
    # A 503 is an unknown outcome: read back, then sent again once the window has passed.
    assert metric_value(body, "coupon_entities_failed_total", classification="ambiguous") == 1
    assert metric_value(body, "coupon_events_received_total", outcome="new") == 3
    assert metric_value(body, "capillary_call_seconds_count", operation="bulk_issue",
                   status="200") >= 2
    assert metric_value(body, "capillary_call_seconds_count", operation="bulk_issue",
                   status="503") == 1
    assert metric_value(body, "coupon_ledger_entities", state="issued") == 4
    assert metric_value(body, "coupon_ledger_entities", state="dead") == 1
    assert metric_value(body, "coupon_worker_build_info", version=__version__) == 1
    # What on-call alerts on, read at the scrape from the ledger and the broker
    assert metric_value(body, "coupon_ledger_up") == 1
    assert metric_value(body, "coupon_broker_up") == 1
    assert metric_value(body, "coupon_circuit_state", circuit="capillary", state="closed") == 1
    assert metric_value(body, "coupon_circuit_state", circuit="capillary", state="open") == 0
    assert 0 < metric_value(body, "coupon_dead_letter_oldest_age_seconds") < 120
    assert metric_value(body, "coupon_retry_oldest_age_seconds") == 0
    assert metric_value(body, "coupon_unknown_outcome_oldest_age_seconds") == 0
    assert metric_value(body, "coupon_settle_window_seconds") == settings.settle_window_s
    assert f'coupon_queue_messages_ready{{queue="{settings.tasks_queue}",role="tasks"}}' in body
    for queue in (settings.tasks_queue, settings.retry_queue):
        assert f'coupon_consumers_paused{{queue="{queue}"}} 0.0' in body, queue
    # ...and what the pool processes stamp (merged by the main process: the most recent)
    now = time.time()
    assert now - 120 < metric_value(body, "capillary_last_success_timestamp_seconds",
                                    operation="bulk_issue") <= now
    (worker_name,) = re.findall(
        r'coupon_worker_last_task_finished_timestamp_seconds\{worker="([^"]+)"\}', body)
    assert worker_name.startswith(worker.name)
    assert now - 120 < metric_value(body, "coupon_worker_last_task_finished_timestamp_seconds",
                                    worker=worker_name) <= now
    # The 503 left an unknown outcome: read back (nothing there yet), then settled
    assert metric_value(body, "capillary_read_backs_total", purpose="reconcile",
                        outcome="settling") + metric_value(
        body, "capillary_read_backs_total", purpose="reconcile", outcome="absent") >= 1


def test_secrets_never_reach_logs_the_ledger_or_task_arguments(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    secret = "Xy9-very-secret-password"
    settings = settings_factory(capillary_password=secret, log_format="json",
                                log_level="DEBUG")
    worker = start_worker(settings)
    publish(settings, example_event("secret-1"))
    wait_for_circuit_opened(clean_ledger)  # the wrong password is an outage
    # Every line the run logs is written once the worker has shut down (a warm shutdown, so
    # the pool children flush too): read the log then, not after a guess of how long.
    worker.stop()
    assert not worker.alive()
    assert secret not in worker.log()
    with clean_ledger.connect() as conn:
        reason = conn.execute(text(
            "SELECT reason FROM circuit_breakers WHERE name = 'capillary'")).scalar_one()
        dump = " ".join(
            str(row) for table in ("events", "entities", "entity_history", "api_calls",
                                   "rejected_events", "circuit_breakers")
            for row in conn.execute(text(f"SELECT * FROM {table}"))
        )
    # The ledger says why (the 401) without the password that caused it
    assert "401" in str(reason), reason
    assert secret not in dump


def test_the_plain_celery_command_runs_the_worker(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin, tmp_path: Path,
) -> None:
    env = settings_env(settings)
    process = spawn("celery", [sys.executable, "-m", "celery",
                               "-A", "worker.entrypoints.celery.app", "worker", "-c", "1",
                               "--without-mingle", "--without-gossip",
                               "-n", "plain@%h"], env, tmp_path, cwd=REPO_ROOT)
    try:
        publish(settings, example_event("plain-celery"))
        wait_for_state(clean_ledger, "plain-celery", "completed", timeout_s=60)
    finally:
        process.stop(grace_s=20)


def test_a_worker_that_cannot_reach_its_ledger_says_so_at_the_scrape(
    settings_factory: Callable[..., Settings], start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a worker whose ledger refuses every connection (nothing listens on its port)
    port = free_port()
    settings = settings_factory(metrics_port=port,
                                database_url=f"postgresql+psycopg://postgres@127.0.0.1:"
                                             f"{free_port()}/coupons")
    start_worker(settings, concurrency=1)

    def scrape() -> str | None:
        body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=9).text
        paused = f'coupon_consumers_paused{{queue="{settings.tasks_queue}"}} 1.0' in body
        return body if paused else None

    # Then the scrape still answers: the ledger is down, and the worker stopped consuming
    body = wait_until(scrape, timeout_s=30, message="the worker to pause for its ledger")
    started = time.monotonic()
    requests.get(f"http://127.0.0.1:{port}/metrics", timeout=9).raise_for_status()
    assert time.monotonic() - started < 5, "well inside Prometheus's scrape timeout"
    assert metric_value(body, "coupon_ledger_up") == 0
    assert metric_value(body, "coupon_broker_up") == 1
    assert "coupon_circuit_state{" not in body, "what needs the ledger is left out"
    assert "coupon_retry_oldest_age_seconds " not in body
    assert f'coupon_consumers_paused{{queue="{settings.retry_queue}"}} 1.0' in body
