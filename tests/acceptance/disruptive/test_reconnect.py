"""A pause of fresh events that spans a broker reconnect ends with the pause.

Found by `coupon-worker chaos`: the circuit opened (the API was down), the consumers paused the
task queue, every broker connection dropped, and the circuit closed while the worker was
reconnecting; the reconnected worker never consumed the task queue again. This stops a real
RabbitMQ node, this session's own, for a few seconds, as test_restarts does.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.disruptive.conftest import PrivateServices
from tests.acceptance.helpers import example_event, publish, wait_for_consumers, wait_for_state
from tests.conftest import WorkerProcess, wait_until
from worker.adapters.postgres.records import CLOSED_CIRCUIT, CircuitState
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings

pytestmark = pytest.mark.disruptive


def _save_circuit(engine: Engine, state: CircuitState) -> None:
    with sql_unit_of_work_factory(engine)() as uow:
        uow.ledger.save_circuit("capillary", state, now=datetime.now(UTC))
        uow.commit()


def test_fresh_events_flow_again_when_a_pause_ended_during_a_reconnect(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], private_services: PrivateServices,
) -> None:
    rabbit = private_services.rabbit
    worker = start_worker(settings)
    # Given the circuit is open, so the worker stopped consuming fresh events
    _save_circuit(clean_ledger, CircuitState(
        "open", 5, 1, datetime.now(UTC) + timedelta(hours=1), "http_503: test"))
    wait_for_consumers(settings, settings.tasks_queue, lambda n: n == 0,
                       what="the task queue to be paused")
    # When the broker goes away, and the circuit closes before the worker is back
    rabbit.ctl("stop_app")
    try:
        # The consumer loop stops with its connection: its heartbeat goes stale.
        wait_until(lambda: not worker.beating(), message="the consumer to lose the broker")
        _save_circuit(clean_ledger, CLOSED_CIRCUIT)
    finally:
        rabbit.ctl("start_app")
        rabbit.ctl("await_startup")
    # Then an event published afterwards is issued: the task queue is consumed again
    publish(settings, example_event("after-the-pause"))
    wait_for_state(clean_ledger, "after-the-pause", "completed", timeout_s=60)
    assert len(sandbox.ledger()) == 2
    assert worker.process.poll() is None
