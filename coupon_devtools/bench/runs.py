"""One measured run: warm up, publish a backlog or a paced load, and time it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coupon_devtools.bench.defaults import SERIES
from coupon_devtools.bench.events import Batch, Percentiles, make_event
from coupon_devtools.bench.machine import (
    CpuSnapshot,
    Memory,
    cpu_per_event,
    cpu_snapshot,
    memory_of,
)
from coupon_devtools.bench.stack import Stack
from coupon_devtools.bench.systems import Baseline, System, WorkerShape, publish, wait_done


@dataclass
class RunResult:
    """What one system did with one backlog (and one paced batch)."""

    system: str
    events: int
    completed: int
    duration_s: float
    events_per_s: float
    calls: int
    calls_per_s: float
    status_429: int
    backlog_latency: Percentiles
    rss_before: Memory
    rss_after: Memory
    cpu_ms_per_event: dict[str, float]
    machine_busy_pct: float
    paced_events: int = 0
    paced_rate_per_s: float | None = None
    paced_latency: Percentiles | None = None
    paced_stages: dict[str, Percentiles] = field(default_factory=dict)
    db_sessions_opened: int | None = None


def _bulk_calls_between(stack: Stack, start: float, end: float) -> list[dict[str, Any]]:
    return [c for c in stack.admin.calls(start)
            if c["path"] == "bulk" and start <= float(c["t"]) <= end]


def warm_up(stack: Stack, system: System, shape: WorkerShape) -> None:
    """A few events per pool slot, so every process has connected before the clock starts."""
    run_no = stack.next_run()
    now = datetime.now(UTC)
    batch = Batch(run_no, [make_event(run_no, i, SERIES[:1], now)
                           for i in range(max(4, 2 * shape.workers * shape.concurrency))])
    if isinstance(system, Baseline):
        system.mark()
    publish(stack, system, batch)
    wait_done(system, batch)


def measure_backlog(stack: Stack, system: System, n_events: int, series: Sequence[int]
                    ) -> tuple[Batch, dict[int, float], CpuSnapshot, CpuSnapshot]:
    run_no = stack.next_run()
    now = datetime.now(UTC)
    batch = Batch(run_no, [make_event(run_no, i, series, now) for i in range(n_events)])
    if isinstance(system, Baseline):
        system.mark()
    before = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
    publish(stack, system, batch)
    wait_done(system, batch)
    after = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
    return batch, system.completion_times(batch), before, after


@contextlib.contextmanager
def running(stack: Stack, system: System, shape: WorkerShape) -> Iterator[Memory]:
    """The system started and warmed up; yields its memory after warm-up; stops it after."""
    stack.say(f"{system.name}: starting {shape.workers} worker(s), {shape.pool} x "
              f"{shape.concurrency}")
    system.start()
    try:
        warm_up(stack, system, shape)
        yield memory_of(system.roots())
    finally:
        system.stop()


def measure_throughput(stack: Stack, system: System, *, n_events: int, series: Sequence[int],
                       rss_before: Memory) -> RunResult:
    """A backlog of ``n_events`` published at once onto the running system."""
    stack.say(f"{system.name}: {n_events} events as a backlog")
    sessions = stack.db_sessions()
    batch, times, cpu0, cpu1 = measure_backlog(stack, system, n_events, series)
    result = _backlog_result(stack, system.name, batch, times, cpu0, cpu1, rss_before)
    result.db_sessions_opened = stack.db_sessions() - sessions
    result.rss_after = memory_of(system.roots())
    return result


def measure_paced(stack: Stack, system: System, result: RunResult, *, n_events: int,
                  rate_per_s: float, series: Sequence[int]) -> None:
    """Events published at a steady rate: their latency goes into ``result``."""
    stack.say(f"{system.name}: {n_events} events paced at {rate_per_s:g}/s")
    run_no = stack.next_run()
    paced = Batch(run_no, [make_event(run_no, i, series, datetime.now(UTC))
                           for i in range(n_events)])
    if isinstance(system, Baseline):
        system.mark()
    publish(stack, system, paced, pace_per_s=rate_per_s)
    wait_done(system, paced)
    times = system.completion_times(paced)
    result.paced_events = len(paced)
    result.paced_rate_per_s = rate_per_s
    result.paced_latency = Percentiles.of([t - paced.published_at[i] for i, t in times.items()])
    result.paced_stages = system.stages(paced)
    result.rss_after = memory_of(system.roots())


def run_system(stack: Stack, system: System, shape: WorkerShape, *, n_events: int,
               series: Sequence[int]) -> RunResult:
    """Start the system, warm it up, measure one backlog, stop it."""
    with running(stack, system, shape) as rss_before:
        return measure_throughput(stack, system, n_events=n_events, series=series,
                                  rss_before=rss_before)


def _backlog_result(stack: Stack, name: str, batch: Batch, times: Mapping[int, float],
                    cpu0: CpuSnapshot, cpu1: CpuSnapshot, rss_before: Memory) -> RunResult:
    start = min(batch.published_at)
    end = max(times.values()) if times else time.time()
    duration = max(end - start, 1e-6)
    calls = _bulk_calls_between(stack, start, end + 1.0)
    per_event, busy = cpu_per_event(cpu0, cpu1, len(batch))
    return RunResult(
        system=name, events=len(batch), completed=len(times),
        duration_s=round(duration, 2), events_per_s=round(len(times) / duration, 1),
        calls=len(calls), calls_per_s=round(len(calls) / duration, 1),
        status_429=sum(1 for c in calls if c["status"] == 429),
        backlog_latency=Percentiles.of([t - batch.published_at[i] for i, t in times.items()]),
        rss_before=rss_before, rss_after=rss_before, cpu_ms_per_event=per_event,
        machine_busy_pct=busy,
    )
