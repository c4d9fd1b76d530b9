"""Unit-test fixtures: the services wired to fakes of our own seams, and a clock we move."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from coupon_devtools.fakes.ledger import fake_unit_of_work_factory
from coupon_devtools.fakes.ledger_state import FakeEntity, FakeState
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import Unlimited
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases.deps import Deps
from worker.usecases.issue import retry_entity
from worker.usecases.sweep import sweep

SETTLE_S = 20.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class RecordingLimiter(Unlimited):
    def __init__(self) -> None:
        self.penalties: list[float] = []

    def penalise(self, retry_after_s: float, name: str = "bulk_issue") -> None:
        self.penalties.append(retry_after_s)


@dataclass
class World:
    deps: Deps
    state: FakeState
    api: FakeCapillary
    publisher: FakePublisher
    clock: Clock
    limiter: RecordingLimiter

    def entity(self, series_id: int) -> FakeEntity:
        return next(e for e in self.state.entities.values() if e.series_id == series_id)

    def sweep_and_retry(self) -> None:
        """What the sweeper and the retry queue do together, once."""
        self.publisher.retries.clear()
        sweep(self.deps)
        for entity_id in list(self.publisher.retries):
            retry_entity(entity_id, deps=self.deps)


@pytest.fixture
def world() -> World:
    state, uow = fake_unit_of_work_factory()
    clock = Clock()
    api = FakeCapillary(clock=clock)
    publisher = FakePublisher()
    limiter = RecordingLimiter()
    deps = Deps(
        uow=uow, api=api, publisher=publisher, limiter=limiter,
        circuit=CircuitGate(uow, CircuitPolicy(failure_threshold=3, open_s=30), clock=clock,
                            probe_timeout_s=60, cache_s=0),
        retry_policy=RetryPolicy(max_attempts=3, base_s=1, max_s=4, reconcile_delay_s=1,
                                 settle_window_s=SETTLE_S),
        metrics=Metrics(), worker_id="test", lease_s=60, clock=clock,
        sleep=lambda _s: None, rng=random.Random(5),
    )
    return World(deps, state, api, publisher, clock, limiter)


