"""The report as tables for people and as JSON for machines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from coupon_devtools.bench.defaults import QUOTA_TARGET, SCALE_TARGET
from coupon_devtools.bench.probes import Ceiling, RoundTrips
from coupon_devtools.bench.scenarios import Comparison, MemoryResult, QuotaResult, ScaleStep
from coupon_devtools.bench.suite import BenchReport
from coupon_devtools.bench.targets import Spread, TargetsResult


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _ratio(ours: float | None, base: float | None) -> str:
    if ours is None or base is None or not base or math.isnan(ours) or math.isnan(base):
        return "-"
    return f"{ours / base:.2f}x"


def _verdict(met: bool | None) -> str:
    if met is None:
        return ""
    return "[green]met[/]" if met else "[red]missed[/]"


def render_machine(console: Console, report: BenchReport) -> None:
    m = report.machine
    table = Table(title="Machine", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("CPU", f"{m.cpus} x {m.cpu_model}")
    table.add_row("memory", f"{m.memory_gb:g} GB")
    table.add_row("software", f"Python {m.python}, Celery {m.celery}, PostgreSQL {m.postgres}, "
                              f"RabbitMQ {m.rabbitmq}, {m.system}")
    table.add_row("date", m.date)
    table.add_row("load before the run", f"{m.background_busy_pct:g} % CPU busy, load average "
                                         f"{' '.join(f'{v:g}' for v in m.load_average)}")
    o = report.options
    table.add_row("options", f"scenario {o['scenario']}, {o['events']} events, "
                             f"pool {o['pool']}, concurrency {o['concurrency']}, "
                             f"workers {o['workers']}, via {o['via']}, "
                             f"log level {o['log_level']}" + (", short" if o["short"] else ""))
    console.print(table)


def render_comparison(console: Console, c: Comparison) -> None:
    o, b = c.ours, c.baseline
    table = Table(title=f"Throughput and latency: coupon-worker vs baseline "
                        f"({c.shape['pool']} x {c.shape['concurrency']}, "
                        f"{c.shape['workers']} worker(s), API latency {c.latency_ms:g} ms, "
                        f"ours via {c.via})", title_justify="left")
    table.add_column("figure")
    table.add_column("coupon-worker", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio ours / baseline", justify="right")
    table.add_row("events", f"{o.events:,}", f"{b.events:,}", "")
    table.add_row("events/s (backlog)", _fmt(o.events_per_s), _fmt(b.events_per_s),
                  _ratio(o.events_per_s, b.events_per_s))
    table.add_row("API calls/s", _fmt(o.calls_per_s), _fmt(b.calls_per_s),
                  _ratio(o.calls_per_s, b.calls_per_s))
    if len(c.round_ratios) > 1:
        table.add_row(f"events/s ratio of each of {len(c.round_ratios)} rounds", "", "",
                      ", ".join(f"{r:.2f}x" for r in c.round_ratios))
    if o.paced_latency and b.paced_latency:
        rate = f"{o.paced_rate_per_s:g}/s"
        for name in ("p50", "p95", "p99"):
            ours_v = getattr(o.paced_latency, f"{name}_ms")
            base_v = getattr(b.paced_latency, f"{name}_ms")
            table.add_row(f"latency {name}, paced at {rate} (ms)", _fmt(ours_v),
                          _fmt(base_v), _ratio(ours_v, base_v))
    table.add_row("latency p50 / p99 in the backlog (ms)",
                  f"{_fmt(o.backlog_latency.p50_ms, 0)} / {_fmt(o.backlog_latency.p99_ms, 0)}",
                  f"{_fmt(b.backlog_latency.p50_ms, 0)} / {_fmt(b.backlog_latency.p99_ms, 0)}",
                  "")
    table.add_row("429s", str(o.status_429), str(b.status_429), "")
    table.add_row("worker RSS before -> after (MB)",
                  f"{o.rss_before.rss_mb:,.0f} -> {o.rss_after.rss_mb:,.0f}",
                  f"{b.rss_before.rss_mb:,.0f} -> {b.rss_after.rss_mb:,.0f}",
                  _ratio(o.rss_after.rss_mb, b.rss_after.rss_mb))
    table.add_row("worker PSS after (MB)", f"{o.rss_after.pss_mb:,.0f}",
                  f"{b.rss_after.pss_mb:,.0f}", _ratio(o.rss_after.pss_mb, b.rss_after.pss_mb))
    for name in o.cpu_ms_per_event:
        table.add_row(f"CPU ms/event: {name}", _fmt(o.cpu_ms_per_event[name], 2),
                      _fmt(b.cpu_ms_per_event.get(name), 2),
                      _ratio(o.cpu_ms_per_event[name], b.cpu_ms_per_event.get(name)))
    table.add_row("machine CPU busy (%)", _fmt(o.machine_busy_pct), _fmt(b.machine_busy_pct), "")
    table.add_row("DB connections opened during the backlog",
                  str(o.db_sessions_opened if o.db_sessions_opened is not None else "-"),
                  str(b.db_sessions_opened if b.db_sessions_opened is not None else "-"), "")
    console.print(table)
    if o.paced_stages:
        stages = Table(title=f"Where an event's time goes in coupon-worker (paced at "
                             f"{o.paced_rate_per_s:g}/s, from the ledger's timestamps)",
                       title_justify="left")
        for column in ("stage", "p50 (ms)", "p95 (ms)"):
            stages.add_column(column, justify="right" if column != "stage" else "left")
        for name, value in o.paced_stages.items():
            stages.add_row(name, _fmt(value.p50_ms), _fmt(value.p95_ms))
        console.print(stages)
    if c.target is not None:
        rounds = f" (the median of {len(c.round_ratios)} rounds)" \
            if len(c.round_ratios) > 1 else ""
        console.print(f"overhead target: throughput ratio {c.throughput_ratio:.2f}x{rounds}, "
                      f"target >= {c.target:.2f}x: {_verdict(c.met)}")


def render_scale(console: Console, steps: Sequence[ScaleStep], latency_ms: float) -> None:
    table = Table(title=f"Scale: throughput by concurrency (pool slots) at {latency_ms:g} ms "
                        f"API latency (ideal = slots / latency)", title_justify="left")
    for column in ("slots", "ideal events/s", f"target {SCALE_TARGET:.0%}", "measured events/s",
                   "share of ideal", "verdict", "ms per event beyond the API",
                   "worker CPU ms/event", "machine busy %", "RSS MB"):
        table.add_column(column, justify="right")
    for s in steps:
        r = s.result
        # Each slot spends concurrency / throughput per event; the API took latency of it.
        beyond = (s.concurrency / r.events_per_s * 1000 - latency_ms) if r.events_per_s else None
        table.add_row(str(s.concurrency), _fmt(s.ideal_per_s), _fmt(s.target_per_s),
                      _fmt(r.events_per_s), f"{s.share_of_ideal:.0%}", _verdict(s.met),
                      _fmt(beyond), _fmt(r.cpu_ms_per_event["workers"], 2),
                      _fmt(r.machine_busy_pct), _fmt(r.rss_after.rss_mb, 0))
    console.print(table)


def render_quota(console: Console, q: QuotaResult) -> None:
    burst = f"burst {q.burst}" if q.burst else "the default burst"
    table = Table(title=f"Quota: {q.workers} worker processes sharing "
                        f"{q.limit_per_minute:,} calls/minute ({burst}); the sandbox refuses "
                        f"beyond {q.sandbox_limit_per_minute:,} in any 60 s",
                  title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("measured window", f"{q.window_s:g} s")
    table.add_row("calls answered 200", f"{q.calls_ok:,}")
    table.add_row("sustained calls/minute", _fmt(q.calls_per_minute))
    table.add_row("share of the API's limit", f"{q.share_of_limit:.1%}")
    table.add_row("429s", str(q.calls_429) + (
        f" (the first {q.first_429_after_s:g} s after the first call)"
        if q.first_429_after_s is not None else ""))
    table.add_row("peak calls in any 60 s", f"{q.peak_60s_window:,}")
    table.add_row("target", f">= {QUOTA_TARGET:.0%} with zero 429s: {_verdict(q.met)}")
    table.add_row("events completed", f"{q.events_completed:,}")
    table.add_row("RSS of the 3 workers (MB)", _fmt(q.rss_mb, 0))
    table.add_row("CPU ms per call (workers / postgres)",
                  f"{_fmt(q.cpu_ms_per_call['workers'], 2)} / "
                  f"{_fmt(q.cpu_ms_per_call['postgres'], 2)}")
    table.add_row("machine CPU busy (%)", _fmt(q.machine_busy_pct))
    console.print(table)


def render_memory(console: Console, m: MemoryResult) -> None:
    table = Table(title=f"Memory: one worker ({m.pool} x {m.concurrency}), sampled "
                        f"{m.sample_s:g} s while working at {m.latency_ms:g} ms latency",
                  title_justify="left")
    for column in ("case", "RSS at ready (MB)", "steady RSS (MB)", "max RSS (MB)",
                   "steady PSS (MB)", "main process RSS (MB)", "processes",
                   "issued while sampled",
                   "bus messages bridged"):
        table.add_column(column, justify="right")
    for case in m.cases:
        table.add_row(case.label, _fmt(case.rss_ready_mb), _fmt(case.rss_steady_mb),
                      _fmt(case.rss_max_mb), _fmt(case.pss_steady_mb),
                      _fmt(case.main_rss_steady_mb), str(case.processes),
                      f"{case.processed_while_sampling:,}", f"{case.forwarded_while_sampling:,}")
    console.print(table)
    small, large, retries = m.cases
    console.print(f"ratio of steady RSS, {large.label} / {small.label}: "
                  f"{m.backlog_ratio:.2f}x; {retries.label} / an idle worker (RSS at ready "
                  f"with {small.label}): {m.retries_ratio:.2f}x")


def render_ceiling(console: Console, c: Ceiling) -> None:
    table = Table(title="The sandbox's own ceiling (zero latency, no limit)",
                  title_justify="left")
    for column in ("concurrent clients", "calls", "calls/s", "statuses", "sandbox CPU %"):
        table.add_column(column, justify="right")
    table.add_row(str(c.clients), f"{c.calls:,}", _fmt(c.calls_per_s),
                  ", ".join(f"{k}: {v}" for k, v in c.statuses.items()),
                  _fmt(c.sandbox_cpu_pct))
    console.print(table)


def render_round_trips(console: Console, rows: Sequence[RoundTrips]) -> None:
    table = Table(title="Database work per issued event (wire-level, libpq trace)",
                  title_justify="left")
    for column in ("configuration", "events", "round trips", "statements", "transactions",
                   "pre-pings"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.label, str(r.events), _fmt(r.round_trips, 2), _fmt(r.statements, 2),
                      _fmt(r.transactions, 2), _fmt(r.pings, 2))
    console.print(table)


def _spread(s: Spread | None, digits: int = 1, unit: str = "") -> str:
    if s is None:
        return "-"
    if s.low == s.high:
        return _fmt(s.median, digits, unit)
    return (f"{_fmt(s.median, digits, unit)} ({_fmt(s.low, digits)}-"
            f"{_fmt(s.high, digits)})")


def _signed(s: Spread) -> str:
    if s.low == s.high:
        return f"{s.median:+.3f}"
    return f"{s.median:+.3f} ({s.low:+.3f} to {s.high:+.3f})"


def render_targets(console: Console, t: TargetsResult) -> None:
    rounds = f"median of {t.rounds} rounds (lowest-highest)" if t.rounds > 1 else "one round"
    table = Table(title=f"Targets: each worker started onto a waiting backlog, timed from the "
                        f"command's start to the backlog issued; {rounds}",
                  title_justify="left")
    for column in ("figure", "coupon-worker", "compared with", "ratio", "target", "verdict"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in t.rows:
        if row.difference is not None:
            # An agreement row compares two ratios: the figure is how far apart they are.
            table.add_row(row.figure, _spread(row.ours, 3, "x"),
                          f"{_spread(row.other, 3, 'x')} {row.other_label}",
                          f"difference {_signed(row.difference)}", row.target,
                          _verdict(row.met))
            continue
        table.add_row(row.figure, _spread(row.ours), f"{_spread(row.other)} {row.other_label}",
                      _spread(row.ratio, 2, "x"), row.target, _verdict(row.met))
    console.print(table)
    runs = Table(title="Targets: every run", title_justify="left")
    for column in ("system", "pool", "events", "ready (s)", "start to issued (s)",
                   "events/s", "CPU ms/event", "RSS (MB)", "PSS (MB)", "processes"):
        runs.add_column(column, justify="left" if column in ("system", "pool") else "right")
    for r in t.runs:
        runs.add_row(r.system, f"{r.pool} x {r.concurrency}", f"{r.events:,}",
                     _fmt(r.ready_s, 2), _fmt(r.duration_s, 2), _fmt(r.events_per_s),
                     _fmt(r.cpu_ms_per_event, 2), _fmt(r.rss_mb, 0), _fmt(r.pss_mb, 0),
                     str(r.processes))
    console.print(runs)
    outside = Table(title="Targets: every run from outside (the sandbox's log of its answers, "
                          "timed from the same spawn)", title_justify="left")
    for column in ("system", "pool", "events/s (own records)", "issued (sandbox)",
                   "start to last answer (s)", "events/s (sandbox)",
                   "kernel's start after the spawn (s)"):
        outside.add_column(column, justify="left" if column in ("system", "pool") else "right")
    for r in t.runs:
        outside.add_row(r.system, f"{r.pool} x {r.concurrency}", _fmt(r.events_per_s),
                        f"{r.outside_events:,}", _fmt(r.outside_duration_s, 2),
                        _fmt(r.outside_events_per_s), _fmt(r.command_started_s, 3))
    console.print(outside)


def render(console: Console, report: BenchReport) -> None:
    render_machine(console, report)
    if report.sandbox_ceiling is not None:
        render_ceiling(console, report.sandbox_ceiling)
    if report.round_trips:
        render_round_trips(console, report.round_trips)
    if report.comparison is not None:
        render_comparison(console, report.comparison)
    if report.scale:
        render_scale(console, report.scale, report.scale[0].latency_ms)
    if report.quota is not None:
        render_quota(console, report.quota)
    if report.memory is not None:
        render_memory(console, report.memory)
    if report.targets is not None:
        render_targets(console, report.targets)


def report_json(report: BenchReport) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(asdict(report)), indent=2, default=str)
