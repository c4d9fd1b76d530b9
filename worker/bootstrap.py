"""Wiring, in one place: the services' dependencies (the worker's ``Container``, built once per
process), the support commands' (``build_support_deps``) and the producers' (``open_producer``),
from the settings. The Celery app factory (``worker.entrypoints.celery.app``), the command line and
the dev tools all build their dependencies here.

Prefork children must not share the parent's database or HTTP connections, so the container
rebuilds itself when it finds itself in a new process. Under the threads pool one container
serves every thread of the process: one engine, one HTTP connection pool, one heartbeat of the
claims, one rate limiter and circuit. Nothing connects until first use.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from worker.adapters.capillary.client import CapillaryClient
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.issuing import LeaseLedger
from worker.adapters.postgres.ratelimit import PostgresRateLimiter, RateLimiter, RetryAfterGate
from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    UnitOfWorkFactory,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.adapters.rabbitmq.celery_config import producer_app
from worker.adapters.rabbitmq.links import StepLinks
from worker.adapters.rabbitmq.publisher import CeleryPublisher, EventProducer
from worker.config import Settings
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases.deps import Deps, Publisher, utcnow
from worker.usecases.leases import LeaseKeeper, Renew
from worker.usecases.support import SupportDeps

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Engine


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_policy(settings: Settings) -> RetryPolicy:
    """The entities' retry policy the settings give (``MAX_ATTEMPTS``, ``RETRY_*``...)."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_s=settings.retry_base_s,
        max_s=settings.retry_max_s,
        reconcile_delay_s=settings.reconcile_delay_s,
        settle_window_s=settings.settle_window_s,
    )


def circuit_policy(settings: Settings) -> CircuitPolicy:
    """The circuit's policy the settings give; a pause never grows past ten minutes, or the
    configured first pause when that is longer."""
    return CircuitPolicy(
        failure_threshold=settings.circuit_failure_threshold,
        open_s=settings.circuit_open_s,
        max_open_s=max(settings.circuit_open_s, 600.0),
    )


def build_deps(settings: Settings, publisher: Publisher, *, engine: Engine | None = None,
               metrics: Metrics | None = None, threads: int = 1) -> Deps:
    """The real dependencies for ``settings``, for a process whose ``threads`` run tasks."""
    engine = engine or make_engine(settings.database_url, pool_size=settings.db_pool_size,
                                   limits=ConnectionLimits.from_settings(settings))
    uow = sql_unit_of_work_factory(engine)
    limiter: RateLimiter = RetryAfterGate(engine)
    if settings.rate_limit_per_minute:
        limiter = PostgresRateLimiter(engine, settings.rate_limit_per_minute,
                                      settings.rate_limit_burst)
    leases = LeaseKeeper(_renewer(uow), lease_s=settings.claim_lease_s,
                         interval_s=settings.claim_heartbeat_s,
                         deadline_s=settings.task_hard_time_limit_s)
    return Deps(
        uow=uow,
        api=CapillaryClient.from_settings(settings, threads=threads),
        publisher=publisher,
        limiter=limiter,
        circuit=CircuitGate(uow, circuit_policy(settings), clock=utcnow,
                            probe_timeout_s=settings.lease_s),
        retry_policy=retry_policy(settings),
        metrics=metrics or Metrics(),
        worker_id=worker_id(),
        lease_s=settings.claim_lease_s,
        rate_limit_max_wait_s=settings.rate_limit_max_wait_s,
        leases=leases,
        max_series_per_call=settings.capillary_max_series_per_call,
    )


def _renewer(uow: UnitOfWorkFactory[LeaseLedger]) -> Renew:
    def renew(tokens: Sequence[str], entity_ids: Sequence[int], lease_s: float) -> set[str]:
        with uow() as unit:
            kept = unit.ledger.renew_leases(tokens, entity_ids, lease_s=lease_s, now=utcnow())
            unit.commit()
        return kept

    return renew


def build_support_deps(settings: Settings, engine: Engine) -> SupportDeps:
    """What the support commands (replay, discard, resubmit) need, on ``engine``.

    Retries and resubmitted events are sent by name from a send-only Celery app: the command
    runs no task and no worker step.
    """
    return SupportDeps(uow=sql_unit_of_work_factory(engine),
                       publisher=CeleryPublisher(producer_app(settings), settings), clock=utcnow)


def open_producer(settings: Settings) -> AbstractContextManager[EventProducer]:
    """A connection to the bus for publishing events, as plain JSON or as Celery tasks: what
    ``coupon-worker publish``, the demo and the chaos run all publish with."""
    return EventProducer.open(settings)


def worker_container(app: Celery, settings: Callable[[], Settings]) -> Container:
    """The worker's per-process dependencies: tasks retry and dead-letter through ``app``."""
    return Container(settings, lambda chosen: CeleryPublisher(app, chosen))


class Container:
    """Per-process dependencies, built lazily and rebuilt after a fork."""

    def __init__(self, settings: Callable[[], Settings],
                 publisher: Callable[[Settings], Publisher]) -> None:
        self._settings_provider = settings
        self._publisher_factory = publisher
        self._lock = threading.Lock()
        #: Database connections per process (prefork: one task at a time, plus the sweeper);
        #: None: COUPONS_DB_POOL_SIZE.
        self.pool_size: int | None = None
        #: Tasks this process runs at once: 1 in a prefork child, the concurrency under the
        #: threads pool (set by the worker at start-up, before any task runs).
        self.threads = 1
        self._pid: int | None = None
        self._deps: Deps | None = None
        self._engine: Engine | None = None
        #: How this worker's bootsteps find each other (main process only).
        self.links = StepLinks()
        # The pool forks while the sweeper thread may hold the lock; a child must not inherit
        # a lock that no thread of its own will ever release.
        os.register_at_fork(after_in_child=self._reset_lock)

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self._settings_provider()

    def deps(self) -> Deps:
        """This process's dependencies, built on first use."""
        with self._lock:
            if self._deps is None or self._pid != os.getpid():
                if self._engine is not None and self._pid != os.getpid():
                    # Inherited pool: forget its connections without closing the parent's.
                    self._engine.dispose(close=False)
                settings = self.settings
                self._engine = make_engine(settings.database_url,
                                           pool_size=self.pool_size or settings.db_pool_size,
                                           limits=ConnectionLimits.from_settings(settings))
                self._deps = build_deps(settings, self._publisher_factory(settings),
                                        engine=self._engine, threads=self.threads)
                self._pid = os.getpid()
            return self._deps

    @property
    def engine(self) -> Engine:
        self.deps()
        assert self._engine is not None
        return self._engine

    @property
    def metrics(self) -> Metrics:
        return self.deps().metrics

    def support_deps(self) -> SupportDeps:
        """The support use cases' dependencies in this process (the replay jobs the sweeper
        steps): its engine, publisher, clock and metrics."""
        deps = self.deps()
        return SupportDeps(uow=sql_unit_of_work_factory(self.engine), publisher=deps.publisher,
                           clock=deps.clock, metrics=deps.metrics)

    def close(self) -> None:
        """Let go of this process's connections (at the worker's shutdown, in the main process
        and in each pool process): the database pool disposed, Capillary's sessions closed. A
        later use builds them again."""
        with self._lock:
            if self._pid == os.getpid():
                if self._deps is not None:
                    self._deps.api.close()
                if self._engine is not None:
                    self._engine.dispose()
            self._engine = None
            self._deps = None
