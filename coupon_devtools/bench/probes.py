"""Two probes beside the scenarios: the sandbox's own ceiling, and the database round trips
of one event."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, event

from coupon_devtools.bench.defaults import (
    CEILING_CLIENTS,
    CEILING_DURATION_S,
    ROUND_TRIP_EVENTS,
    SANDBOX_PASSWORD,
    SANDBOX_USER,
    SERIES,
    BenchError,
)
from coupon_devtools.bench.events import customer_id, make_event
from coupon_devtools.bench.machine import cpu_snapshot
from coupon_devtools.bench.scenarios import BenchOptions
from coupon_devtools.bench.stack import Stack


@dataclass
class Ceiling:
    clients: int
    duration_s: float
    calls: int
    calls_per_s: float
    statuses: dict[str, int]
    sandbox_cpu_pct: float


def run_ceiling(stack: Stack, options: BenchOptions) -> Ceiling:
    """Bulk-issue calls/s the sandbox serves at zero latency to many concurrent clients."""
    duration = 1.0 if options.short else CEILING_DURATION_S
    stack.configure_sandbox(latency_ms=0, limit_per_minute=None)
    stack.say(f"sandbox ceiling: {CEILING_CLIENTS} clients for {duration:g} s")
    cpu0 = cpu_snapshot([], stack.sandbox_pid)
    t0 = time.monotonic()
    statuses = asyncio.run(_hammer(stack.sandbox_url, CEILING_CLIENTS, duration))
    elapsed = time.monotonic() - t0
    cpu1 = cpu_snapshot([], stack.sandbox_pid)
    calls = sum(statuses.values())
    sandbox_cpu = cpu1.seconds("sandbox") - cpu0.seconds("sandbox")
    stack.admin.reset()
    return Ceiling(CEILING_CLIENTS, round(elapsed, 2), calls, round(calls / elapsed, 1),
                   {str(k): v for k, v in sorted(statuses.items())},
                   round(100.0 * sandbox_cpu / elapsed, 1))


async def _hammer(base_url: str, clients: int, duration_s: float) -> dict[int, int]:
    import aiohttp
    from pydantic import SecretStr

    from worker.adapters.capillary.auth import basic_auth_header
    from worker.adapters.capillary.client import BULK_ISSUE_PATH

    url = base_url + BULK_ISSUE_PATH
    headers = {"Authorization": basic_auth_header(SANDBOX_USER, SecretStr(SANDBOX_PASSWORD))}
    counter = itertools.count()
    statuses: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while loop.time() < deadline:
                body = {"seriesIds": [SERIES[0]],
                        "customer": {"id": customer_id(9999, next(counter) % 10_000_000)},
                        "metadata": {"notes": "ceiling"}}
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


# -- database round trips per event --------------------------------------------------------


@dataclass
class RoundTrips:
    label: str
    events: int
    round_trips: float
    statements: float
    transactions: float
    pings: float


@dataclass
class _TraceCount:
    round_trips: int = 0
    statements: int = 0
    transactions: int = 0
    pings: int = 0

    def __sub__(self, other: _TraceCount) -> _TraceCount:
        return _TraceCount(self.round_trips - other.round_trips,
                           self.statements - other.statements,
                           self.transactions - other.transactions, self.pings - other.pings)

    def __add__(self, other: _TraceCount) -> _TraceCount:
        return _TraceCount(self.round_trips + other.round_trips,
                           self.statements + other.statements,
                           self.transactions + other.transactions, self.pings + other.pings)


def trace_connections(engine: Engine, directory: Path) -> list[IO[str]]:
    """Write libpq's trace of every connection ``engine`` opens from now on to a file of its
    own in ``directory``; returns the open files, for the caller to close."""
    handles: list[IO[str]] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection: Any, _record: Any) -> None:
        from psycopg import pq

        handle = (directory / f"conn-{len(handles)}.trace").open("w")
        handles.append(handle)
        dbapi_connection.pgconn.trace(handle.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    return handles


def count_traces(directory: Path) -> _TraceCount:
    """What the traces in ``directory`` (``trace_connections``) count so far, all together."""
    total = _TraceCount()
    for path in sorted(directory.glob("*.trace")):
        total = total + count_trace(path.read_text(errors="replace").splitlines())
    return total


def count_trace(lines: Sequence[str]) -> _TraceCount:
    """Round trips, statements, transactions and pings in one connection's libpq trace."""
    counted = _TraceCount()
    last_query = ""
    worked = False
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        direction, message = parts[0], parts[2]
        detail = parts[3].strip() if len(parts) > 3 else ""
        if direction == "F" and message == "Query":
            last_query = detail.strip('"').strip().upper()
            if last_query == ";":
                continue
            if last_query not in ("BEGIN", "COMMIT", "ROLLBACK"):
                counted.statements += 1
                worked = True
        elif direction == "F" and message == "Execute":
            counted.statements += 1
            worked = True
            last_query = ""
        elif direction == "B" and message == "ReadyForQuery":
            counted.round_trips += 1
            if last_query == ";":
                counted.pings += 1
            elif detail == "I" and (worked or last_query in ("COMMIT", "ROLLBACK")):
                counted.transactions += 1
                worked = False
            last_query = ""
    return counted


def run_round_trips(stack: Stack, options: BenchOptions) -> list[RoundTrips]:
    """Wire-level database round trips per issued event, one event at a time, in-process."""
    import logging

    stack.configure_sandbox(latency_ms=0, limit_per_minute=None)
    n_events = 5 if options.short else ROUND_TRIP_EVENTS
    # The pipeline runs in this process here: its per-event lines would bury the tables.
    pipeline_log = logging.getLogger("worker.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.WARNING)
    try:
        return [_round_trips(stack, options, n_events, None),
                _round_trips(stack, options, n_events, 1_000_000)]
    finally:
        pipeline_log.setLevel(level)


def _round_trips(stack: Stack, options: BenchOptions, n_events: int,
                 rate_limit_per_minute: int | None) -> RoundTrips:
    from coupon_devtools.fakes.broker import FakePublisher
    from worker.adapters.postgres.unit_of_work import make_engine
    from worker.bootstrap import build_deps
    from worker.domain.events import parse_event_data
    from worker.usecases.issue import issue_event

    assert stack.settings is not None
    settings = stack.settings.model_copy(update={"rate_limit_per_minute": rate_limit_per_minute})
    trace_dir = Path(tempfile.mkdtemp(prefix="trace-", dir=stack.workdir))
    engine = make_engine(settings.database_url, application_name="coupon-worker-bench")
    traces = trace_connections(engine, trace_dir)

    deps = build_deps(settings, FakePublisher(), engine=engine)
    run_no = stack.next_run()
    try:
        def issue(i: int) -> None:
            report = issue_event(
                parse_event_data(make_event(run_no, i, options.series, datetime.now(UTC))),
                source="bus", deps=deps)
            if report.issued != len(options.series):
                raise BenchError(f"round-trip run: event {i} did not issue: {report}")

        for i in range(3):  # first use: connections, the limiter's bucket row, the circuit
            issue(i)
        time.sleep(0.05)
        before = count_traces(trace_dir)
        for i in range(3, 3 + n_events):
            issue(i)
        time.sleep(0.05)
        counted = count_traces(trace_dir) - before
    finally:
        engine.dispose()
        for handle in traces:
            handle.close()
        shutil.rmtree(trace_dir, ignore_errors=True)
    label = "no rate limit" if rate_limit_per_minute is None else "with the global rate limit"
    return RoundTrips(label, n_events, round(counted.round_trips / n_events, 2),
                      round(counted.statements / n_events, 2),
                      round(counted.transactions / n_events, 2),
                      round(counted.pings / n_events, 2))
