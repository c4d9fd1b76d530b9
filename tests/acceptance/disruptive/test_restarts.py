"""The worker rides out a database restart and a broker restart, losing and doubling nothing.

These stop a real PostgreSQL cluster and RabbitMQ node, this session's own (see conftest), for
a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest
from sqlalchemy import Engine

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.disruptive.conftest import PrivateServices
from tests.acceptance.helpers import (
    example_event,
    publish,
    queue_counts,
    story,
    wait_for_consumers,
    wait_for_every_delivery,
    wait_for_state,
)
from tests.conftest import WorkerProcess, wait_until
from worker.config import Settings

pytestmark = pytest.mark.disruptive


def test_a_database_restart_delays_events_but_loses_none(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], private_services: PrivateServices,
) -> None:
    postgres = private_services.postgres
    worker = start_worker(settings)
    publish(settings, example_event("before-db-restart"))
    wait_for_state(clean_ledger, "before-db-restart", "completed")
    postgres.ctl("stop")
    try:
        publish(settings, example_event("during-db-outage"))
        # The sweeper notices and pauses consuming: messages wait in RabbitMQ meanwhile.
        wait_for_consumers(settings, settings.tasks_queue, lambda n: n == 0,
                           what="consuming to pause while the database is down")
        time.sleep(2)
        assert worker.process.poll() is None, "the worker keeps running"
    finally:
        postgres.ctl("start")
        wait_until(postgres.ready, message="PostgreSQL back")
    wait_for_state(clean_ledger, "during-db-outage", "completed", timeout_s=60)
    assert len(sandbox.ledger()) == 4, "one coupon per series of each event"
    wait_for_consumers(settings, settings.tasks_queue, lambda n: n >= 1,
                       what="consuming to resume")


def test_a_broker_restart_is_survived(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], private_services: PrivateServices,
) -> None:
    rabbit = private_services.rabbit
    # A retry the sweeper dispatches while the broker is down stays queued until
    # requeue_stale makes it due again (services.sweep): after 5 s here, not 5 minutes. The
    # retries go on (at most a second apart) until the broker is down, however long a slow
    # machine takes to stop it: enough attempts that they never run out first.
    settings = settings_factory(requeue_after_s=5.0, max_attempts=200)
    worker = start_worker(settings)
    # An entity waits for its retry in PostgreSQL across the restart.
    sandbox.set_series(730001, behaviour="error", error_code=730)
    publish(settings, example_event("before-broker-restart", series=(544770, 730001)))
    wait_until(lambda: len(sandbox.ledger()) == 1, message="the first series to be issued")
    rabbit.ctl("stop_app")
    try:
        time.sleep(2)
        sandbox.set_series(730001, behaviour="valid")
    finally:
        rabbit.ctl("start_app")
        rabbit.ctl("await_startup")
    publish(settings, example_event("after-broker-restart"))
    wait_for_state(clean_ledger, "after-broker-restart", "completed", timeout_s=90)
    wait_for_state(clean_ledger, "before-broker-restart", "completed", timeout_s=90)
    assert len(sandbox.ledger()) == 4
    assert worker.process.poll() is None


# -- with a call in flight -----------------------------------------------------------------

IN_FLIGHT_CUSTOMER = "960001"


def _in_flight_settings(settings_factory: Callable[..., Settings]) -> Settings:
    """The held call is let go once the service is down, inside the 10 s read timeout however
    slow the stop is beside the rest of the suite; a claim lives 33 s (the shortest lease
    these timeouts allow)."""
    return settings_factory(http_timeout_s=10.0, http_connect_timeout_s=0.5,
                            rate_limit_max_wait_s=1.0, lease_s=33.0, settle_window_s=12.0)


def _claimed(engine: Engine, event_id: str) -> bool:
    found = story(engine, event_id)
    return bool(found) and found["entities"][0]["state"] == "in_flight"  # type: ignore[index]


def _call_in_flight(settings: Settings, engine: Engine, sandbox: SandboxAdmin,
                    event_id: str) -> None:
    """Publish an event whose call Capillary holds, before doing anything, until released;
    return once it is claimed and the call is held."""
    sandbox.add_fault(kind="hold", customer=IN_FLIGHT_CUSTOMER)
    publish(settings, example_event(event_id, series=(544770,), customer=IN_FLIGHT_CUSTOMER))
    wait_until(lambda: _claimed(engine, event_id), message="the claim")
    wait_until(lambda: sandbox.held() == 1, message="the call to reach Capillary")


def _issued_at(sandbox: SandboxAdmin) -> float:
    coupon, = wait_until(lambda: sandbox.ledger(customer=IN_FLIGHT_CUSTOMER), timeout_s=30,
                         message="Capillary to issue")
    return datetime.fromisoformat(coupon["issuedAt"].replace("Z", "+00:00")).timestamp()


@contextmanager
def _down_when_capillary_answers(sandbox: SandboxAdmin, stop: Callable[[], object],
                                 start: Callable[[], object]) -> Iterator[None]:
    """Stop a service while the call is held, let Capillary issue and answer while it is
    down, run the block, and start the service again whatever happened."""
    stop()
    stopped_at = time.time()
    try:
        assert sandbox.release() == 1, "the call was still held when the service stopped"
        assert stopped_at < _issued_at(sandbox), "the service was down when Capillary answered"
        yield
    finally:
        start()


def test_a_database_restart_while_a_call_is_in_flight_issues_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], private_services: PrivateServices,
) -> None:
    postgres, node = private_services.postgres, private_services.rabbit.node
    settings = _in_flight_settings(settings_factory)
    start_worker(settings)
    # Given a call in flight: claimed (committed), held by Capillary
    _call_in_flight(settings, clean_ledger, sandbox, "db-in-flight")
    def given_back() -> bool:
        counts = queue_counts(settings, node).values()
        return (sum(ready for ready, _ in counts), sum(held for _, held in counts)) == (1, 0)

    def start() -> None:
        postgres.ctl("start")
        wait_until(postgres.ready, message="PostgreSQL back")

    # When PostgreSQL stops before Capillary answers: the answer cannot be committed
    with _down_when_capillary_answers(sandbox, lambda: postgres.ctl("stop"), start):
        # And the task, unable to commit the answer, gave its message back (consuming is
        # paused meanwhile, so it waits on its queue: the bus's or the task queue, by intake)
        wait_until(given_back, message="the message to be given back")
    # Then the claim runs out, the read-back finds the coupon, and nothing is sent again
    done = wait_for_state(clean_ledger, "db-in-flight", "completed", timeout_s=90)
    wait_for_every_delivery(settings, node=node)
    assert done["coupons"][0]["recorded_via"] == "reconcile"
    assert len(sandbox.ledger(customer=IN_FLIGHT_CUSTOMER)) == 1
    assert len([c for c in sandbox.calls() if c["path"] == "bulk"]) == 1


def test_a_broker_restart_while_a_call_is_in_flight_issues_once(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], private_services: PrivateServices,
) -> None:
    rabbit = private_services.rabbit
    settings = _in_flight_settings(settings_factory)
    worker = start_worker(settings)
    _call_in_flight(settings, clean_ledger, sandbox, "broker-in-flight")
    # When RabbitMQ stops before Capillary answers (the worker cancels a task whose
    # connection is lost: the answer is never read)
    def start() -> None:
        rabbit.ctl("start_app")
        rabbit.ctl("await_startup")

    with _down_when_capillary_answers(sandbox, lambda: rabbit.ctl("stop_app"), start):
        pass
    # Then the event ends issued once: the message delivered again finds the claim, and the
    # coupon is recorded by read-back (or by the answer, had the task not been cancelled)
    wait_for_state(clean_ledger, "broker-in-flight", "completed", timeout_s=90)
    wait_for_every_delivery(settings, node=rabbit.node)
    assert len(sandbox.ledger(customer=IN_FLIGHT_CUSTOMER)) == 1
    assert len([c for c in sandbox.calls() if c["path"] == "bulk"]) == 1
    assert worker.process.poll() is None
