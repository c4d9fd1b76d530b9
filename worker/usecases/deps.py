"""What every use case is handed: the dependencies (``Deps``, wired once per process by
``worker.bootstrap``), the broker side effects they need (``Publisher``) and what one use case
did (``Report``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from worker.adapters.capillary.api import CouponApi
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.issuing import DeliveryLedger, IssuingLedger, RejectionLedger
from worker.adapters.postgres.ratelimit import RateLimiter
from worker.adapters.postgres.records import DeadLetterRecord, DueEntity
from worker.adapters.postgres.sweeping import SweeperLedger
from worker.adapters.postgres.unit_of_work import UnitOfWorkFactory
from worker.domain.policy import RetryPolicy
from worker.metrics import Metrics
from worker.usecases.leases import LeaseKeeper, UnrenewedLeases


class WorkerLedger(IssuingLedger, RejectionLedger, DeliveryLedger, SweeperLedger, Protocol):
    """The parts of the ledger the worker's use cases use: issuing (``issue``, ``attempt``,
    ``reconcile``), rejections (``rejection``), failed deliveries (``delivery``) and the
    sweeper's work (``sweep``). Never support's actions: those are ``SupportDeps``'."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Publisher(Protocol):
    """The broker side effects of the services."""

    def publish_retries(self, due: Sequence[DueEntity]) -> None:
        """Put one message per due entity on the retry queue (confirmed by the broker)."""
        ...

    def publish_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        """Put one message per dead entity or rejected event on the dead-letter queue."""
        ...


@dataclass
class Deps:
    """Everything the use cases need, wired once per process."""

    uow: UnitOfWorkFactory[WorkerLedger]
    api: CouponApi
    publisher: Publisher
    limiter: RateLimiter
    circuit: CircuitGate
    retry_policy: RetryPolicy
    metrics: Metrics
    worker_id: str
    lease_s: float = 120.0
    rate_limit_max_wait_s: float = 30.0
    #: Series per bulk-issue call (``CAPILLARY_MAX_SERIES_PER_CALL``): more are split.
    max_series_per_call: int = 100
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    leases: LeaseKeeper | UnrenewedLeases = field(default_factory=UnrenewedLeases)


@dataclass(frozen=True)
class Report:
    """What one use case did, for the task result (Flower) and for tests."""

    event_id: str | None
    new_event: bool = False
    claimed: int = 0
    issued: int = 0
    reconciled: int = 0
    retrying: int = 0
    dead: int = 0
    deferred: int = 0
    lost_claims: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    rejected_id: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, 0, {}, False)}
