"""The worker rides out a database restart and a broker restart, losing and doubling nothing.

These stop the machine's real PostgreSQL and RabbitMQ for a few seconds.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_consumers, wait_for_state
from tests.conftest import WorkerProcess, wait_until
from worker.config import Settings

pytestmark = pytest.mark.disruptive


def _pg_cluster() -> str:
    return sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]


def _pg(action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _pg_cluster(), "main", action],
                   check=True, capture_output=True, timeout=60)


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False).returncode == 0


def _rabbit(*args: str) -> None:
    rabbitmqctl(*args, timeout_s=120)


def test_a_database_restart_delays_events_but_loses_none(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings)
    publish(settings, example_event("before-db-restart"))
    wait_for_state(clean_ledger, "before-db-restart", "completed")
    _pg("stop")
    try:
        publish(settings, example_event("during-db-outage"))
        # The sweeper notices and pauses consuming: messages wait in RabbitMQ meanwhile.
        wait_for_consumers(settings, settings.tasks_queue, lambda n: n == 0,
                           what="consuming to pause while the database is down")
        time.sleep(2)
        assert worker.process.poll() is None, "the worker keeps running"
    finally:
        _pg("start")
        wait_until(_pg_ready, message="PostgreSQL back")
    wait_for_state(clean_ledger, "during-db-outage", "completed", timeout_s=60)
    assert len(sandbox.ledger()) == 4, "one coupon per series of each event"
    wait_for_consumers(settings, settings.tasks_queue, lambda n: n >= 1,
                       what="consuming to resume")


def test_a_broker_restart_is_survived(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings)
    # An entity waits for its retry in PostgreSQL across the restart.
    sandbox.set_series(730001, behaviour="error", error_code=730)
    publish(settings, example_event("before-broker-restart", series=(544770, 730001)))
    wait_until(lambda: len(sandbox.ledger()) == 1, message="the first series to be issued")
    _rabbit("stop_app")
    try:
        time.sleep(2)
        sandbox.set_series(730001, behaviour="valid")
    finally:
        _rabbit("start_app")
        _rabbit("await_startup")
    publish(settings, example_event("after-broker-restart"))
    wait_for_state(clean_ledger, "after-broker-restart", "completed", timeout_s=90)
    wait_for_state(clean_ledger, "before-broker-restart", "completed", timeout_s=90)
    assert len(sandbox.ledger()) == 4
    assert worker.process.poll() is None
