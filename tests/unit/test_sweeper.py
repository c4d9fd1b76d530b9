"""The sweeper thread lives and dies with its worker: it never keeps a stopped worker busy."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from celery import bootsteps

from tests.unit.conftest import World
from worker.broker.worker_steps import Sweeper


def test_the_sweeper_stops_when_its_worker_stops(world: World) -> None:
    sweeps = threading.Event()

    class Container:
        settings = SimpleNamespace(sweep_interval_s=0.01, requeue_after_s=300.0)

        def deps(self) -> object:
            sweeps.set()
            return world.deps

    worker = SimpleNamespace(app=SimpleNamespace(coupon_container=Container()),
                             blueprint=SimpleNamespace(state=bootsteps.RUN))
    sweeper = Sweeper(worker)
    thread = threading.Thread(target=sweeper._loop, daemon=True)
    thread.start()
    try:
        assert sweeps.wait(5), "the sweeper runs while its worker runs"
        # When the worker stops (or failed to start) without stopping this step
        worker.blueprint.state = bootsteps.CLOSE  # type: ignore[attr-defined]
        thread.join(timeout=5)
        # Then the sweeper thread ends by itself
        assert not thread.is_alive()
    finally:
        sweeper._stop.set()
