"""The capacity guide's connection arithmetic, held against a real worker: however busy, a
worker of concurrency C never holds more ledger connections than ``ConnectionBudget`` says
(C + 1 processes, each at most 2 x COUPONS_DB_POOL_SIZE), which is what ``coupon-worker
doctor`` counts on."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, text

from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import WorkerProcess
from worker.config import Settings
from worker.entrypoints.cli.doctor import ConnectionBudget

# The worker's own connections (its engines are named so), not the test's.
WORKER_CONNECTIONS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'coupon-worker'")


@contextmanager
def peak_connections(engine: Engine) -> Iterator[list[int]]:
    """The most worker connections seen at once while the block runs (``[peak]``), sampled
    every 20 ms."""
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        # Autocommit: within one transaction, pg_stat_activity would show its first snapshot.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not done.is_set():
                peak[0] = max(peak[0], conn.execute(WORKER_CONNECTIONS).scalar_one())
                done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join()


def test_a_busy_worker_stays_within_its_connection_budget(
        settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: object,
        start_worker: Callable[..., WorkerProcess]) -> None:
    # Given a worker of concurrency 2 with pools of 1 (so at most 2 connections a process)
    settings = settings_factory(db_pool_size=1)
    budget = ConnectionBudget(workers=1, concurrency=2, pool_size=1, consoles=0, tools=0)
    start_worker(settings, concurrency=2)
    with peak_connections(clean_ledger) as peak:
        # When it issues a burst of events, with the sweeper running beside them
        events = [example_event(f"cap-{uuid.uuid4().hex[:6]}-{n}", series=(544770, 553379))
                  for n in range(30)]
        publish(settings, *events)
        for event in events:
            wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    # Then it held connections, never more than the budget: (2 + 1) x 2 x 1 = 6
    assert 1 <= peak[0] <= budget.worst_case == 6, peak[0]


def test_a_threads_worker_runs_more_threads_than_connections_within_its_budget(
        settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: Any,
        start_worker: Callable[..., WorkerProcess]) -> None:
    # Given one worker of 16 threads on a pool of 2 (at most 4 connections at a peak),
    # and a Capillary slow enough that every thread has a call in flight at once
    settings = settings_factory(db_pool_size=2)
    budget = ConnectionBudget(workers=1, concurrency=16, pool_size=2, consoles=0, tools=0,
                              pool="threads")
    start_worker(settings, concurrency=16, pool="threads")
    sandbox.configure(latency_seconds=0.3)
    with peak_connections(clean_ledger) as peak:
        # When it issues a burst of events
        events = [example_event(f"cap-t-{uuid.uuid4().hex[:6]}-{n}", series=(544770,),
                                customer=f"5{n:05d}") for n in range(60)]
        publish(settings, *events)
        for event in events:
            wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    # Then every event was issued by threads sharing at most the budget's 4 connections
    assert 1 <= peak[0] <= budget.worst_case == 4, peak[0]
