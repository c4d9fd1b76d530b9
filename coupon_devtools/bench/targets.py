"""The ``targets`` scenario: one table, one verdict per row, every figure as a user pays it.

Each run is *cold*: the backlog waits on the queue first, then the worker command starts, and
the clock runs from the moment the command is spawned until the last event of the backlog is
issued. Start-up counts because a fleet that scales out under load pays it (an outside
measurement that timed from the command's start found a lower ratio than a bench that started
its clock on warmed-up workers). Both sides, ours and the bare Celery task, are measured the
same way, in rounds that alternate which goes first; each row gives the median round and the
lowest and highest.

- 300 ms API latency, ``threads`` x 64: ours against the ideal ``c / L`` and against the bare
  task on the same pool;
- memory: PSS summed over every process of the worker, ours on ``threads`` x 64 against ours on
  ``prefork`` x 64, both at the end of the same backlog;
- 50 ms, ``prefork`` x 8: ours against the bare task in throughput, in CPU seconds per event
  (the worker's process tree, start-up included) and in RSS (summed over its processes);
- for both throughput ratios, their agreement with an outside measurement: the same ratio
  from the sandbox Capillary's log of its answers (``outside.py``) instead of the systems'
  own records, within ``AGREEMENT_TARGET``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from coupon_devtools.bench.defaults import BenchError
from coupon_devtools.bench.events import Batch, make_event
from coupon_devtools.bench.machine import memory_of, process_table, process_tree, started_at
from coupon_devtools.bench.outside import sandbox_answers
from coupon_devtools.bench.stack import Stack
from coupon_devtools.bench.systems import Baseline, Ours, WorkerShape, publish, wait_done

#: The slow-API row: Capillary's real latency, and the calls in flight a campaign needs.
SLOW_LATENCY_MS = 300.0
SLOW_CONCURRENCY = 64
SLOW_EVENTS = 3000
#: The fast-API row (the issue's first measurement).
FAST_LATENCY_MS = 50.0
FAST_CONCURRENCY = 8
FAST_EVENTS = 2000
ROUNDS = 3

IDEAL_SHARE_TARGET = 0.9
BARE_THROUGHPUT_TARGET = 0.95
PSS_TARGET = 0.5
CPU_TARGET = 1.3
RSS_TARGET = 1.25
#: How far a throughput ratio from the bench's records may be from the sandbox's (issue 26).
AGREEMENT_TARGET = 0.02

QUEUES = ("coupons.events", "coupons.tasks", "coupons.retry")


@dataclass
class ColdRun:
    """One system, started onto a waiting backlog, until the backlog is issued."""

    system: str
    pool: str
    concurrency: int
    events: int
    ready_s: float
    duration_s: float
    events_per_s: float
    cpu_s: float
    cpu_ms_per_event: float
    rss_mb: float
    pss_mb: float
    processes: int
    #: The outside measurement: the events the sandbox answered 200 for, over the time from
    #: the spawn to its last such answer.
    outside_events: int
    outside_duration_s: float
    outside_events_per_s: float
    #: When the kernel says the worker command started, after the bench's spawn time (None
    #: when /proc could not tell).
    command_started_s: float | None = None


@dataclass
class Spread:
    """The median of the rounds, and the lowest and highest."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(round(statistics.median(values), 3), round(min(values), 3),
                   round(max(values), 3))


@dataclass
class TargetRow:
    """One figure against its target: ours, what it is compared with, the ratio, a verdict."""

    figure: str
    ours: Spread
    other: Spread | None
    other_label: str
    ratio: Spread
    target: str
    met: bool
    #: Agreement rows only: ours minus the other, round by round.
    difference: Spread | None = None


@dataclass
class TargetsResult:
    rows: list[TargetRow]
    runs: list[ColdRun] = field(default_factory=list)
    rounds: int = ROUNDS


def _tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds of the process trees so far: every live process, and the children the
    roots already reaped."""
    table = process_table()
    total = 0.0
    for pid in process_tree(roots, table):
        total += table[pid][2]
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in roots:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[13]) + int(fields[14])) / ticks
    return total


def cold_run(stack: Stack, system: Ours | Baseline, shape: WorkerShape, *, n_events: int,
             series: Sequence[int]) -> ColdRun:
    """Publish ``n_events``, then start ``system`` and time it until they are issued."""
    stack.purge(*QUEUES)
    run_no = stack.next_run()
    now = datetime.now(UTC)
    batch = Batch(run_no, [make_event(run_no, i, series, now) for i in range(n_events)])
    if isinstance(system, Baseline):
        system.mark()
    publish(stack, system, batch)
    stack.say(f"{system.name}: {shape.pool} x {shape.concurrency} started onto "
              f"{n_events} waiting events")
    spawned = time.time()
    system.start()
    try:
        ready = time.time() - spawned
        kernel_starts = [t for t in map(started_at, system.roots()) if t is not None]
        wait_done(system, batch)
        cpu = _tree_cpu_s(system.roots())
        memory = memory_of(system.roots())
    finally:
        system.stop()
    times = system.completion_times(batch)
    if len(times) < n_events:
        raise BenchError(f"{system.name}: {len(times)} of {n_events} events issued")
    outside = sandbox_answers(stack, batch, since=spawned)
    if outside.issued < n_events or outside.last_answer is None:
        raise BenchError(f"{system.name}: the sandbox answered {outside.issued} of {n_events} "
                         "events")
    duration = max(max(times.values()) - spawned, 1e-6)
    outside_duration = max(outside.last_answer - spawned, 1e-6)
    return ColdRun(
        system=system.name, pool=shape.pool, concurrency=shape.concurrency, events=n_events,
        ready_s=round(ready, 2), duration_s=round(duration, 3),
        events_per_s=round(n_events / duration, 2), cpu_s=round(cpu, 2),
        cpu_ms_per_event=round(cpu * 1000 / n_events, 3),
        rss_mb=round(memory.rss_mb, 1), pss_mb=round(memory.pss_mb, 1),
        processes=memory.processes, outside_events=outside.issued,
        outside_duration_s=round(outside_duration, 3),
        outside_events_per_s=round(outside.issued / outside_duration, 2),
        command_started_s=round(min(kernel_starts) - spawned, 3) if kernel_starts else None)


def _rounds(stack: Stack, shape: WorkerShape, *, n_events: int, rounds: int,
            series: Sequence[int], latency_ms: float) -> tuple[list[ColdRun], list[ColdRun]]:
    """Ours and the bare task, ``rounds`` times each, alternating which goes first."""
    stack.configure_sandbox(latency_ms=latency_ms, limit_per_minute=None)
    ours_runs: list[ColdRun] = []
    bare_runs: list[ColdRun] = []
    for round_no in range(rounds):
        stack.say(f"{latency_ms:g} ms, {shape.pool} x {shape.concurrency}: round "
                  f"{round_no + 1} of {rounds}")
        order: list[Callable[[], None]] = [
            lambda: ours_runs.append(cold_run(stack, Ours(stack, shape), shape,
                                              n_events=n_events, series=series)),
            lambda: bare_runs.append(cold_run(stack, Baseline(stack, shape), shape,
                                              n_events=n_events, series=series)),
        ]
        for step in (order if round_no % 2 else order[::-1]):
            step()
    return ours_runs, bare_runs


def _per_round(ours: Sequence[ColdRun], other: Sequence[ColdRun],
               pick: Callable[[ColdRun], float]) -> list[float]:
    """Each round's ratio ours / other (same round, same minute of the machine)."""
    return [pick(o) / pick(b) if pick(b) else 0.0 for o, b in zip(ours, other, strict=True)]


def _ratios(ours: Sequence[ColdRun], other: Sequence[ColdRun],
            pick: Callable[[ColdRun], float]) -> Spread:
    return Spread.of(_per_round(ours, other, pick))


def agreement_row(label: str, ours: Sequence[ColdRun], bare: Sequence[ColdRun]) -> TargetRow:
    """The throughput ratio ours / bare from the bench's records against the same ratio from
    the sandbox's log, round by round; met when every round's difference is within
    ``AGREEMENT_TARGET`` (a median would hide a round where the two disagree)."""
    by_records = _per_round(ours, bare, lambda r: r.events_per_s)
    by_sandbox = _per_round(ours, bare, lambda r: r.outside_events_per_s)
    pairs = list(zip(by_records, by_sandbox, strict=True))
    difference = Spread.of([a - b for a, b in pairs])
    return TargetRow(
        f"{label}: agreement with an outside measurement (events/s ratio ours / bare task)",
        Spread.of(by_records), Spread.of(by_sandbox), "from the sandbox's log",
        Spread.of([a / b if b else 0.0 for a, b in pairs]),
        f"difference <= {AGREEMENT_TARGET:g}",
        max(abs(difference.low), abs(difference.high)) <= AGREEMENT_TARGET, difference)


def run_targets(stack: Stack, *, short: bool, rounds: int | None, series: Sequence[int],
                slow_events: int | None = None, fast_events: int | None = None,
                say: Callable[[str], None] | None = None) -> TargetsResult:
    """Every row of the targets table (``short``: one round of small backlogs)."""
    n_rounds = 1 if short else rounds or ROUNDS
    slow_n = 60 if short else slow_events or SLOW_EVENTS
    fast_n = 40 if short else fast_events or FAST_EVENTS
    slow_c = 8 if short else SLOW_CONCURRENCY
    threads = WorkerShape(1, slow_c, "threads")
    ours_slow, bare_slow = _rounds(stack, threads, n_events=slow_n, rounds=n_rounds,
                                   series=series, latency_ms=SLOW_LATENCY_MS)
    prefork_slow = cold_run(stack, Ours(stack, WorkerShape(1, slow_c, "prefork")),
                            WorkerShape(1, slow_c, "prefork"), n_events=slow_n, series=series)
    fast = WorkerShape(1, FAST_CONCURRENCY, "prefork")
    ours_fast, bare_fast = _rounds(stack, fast, n_events=fast_n, rounds=n_rounds,
                                   series=series, latency_ms=FAST_LATENCY_MS)
    ideal = slow_c / (SLOW_LATENCY_MS / 1000.0)

    def rate(run: ColdRun) -> float:
        return run.events_per_s

    def spread(runs: Sequence[ColdRun], pick: Callable[[ColdRun], float]) -> Spread:
        return Spread.of([pick(r) for r in runs])

    slow_label = f"{SLOW_LATENCY_MS:g} ms, threads x {slow_c}"
    fast_label = f"{FAST_LATENCY_MS:g} ms, prefork x {FAST_CONCURRENCY}"
    share = Spread.of([r.events_per_s / ideal for r in ours_slow])
    bare_ratio = _ratios(ours_slow, bare_slow, rate)
    pss = Spread.of([r.pss_mb / prefork_slow.pss_mb for r in ours_slow])
    fast_ratio = _ratios(ours_fast, bare_fast, rate)
    cpu = _ratios(ours_fast, bare_fast, lambda r: r.cpu_ms_per_event)
    rss = _ratios(ours_fast, bare_fast, lambda r: r.rss_mb)
    rows = [
        TargetRow(f"{slow_label}: events/s against the ideal c/L", spread(ours_slow, rate),
                  Spread(ideal, ideal, ideal), "ideal c/L", share,
                  f">= {IDEAL_SHARE_TARGET:g}x", share.median >= IDEAL_SHARE_TARGET),
        TargetRow(f"{slow_label}: events/s against the bare task", spread(ours_slow, rate),
                  spread(bare_slow, rate), "bare task", bare_ratio,
                  f">= {BARE_THROUGHPUT_TARGET:g}x",
                  bare_ratio.median >= BARE_THROUGHPUT_TARGET),
        TargetRow(f"{slow_label}: PSS (MB) against prefork x {slow_c}",
                  spread(ours_slow, lambda r: r.pss_mb),
                  Spread(prefork_slow.pss_mb, prefork_slow.pss_mb, prefork_slow.pss_mb),
                  f"ours, prefork x {slow_c}", pss, f"< {PSS_TARGET:g}x",
                  pss.median < PSS_TARGET),
        TargetRow(f"{fast_label}: events/s against the bare task", spread(ours_fast, rate),
                  spread(bare_fast, rate), "bare task", fast_ratio,
                  f">= {BARE_THROUGHPUT_TARGET:g}x",
                  fast_ratio.median >= BARE_THROUGHPUT_TARGET),
        TargetRow(f"{fast_label}: CPU ms per event against the bare task",
                  spread(ours_fast, lambda r: r.cpu_ms_per_event),
                  spread(bare_fast, lambda r: r.cpu_ms_per_event), "bare task", cpu,
                  f"<= {CPU_TARGET:g}x", cpu.median <= CPU_TARGET),
        TargetRow(f"{fast_label}: RSS (MB) against the bare task",
                  spread(ours_fast, lambda r: r.rss_mb), spread(bare_fast, lambda r: r.rss_mb),
                  "bare task", rss, f"<= {RSS_TARGET:g}x", rss.median <= RSS_TARGET),
        agreement_row(slow_label, ours_slow, bare_slow),
        agreement_row(fast_label, ours_fast, bare_fast),
    ]
    return TargetsResult(rows, [*ours_slow, *bare_slow, prefork_slow, *ours_fast, *bare_fast],
                         n_rounds)

