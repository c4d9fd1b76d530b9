"""``coupon-worker bench``: throughput at the API's limit, measured honestly.

The bench drives the real pipeline: RabbitMQ, PostgreSQL, ``coupon-worker worker`` processes
and the sandbox Capillary server (a subprocess, with the latency and 429 limit each scenario
asks for). It builds everything it uses and removes it afterwards: a database of its own
(``coupon_worker_bench``, dropped and migrated at start), a RabbitMQ vhost of its own
(``coupon-worker-bench``), and every process it started.

Scenarios (``--scenario``):

- ``quick`` (default): ours against the baseline at the options given, beside the sandbox's
  own ceiling and the database round trips per event;
- ``overhead``: the same comparison with a verdict on the target (ours >= 0.9x the baseline's
  throughput at the same concurrency, 50 ms API latency);
- ``scale``: at 100 ms latency, throughput with 1, 2, 4, 8 and 16 concurrent tasks against the
  ideal ``concurrency / latency`` (target: >= 80 % of it, up to the rate limit);
- ``quota``: three worker processes under a 1,200 calls/minute limit, the sandbox refusing
  beyond 1,200 calls in any 60 s too (target: >= 95 % of the limit sustained, zero 429s);
- ``memory``: worker RSS with 10,000 then 100,000 events waiting on the bus, and with
  100,000 retries waiting in the ledger (inserted with SQL, due in a day), each sampled while
  one worker works (and, for the backlogs, while its bridge forwards them);
- ``targets``: the issue's targets in one table, one verdict per row, every run cold (the
  worker started onto a waiting backlog, start-up counted): at 300 ms, ``threads`` x 64 against
  the ideal c/L and the bare task on the same pool, and its PSS against ``prefork`` x 64; at
  50 ms, ``prefork`` x 8 against the bare task in throughput, CPU per event and RSS; and how
  both throughput ratios agree with the same ratios from the sandbox's log of its answers, an
  outside measurement (:mod:`coupon_devtools.bench.targets`, :mod:`coupon_devtools.bench.outside`);
- ``all``: every one of the above;
- ``ledger-size``: the ledger's statements on a seeded ledger of ``--ledger-rows`` entities
  against a nearly empty one (:mod:`coupon_devtools.bench.ledger_size`); no broker, no worker.

How each figure is measured, and why that way:

- *The baseline* is :mod:`coupon_devtools.bench.baseline`: a bare Celery task that POSTs the same
  bulk-issue body with ``requests`` and nothing else, on the same broker, with the same pool,
  concurrency, late acks and prefetch (two per pool process). Both sides get their messages
  the same way: one broker-confirmed publish per message, built before the clock starts (ours
  as plain JSON on the events bus, the real way in; or as ``coupons.issue`` tasks with
  ``--via task``).
- *Throughput* (events/s): a backlog of N events is published onto idle, warmed-up workers
  (every pool process has run a few events first); throughput is N divided by the time from the
  first publish to the last completion. ``overhead`` measures three rounds (``--rounds``), the
  two sides taking turns at going first, and judges the median round's ratio: one round's
  ratio moves by a few hundredths with how fast the shared machine is that minute.
  *Completion* for ours is the ledger's record of the outcome: ``events.updated_at``, the
  timestamp the worker writes in the transaction that records the coupons (taken as that
  transaction starts, so its commit, a few ms, is not counted). The baseline records nothing,
  so its completion is the sandbox's call-log time of its answer, which leaves out sending the
  answer, reading it and acknowledging the message. Each side thus leaves a few milliseconds
  out at its end: noise beside a backlog's duration, but worth remembering when reading the
  latency percentiles.
- *Latency* (p50/p95/p99, publish to completion): measured on a second batch, published at a
  steady pace of half the slower system's throughput, the same pace for both, so it is the
  latency of an event under a load both can carry rather than the time an event waited behind a
  backlog (the backlog run's percentiles are printed too; they mostly restate the throughput).
  For ours the same batch is split into stages from the ledger's own timestamps: publish to
  intake (broker, bridge, pool), intake and claim (the first transaction, the rate limiter),
  the API call, and the answer up to the recording transaction.
- *API calls/s* and *429s*: from the sandbox's call log over the same window.
- *RSS*: the sum of VmRSS over the worker's main process and its pool children, from
  ``/proc`` (PSS beside it, since prefork children share pages), after warm-up and at the end.
- *CPU per event*: utime + stime from ``/proc`` over the backlog, per process and summed by
  component: the workers' main and pool processes, the sandbox, PostgreSQL (its own processes
  and the bench database's backends, not other databases'), RabbitMQ (its whole VM, shared with
  anything else using it), the bench itself; plus the whole machine's busy share from
  ``/proc/stat``. The machine's load before the run is printed too: other work skews every
  figure.
- *Database round trips per event*: one real ``services.issue_event`` at a time, in this
  process, on a ``Deps`` from :func:`worker.bootstrap.build_deps` against the bench database and
  the sandbox, with every connection traced by libpq (``PQtrace``): a round trip is a
  ``ReadyForQuery`` from the server, a transaction is a return to the idle state after work,
  a statement is an ``Execute`` (or a simple query other than BEGIN/COMMIT/ROLLBACK), and a
  ping is the pool's pre-ping. This counts what really goes over the wire, BEGIN and COMMIT
  included, which SQLAlchemy's events or ``pg_stat_database`` (flushed lazily by each backend)
  would not show exactly.
- *The sandbox's ceiling*: calls/s at zero latency from 64 concurrent aiohttp clients in this
  process, so a reader can see the stand-in server is not the bottleneck.

The pool is ``prefork`` unless ``--pool threads`` (docs/threads-pool.md); ``targets`` picks
its own pools.

Nothing here asserts a figure: targets are printed with a verdict, never enforced. ``--short``
shrinks every scenario to a few seconds for CI.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import get_args

import click
from rich.console import Console

from coupon_devtools.bench.defaults import (
    CONSOLE_WIDTH,
    DEFAULT_CONCURRENCY,
    DEFAULT_EVENTS,
    DEFAULT_LATENCY_MS,
    DEFAULT_POOL,
    DEFAULT_WORKDIR,
    LOCAL_POSTGRES_URL,
    MEMORY_SAMPLE_S,
    OVERHEAD_ROUNDS,
    QUOTA_DURATION_S,
    SCALE_LATENCY_MS,
    SERIES,
    BenchError,
    Pool,
    ScenarioName,
    Via,
)
from coupon_devtools.bench.render import render, report_json
from coupon_devtools.bench.scenarios import BenchOptions
from coupon_devtools.bench.suite import run_bench


def bench_command() -> click.Command:
    """The ``bench`` command, for ``main.add_command(bench_command())``."""

    @click.command("bench")
    @click.option("--scenario", type=click.Choice(get_args(ScenarioName)), default="quick",
                  show_default=True, help="What to measure (see the module's docstring).")
    @click.option("--events", type=click.IntRange(min=10), default=DEFAULT_EVENTS,
                  show_default=True, help="Events in each measured backlog.")
    @click.option("--latency-ms", type=click.FloatRange(min=0), default=None,
                  help=f"Sandbox latency per call [default: {DEFAULT_LATENCY_MS:g}; "
                       f"{SCALE_LATENCY_MS:g} for scale].")
    @click.option("--concurrency", type=click.IntRange(min=1), default=DEFAULT_CONCURRENCY,
                  show_default=True, help="Pool slots per worker process.")
    @click.option("--pool", type=click.Choice(get_args(Pool)), default=DEFAULT_POOL,
                  show_default=True, help="Celery pool of ours and the baseline alike.")
    @click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Worker processes (quota always uses 3).")
    @click.option("--rate-limit-per-minute", type=click.IntRange(min=1), default=None,
                  help="COUPONS_RATE_LIMIT_PER_MINUTE for our workers [quota: 1200].")
    @click.option("--rate-limit-burst", type=click.IntRange(min=1), default=None,
                  help="COUPONS_RATE_LIMIT_BURST for our workers [the worker's default].")
    @click.option("--sandbox-limit-per-minute", type=click.IntRange(min=1), default=None,
                  help="The sandbox's own 429 limit [quota: the rate limit].")
    @click.option("--via", type=click.Choice(get_args(Via)), default="bus", show_default=True,
                  help="How our events arrive: the plain-JSON bus, or coupons.issue tasks.")
    @click.option("--series-per-event", type=click.IntRange(1, len(SERIES)), default=1,
                  show_default=True, help="Coupon series per event (one bulk call each way).")
    @click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=None,
                  help=f"quota: measured seconds [{QUOTA_DURATION_S:g}]; memory: sampled "
                       f"seconds [{MEMORY_SAMPLE_S:g}].")
    @click.option("--rounds", type=click.IntRange(min=1), default=None,
                  help=f"Backlog rounds of the comparison, the two sides alternating which "
                       f"goes first; the median round's ratio is the verdict [default: "
                       f"{OVERHEAD_ROUNDS} for overhead and all, 1 for quick].")
    @click.option("--ledger-rows", type=click.IntRange(min=100), default=None,
                  help="ledger-size: entities in the seeded ledger [2,000,000].")
    @click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
                  default="INFO", show_default=True, help="Log level of every worker.")
    @click.option("--short", is_flag=True,
                  help="CI smoke mode: tiny batches, a few seconds; figures mean little.")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(DEFAULT_WORKDIR), show_default=True,
                  help="Where process logs go.")
    @click.option("--keep", is_flag=True, help="Keep the bench database and vhost afterwards.")
    @click.option("--namespace", default="", help="Suffix for the bench database and vhost "
                  "names, so that runs (e.g. tests) can go side by side.")
    def bench(scenario: ScenarioName, events: int, latency_ms: float | None, concurrency: int,
              pool: Pool, workers: int, rate_limit_per_minute: int | None,
              rate_limit_burst: int | None,
              sandbox_limit_per_minute: int | None, via: Via, series_per_event: int,
              duration_s: float | None, rounds: int | None, ledger_rows: int | None,
              log_level: str, short: bool, as_json: bool, workdir: Path, keep: bool,
              namespace: str) -> None:
        """Measure the real pipeline against a bare Celery baseline: throughput, latency,
        memory, the shared rate limit, and the database work per event."""
        if scenario == "ledger-size":
            _ledger_size(ledger_rows, rounds, as_json=as_json, keep=keep, namespace=namespace)
            return
        options = BenchOptions(
            events=events, latency_ms=latency_ms, concurrency=concurrency, pool=pool,
            workers=workers, rate_limit_per_minute=rate_limit_per_minute,
            rate_limit_burst=rate_limit_burst,
            sandbox_limit_per_minute=sandbox_limit_per_minute, scenario=scenario, short=short,
            as_json=as_json, via=via, series_per_event=series_per_event,
            duration_s=duration_s, rounds=rounds, log_level=log_level, workdir=workdir,
            keep=keep, namespace=namespace,
        )
        console = Console(width=None if sys.stdout.isatty() else CONSOLE_WIDTH)
        progress = Console(stderr=True)

        def say(message: str) -> None:
            progress.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/] {message}",
                           highlight=False)

        try:
            report = run_bench(options, say)
        except BenchError as exc:
            progress.print(f"[bold red]bench failed:[/] {exc}", highlight=False)
            sys.exit(1)
        except KeyboardInterrupt:
            progress.print("[bold red]bench interrupted[/]; everything it started is stopped")
            sys.exit(130)
        if as_json:
            click.echo(report_json(report))
        else:
            render(console, report)

    return bench


def _ledger_size(rows: int | None, rounds: int | None, *, as_json: bool, keep: bool,
                 namespace: str) -> None:
    import os

    from coupon_devtools.bench.ledger_size import (
        DEFAULT_LEDGER_ROWS,
        render_ledger_size,
        report_json,
        run_ledger_size,
    )

    progress = Console(stderr=True)

    def say(message: str) -> None:
        progress.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/] {message}",
                       highlight=False)

    try:
        report = run_ledger_size(
            rows=rows or DEFAULT_LEDGER_ROWS, rounds=rounds or OVERHEAD_ROUNDS, say=say,
            admin_url=os.environ.get("COUPONS_DATABASE_URL") or LOCAL_POSTGRES_URL,
            namespace=namespace, keep=keep)
    except KeyboardInterrupt:
        progress.print("[bold red]bench interrupted[/]")
        sys.exit(130)
    if as_json:
        click.echo(report_json(report))
    else:
        render_ledger_size(Console(width=None if sys.stdout.isatty() else CONSOLE_WIDTH), report)
