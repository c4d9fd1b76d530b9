"""The sweeper thread: it records the pause decision for the guard, and it lives and dies with
its worker, never keeping a stopped worker busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from celery import bootsteps

from tests.unit.conftest import World
from worker.adapters.postgres.circuit import Permit
from worker.adapters.rabbitmq.links import StepLinks
from worker.domain.errors import LedgerUnavailable
from worker.domain.model import Verdict
from worker.entrypoints.celery.sweeper import Sweeper


class Container:
    """The container as the sweeper sees it: settings, dependencies and the links."""

    settings = SimpleNamespace(sweep_interval_s=0.01, requeue_after_s=300.0)

    def __init__(self, world: World) -> None:
        self.world = world
        self.links = StepLinks()
        self.sweeps = threading.Event()
        self.down = False

    def deps(self) -> Any:
        self.sweeps.set()
        if self.down:
            raise LedgerUnavailable("database unavailable: connection refused")
        return self.world.deps


def running(container: Container) -> tuple[Sweeper, Any]:
    worker = SimpleNamespace(app=SimpleNamespace(coupon_container=container),
                             blueprint=SimpleNamespace(state=bootsteps.RUN))
    return Sweeper(worker), worker


def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def loop_in_thread(sweeper: Sweeper) -> threading.Thread:
    thread = threading.Thread(target=sweeper._loop, daemon=True)
    thread.start()
    return thread


def test_the_sweeper_stops_when_its_worker_stops(world: World) -> None:
    container = Container(world)
    sweeper, worker = running(container)
    thread = loop_in_thread(sweeper)
    try:
        assert container.sweeps.wait(5), "the sweeper runs while its worker runs"
        # When the worker stops (or failed to start) without stopping this step
        worker.blueprint.state = bootsteps.CLOSE  # type: ignore[attr-defined]
        thread.join(timeout=5)
        # Then the sweeper thread ends by itself
        assert not thread.is_alive()
    finally:
        sweeper._stop.set()


def test_an_open_circuit_pauses_fresh_events_and_its_closing_resumes_them(
        world: World) -> None:
    # Given the circuit opened on an auth failure
    world.deps.circuit.failure(Permit(), Verdict.OUTAGE, "http_401")
    container = Container(world)
    sweeper, _ = running(container)
    thread = loop_in_thread(sweeper)
    try:
        # Then, after a sweep, the links say: pause the task queue, keep the retries
        assert until(lambda: container.links.pause.roles == {"tasks"})
        assert "circuit open" in (container.links.pause.reason or "")
        # When the circuit closes
        world.deps.circuit.close()
        # Then consuming resumes
        assert until(lambda: not container.links.pause.paused)
    finally:
        sweeper._stop.set()
        thread.join(timeout=5)


def test_a_ledger_outage_pauses_every_queue_until_it_is_back(world: World) -> None:
    container = Container(world)
    container.down = True
    sweeper, _ = running(container)
    thread = loop_in_thread(sweeper)
    try:
        assert until(lambda: container.links.pause.roles == {"tasks", "retry"})
        container.down = False
        assert until(lambda: not container.links.pause.paused)
    finally:
        sweeper._stop.set()
        thread.join(timeout=5)
