"""The scenarios: overhead against the baseline, scaling with concurrency, the quota, and
memory under a backlog."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from coupon_devtools.bench.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_EVENTS,
    DEFAULT_LATENCY_MS,
    DEFAULT_POOL,
    DEFAULT_WORKDIR,
    MEMORY_BACKLOGS,
    MEMORY_RETRIES,
    MEMORY_SAMPLE_S,
    OVERHEAD_ROUNDS,
    PACED_LOAD,
    QUOTA_DURATION_S,
    QUOTA_LIMIT_PER_MINUTE,
    QUOTA_TARGET,
    QUOTA_WINDOW_S,
    QUOTA_WORKERS,
    SCALE_CONCURRENCIES,
    SCALE_LATENCY_MS,
    SCALE_STEP_S,
    SCALE_TARGET,
    SERIES,
    BenchError,
    Pool,
    ScenarioName,
    Via,
)
from coupon_devtools.bench.events import Batch, Percentiles, make_event
from coupon_devtools.bench.machine import Memory, cpu_per_event, cpu_snapshot, memory_of, status_kb
from coupon_devtools.bench.runs import (
    RunResult,
    measure_paced,
    measure_throughput,
    run_system,
    running,
    warm_up,
)
from coupon_devtools.bench.stack import Stack
from coupon_devtools.bench.systems import Baseline, Ours, WorkerShape, publish, publish_fast


@dataclass
class BenchOptions:
    events: int = DEFAULT_EVENTS
    latency_ms: float | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    pool: Pool = DEFAULT_POOL
    workers: int = 1
    rate_limit_per_minute: int | None = None
    rate_limit_burst: int | None = None
    sandbox_limit_per_minute: int | None = None
    scenario: ScenarioName = "quick"
    short: bool = False
    as_json: bool = False
    via: Via = "bus"
    series_per_event: int = 1
    duration_s: float | None = None
    log_level: str = "INFO"
    rounds: int | None = None
    workdir: Path = Path(DEFAULT_WORKDIR)
    keep: bool = False
    namespace: str = ""

    @property
    def series(self) -> tuple[int, ...]:
        return SERIES[:max(1, min(self.series_per_event, len(SERIES)))]

    def latency_for(self, scenario_default_ms: float) -> float:
        return self.latency_ms if self.latency_ms is not None else scenario_default_ms

    @property
    def n_events(self) -> int:
        return min(self.events, 40) if self.short else self.events

    @property
    def n_rounds(self) -> int:
        if self.short:
            return 1
        if self.rounds is not None:
            return self.rounds
        return OVERHEAD_ROUNDS if self.scenario in ("overhead", "all") else 1

    @property
    def paced_events(self) -> int:
        return 20 if self.short else max(20, min(1000, self.events // 4))


@dataclass
class Comparison:
    latency_ms: float
    shape: dict[str, Any]
    via: str
    ours: RunResult
    baseline: RunResult
    throughput_ratio: float
    latency_ratio_p50: float | None
    latency_ratio_p99: float | None
    target: float | None = None
    met: bool | None = None
    # Each round's ratio, in the order run; ``ours`` and ``baseline`` are the median round's.
    round_ratios: list[float] = field(default_factory=list)


def round_order(round_no: int) -> tuple[str, str]:
    """Which side goes first in a round: they alternate, so that a machine getting faster or
    slower during the run (a neighbour on the host, a cache warming) favours neither."""
    return ("baseline", "ours") if round_no % 2 == 0 else ("ours", "baseline")


def median_round(ratios: Sequence[float]) -> int:
    """The index of the median ratio (the upper one of two middles)."""
    return sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]


def run_comparison(stack: Stack, options: BenchOptions, *, target: float | None) -> Comparison:
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    shape = WorkerShape(options.workers, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    base_system = Baseline(stack, shape)
    ours_system = Ours(stack, shape, via=options.via,
                       rate_limit_per_minute=options.rate_limit_per_minute,
                       rate_limit_burst=options.rate_limit_burst)
    systems: dict[str, Ours | Baseline] = {"ours": ours_system, "baseline": base_system}
    pairs: list[tuple[RunResult, RunResult]] = []
    for round_no in range(options.n_rounds):
        if options.n_rounds > 1:
            stack.say(f"round {round_no + 1} of {options.n_rounds}")
        results: dict[str, RunResult] = {}
        for name in round_order(round_no):
            with running(stack, systems[name], shape) as rss_before:
                results[name] = measure_throughput(
                    stack, systems[name], n_events=options.n_events, series=options.series,
                    rss_before=rss_before)
        pairs.append((results["ours"], results["baseline"]))
    ratios = [round(o.events_per_s / b.events_per_s, 3) if b.events_per_s else 0.0
              for o, b in pairs]
    median = median_round(ratios)
    ours, baseline = pairs[median]
    # Both are paced at the same rate, which both can sustain: latency, not queueing.
    rate = max(1.0, round(PACED_LOAD * min(ours.events_per_s, baseline.events_per_s), 1))
    for system, result in ((ours_system, ours), (base_system, baseline)):
        with running(stack, system, shape):
            measure_paced(stack, system, result, n_events=options.paced_events,
                          rate_per_s=rate, series=options.series)
    ratio = ratios[median]

    def latency_ratio(pick: Callable[[Percentiles], float]) -> float | None:
        if ours.paced_latency is None or baseline.paced_latency is None:
            return None
        base = pick(baseline.paced_latency)
        return round(pick(ours.paced_latency) / base, 2) if base else None

    return Comparison(
        latency_ms=latency_ms, shape=asdict(shape), via=options.via, ours=ours,
        baseline=baseline, throughput_ratio=ratio,
        latency_ratio_p50=latency_ratio(lambda p: p.p50_ms),
        latency_ratio_p99=latency_ratio(lambda p: p.p99_ms),
        target=target, met=(ratio >= target) if target is not None else None,
        round_ratios=ratios,
    )


@dataclass
class ScaleStep:
    concurrency: int
    latency_ms: float
    ideal_per_s: float
    target_per_s: float
    result: RunResult
    share_of_ideal: float
    met: bool


def run_scale(stack: Stack, options: BenchOptions) -> list[ScaleStep]:
    latency_ms = options.latency_for(SCALE_LATENCY_MS)
    latency_s = latency_ms / 1000.0
    steps = (1, 4) if options.short else SCALE_CONCURRENCIES
    step_s = 1.5 if options.short else SCALE_STEP_S
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    results = []
    for concurrency in steps:
        ideal = concurrency / latency_s if latency_s > 0 else math.inf
        if options.rate_limit_per_minute:
            ideal = min(ideal, options.rate_limit_per_minute / 60.0)
        n_events = max(20, int(ideal * step_s)) if math.isfinite(ideal) else options.n_events
        shape = WorkerShape(options.workers, concurrency, options.pool)
        system = Ours(stack, shape, via=options.via,
                      rate_limit_per_minute=options.rate_limit_per_minute,
                      rate_limit_burst=options.rate_limit_burst)
        result = run_system(stack, system, shape, n_events=n_events, series=options.series)
        share = result.events_per_s / ideal if ideal else 0.0
        results.append(ScaleStep(concurrency, latency_ms, round(ideal, 1),
                                 round(SCALE_TARGET * ideal, 1), result, round(share, 3),
                                 share >= SCALE_TARGET))
    return results


@dataclass
class QuotaResult:
    limit_per_minute: int
    burst: int | None
    sandbox_limit_per_minute: int
    workers: int
    concurrency: int
    latency_ms: float
    window_s: float
    calls_ok: int
    calls_429: int
    calls_per_minute: float
    share_of_limit: float
    peak_60s_window: int
    first_429_after_s: float | None
    events_completed: int
    met: bool
    rss_mb: float
    cpu_ms_per_call: dict[str, float]
    machine_busy_pct: float


def _peak_window(times: Sequence[float], window_s: float) -> int:
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_quota(stack: Stack, options: BenchOptions) -> QuotaResult:
    limit = options.rate_limit_per_minute or QUOTA_LIMIT_PER_MINUTE
    sandbox_limit = options.sandbox_limit_per_minute or limit
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    duration = options.duration_s or (8.0 if options.short else QUOTA_DURATION_S)
    workers = QUOTA_WORKERS
    shape = WorkerShape(workers, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms, limit_per_minute=sandbox_limit)
    system = Ours(stack, shape, via=options.via, rate_limit_per_minute=limit,
                  rate_limit_burst=options.rate_limit_burst)
    stack.say(f"quota: {workers} workers under {limit}/min for {duration:g} s")
    system.start()
    try:
        # Warm up under the limit too: it drains the initial burst, as a running fleet would.
        warm_up(stack, system, WorkerShape(workers, min(options.concurrency, 2), options.pool))
        run_no = stack.next_run()
        n_events = int(limit / 60.0 * (duration + 15)) + 20
        now = datetime.now(UTC)
        batch = Batch(run_no, [make_event(run_no, i, options.series, now)
                               for i in range(n_events)])
        cpu0 = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
        publish(stack, system, batch)
        first = min(batch.published_at)
        time.sleep(max(0.0, first + duration + 1.0 - time.time()))
        cpu1 = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
        rss = memory_of(system.roots())
        completed = system.done(batch)
    finally:
        system.stop()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    calls = [c for c in stack.admin.calls(first) if c["path"] == "bulk"]
    start = min((float(c["t"]) for c in calls), default=first)
    ok = [float(c["t"]) for c in calls
          if c["status"] == 200 and start <= float(c["t"]) < start + duration]
    refused = sum(1 for c in calls if c["status"] == 429)
    per_minute = len(ok) / duration * 60.0
    per_call, busy = cpu_per_event(cpu0, cpu1, max(len(ok), 1))
    share = per_minute / sandbox_limit
    return QuotaResult(
        limit_per_minute=limit, burst=options.rate_limit_burst,
        sandbox_limit_per_minute=sandbox_limit, workers=workers,
        concurrency=options.concurrency, latency_ms=latency_ms, window_s=duration,
        calls_ok=len(ok), calls_429=refused,
        calls_per_minute=round(per_minute, 1), share_of_limit=round(share, 4),
        peak_60s_window=_peak_window([float(c["t"]) for c in calls if c["status"] == 200],
                                     QUOTA_WINDOW_S),
        first_429_after_s=next((round(float(c["t"]) - start, 1) for c in calls
                                if c["status"] == 429), None),
        events_completed=completed, met=share >= QUOTA_TARGET and refused == 0,
        rss_mb=round(rss.rss_mb, 1), cpu_ms_per_call=per_call, machine_busy_pct=busy,
    )


@dataclass
class MemoryCase:
    label: str
    waiting: int
    rss_ready_mb: float
    rss_steady_mb: float
    rss_max_mb: float
    pss_steady_mb: float
    main_rss_steady_mb: float
    processes: int
    processed_while_sampling: int
    forwarded_while_sampling: int


@dataclass
class MemoryResult:
    concurrency: int
    pool: str
    latency_ms: float
    sample_s: float
    cases: list[MemoryCase]
    backlog_ratio: float
    retries_ratio: float


def _sample_memory(system: Ours, seconds: float) -> tuple[Memory, Memory, float]:
    """(at ready, steady = median of the last half, max RSS in MB) over ``seconds``."""
    ready = memory_of(system.roots())
    samples: list[Memory] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        samples.append(memory_of(system.roots()))
        if any(not p.alive() for p in system.processes()):
            raise BenchError("a worker died while its memory was sampled:\n"
                             + system.processes()[0].log_tail())
    tail = sorted(samples[len(samples) // 2:], key=lambda m: m.rss_kb) or [ready]
    steady = tail[len(tail) // 2]
    return ready, steady, max(m.rss_mb for m in [ready, *samples])


def _issued_count(stack: Stack) -> int:
    with stack.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM entities WHERE state = 'issued'")).scalar() or 0)


def _insert_waiting_retries(stack: Stack, count: int) -> None:
    """``count`` events with one entity each in retry_wait, due in a day (plain SQL)."""
    due = datetime.now(UTC) + timedelta(days=1)
    with stack.engine.begin() as conn:
        conn.execute(text(
            """
            INSERT INTO events (event_id, event_type, customer_key, customer, series_ids,
                                metadata, payload, fingerprint, issue_ref, source, state)
            SELECT 'retry-' || g, 'BenchIssue', 'id:8' || g, jsonb_build_object('id', '8' || g),
                   ARRAY[544770], '{}'::jsonb, '{}'::jsonb, md5(g::text), 'ref-' || g, 'bench',
                   'processing'
              FROM generate_series(1, :n) AS g
            """), {"n": count})
        conn.execute(text(
            """
            INSERT INTO entities (event_id, series_id, customer_key, state, attempts,
                                  last_verdict, last_error_code, next_attempt_at,
                                  first_attempt_at)
            SELECT 'retry-' || g, 544770, 'id:8' || g, 'retry_wait', 1, 'retryable', '503',
                   :due, now()
              FROM generate_series(1, :n) AS g
            """), {"n": count, "due": due})
    with stack.engine.connect() as conn:
        conn.execute(text("ANALYZE entities"))
        conn.commit()


def run_memory(stack: Stack, options: BenchOptions) -> MemoryResult:
    backlogs = (200, 2000) if options.short else MEMORY_BACKLOGS
    retries = 2000 if options.short else MEMORY_RETRIES
    sample_s = options.duration_s or (4.0 if options.short else MEMORY_SAMPLE_S)
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    shape = WorkerShape(1, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    cases: list[MemoryCase] = []
    for waiting in backlogs:
        stack.truncate_ledger()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
        system = Ours(stack, shape, via="bus")
        run_no = stack.next_run()
        now = datetime.now(UTC)
        stack.say(f"memory: publishing a backlog of {waiting} events")
        publish_fast(stack, system.target_queue(),
                     (json.dumps(make_event(run_no, i, options.series, now)).encode()
                      for i in range(waiting)))
        _wait_queue_depth(stack, "coupons.events", waiting)
        cases.append(_memory_case(stack, system, f"{waiting:,} events waiting", waiting,
                                  sample_s))
    stack.truncate_ledger()
    stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    stack.say(f"memory: {retries} retries waiting in the ledger")
    _insert_waiting_retries(stack, retries)
    cases.append(_memory_case(stack, Ours(stack, shape, via="bus"),
                              f"{retries:,} retries waiting", retries, sample_s))
    stack.truncate_ledger()
    small, large, with_retries = cases
    return MemoryResult(
        concurrency=options.concurrency, pool=options.pool, latency_ms=latency_ms,
        sample_s=sample_s, cases=cases,
        backlog_ratio=round(large.rss_steady_mb / small.rss_steady_mb, 3),
        retries_ratio=round(with_retries.rss_steady_mb / small.rss_ready_mb, 3),
    )


def _wait_queue_depth(stack: Stack, queue: str, depth: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        state = stack.queue_state(queue)
        if state is not None and state.messages >= depth:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{queue} holds {state.messages if state else 0} of {depth} "
                             "messages after 120 s")
        time.sleep(0.2)


def _memory_case(stack: Stack, system: Ours, label: str, waiting: int, sample_s: float
                 ) -> MemoryCase:
    issued_before = _issued_count(stack)
    on_bus = stack.queue_state("coupons.events")
    system.start()
    try:
        ready, steady, peak = _sample_memory(system, sample_s)
        main_rss = sum(status_kb(pid, "status", "VmRSS:") for pid in system.roots()) / 1024
        processed = _issued_count(stack) - issued_before
        still_on_bus = stack.queue_state("coupons.events")
    finally:
        system.stop()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    forwarded = (on_bus.messages if on_bus else 0) - (still_on_bus.messages if still_on_bus else 0)
    return MemoryCase(label, waiting, round(ready.rss_mb, 1), round(steady.rss_mb, 1),
                      round(peak, 1), round(steady.pss_mb, 1), round(main_rss, 1),
                      steady.processes, processed, forwarded)
