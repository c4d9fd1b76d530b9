"""``coupon-worker bench --short``: the benchmark runs end to end against the real services.

No timing is judged (on a shared CI machine it says nothing about the code), but the figures
must agree with each other: every event completed, rates and ratios computed from the counts
and rates printed beside them, percentiles in order. One short run, in a process of its own (the
bench's Celery apps must not register their tasks in this one), is checked two ways: as the
tables the command prints and as its ``--json`` report. It uses a database and a vhost of its
own (``--namespace``) and removes them, so it can run beside the suite or another bench.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import PG_ADMIN_URL, RABBIT_HOST, REPO_ROOT

# One test process runs both tests, so that they share the one run (SHARED_PROCESS in
# tests/conftest.py).
pytestmark = pytest.mark.slow

BENCH_TIMEOUT_S = 180
SEPARATOR = "-- the same report as --json --"
# What `coupon-worker bench --short` and `--short --json` print, from one run.
ONE_RUN_TWO_OUTPUTS = f"""
import sys
from pathlib import Path

from rich.console import Console

from coupon_devtools.bench.defaults import CONSOLE_WIDTH
from coupon_devtools.bench.render import render, report_json
from coupon_devtools.bench.scenarios import BenchOptions
from coupon_devtools.bench.suite import run_bench

report = run_bench(BenchOptions(short=True, workdir=Path(sys.argv[1]), namespace=sys.argv[2]),
                   lambda message: print(message, file=sys.stderr))
render(Console(width=CONSOLE_WIDTH), report)
print({SEPARATOR!r})
print(report_json(report))
"""


@dataclass(frozen=True)
class ShortBench:
    printed: str
    report: dict[str, Any]


@pytest.fixture(scope="module")
def short_bench(tmp_path_factory: pytest.TempPathFactory) -> ShortBench:
    """What ``coupon-worker bench --short`` prints, and its ``--json`` report, of one run."""
    # Given the local PostgreSQL and RabbitMQ (the bench starts its own sandbox and workers)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "COUPONS_DATABASE_URL": PG_ADMIN_URL,
                "COUPONS_BROKER_URL": f"amqp://guest:guest@{RABBIT_HOST}//"})
    # When the CI smoke mode runs
    done = subprocess.run(
        [sys.executable, "-c", ONE_RUN_TWO_OUTPUTS, str(tmp_path_factory.mktemp("bench")),
         f"t{uuid.uuid4().hex[:8]}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
        check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed, _, as_json = done.stdout.partition(SEPARATOR)
    return ShortBench(printed, json.loads(as_json))


def test_short_bench_prints_ours_the_baseline_and_their_ratio(short_bench: ShortBench) -> None:
    # Then it prints every table, the baseline and the ratio among them
    out = short_bench.printed
    for heading in ("Machine", "The sandbox's own ceiling", "Database work per issued event",
                    "Throughput and latency: coupon-worker vs baseline", "baseline",
                    "ratio ours / baseline", "events/s (backlog)", "API calls/s",
                    "latency p50", "latency p99", "worker RSS before -> after", "429s",
                    "Where an event's time goes in coupon-worker"):
        assert heading in out, f"{heading!r} missing from:\n{out}"
    # And the comparison's figures agree with each other
    events = row(out, "events")
    assert events[0] == events[1] and number(events[0]) > 0, events
    for figure in ("events/s (backlog)", "API calls/s"):
        ours, base, ratio = row(out, figure)
        assert number(ratio.removesuffix("x")) == pytest.approx(number(ours) / number(base),
                                                                abs=0.0051), (figure, ratio)
    for system in (0, 1):
        paced = [number(row(out, f"latency {p}, paced")[system]) for p in ("p50", "p95", "p99")]
        backlog = row(out, "latency p50 / p99 in the backlog")[system].split(" / ")
        assert paced == sorted(paced) and number(backlog[0]) <= number(backlog[1])


def test_short_bench_as_json_has_both_systems_and_the_ratio(short_bench: ShortBench) -> None:
    report = short_bench.report
    comparison = report["comparison"]
    assert {"ours", "baseline", "throughput_ratio"} <= set(comparison)
    for system in ("ours", "baseline"):
        run = comparison[system]
        assert run["completed"] == run["events"] > 0
        assert run["calls"] >= run["completed"], "every event made its call"
        assert 0 <= run["status_429"] <= run["calls"]
        # Rates are the counts over the backlog's duration (both rounded as printed)
        assert consistent(run["events_per_s"], run["completed"], run["duration_s"])
        assert consistent(run["calls_per_s"], run["calls"], run["duration_s"])
        for percentiles in (run["paced_latency"], run["backlog_latency"]):
            assert ordered(percentiles), percentiles
        assert run["rss_after"]["rss_kb"] > 0
    ours, base = comparison["ours"], comparison["baseline"]
    assert comparison["throughput_ratio"] == pytest.approx(
        ours["events_per_s"] / base["events_per_s"], abs=0.0006)
    assert comparison["latency_ratio_p50"] == pytest.approx(
        ours["paced_latency"]["p50_ms"] / base["paced_latency"]["p50_ms"], abs=0.0051)
    assert report["round_trips"] and report["sandbox_ceiling"]["calls"] > 0
    assert report["machine"]["cpus"] >= 1


def row(out: str, label: str) -> list[str]:
    """The value cells of the comparison table's row whose figure starts with ``label``."""
    table = out[out.index("Throughput and latency: coupon-worker vs baseline"):]
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and (cells[0] == label or cells[0].startswith(label + " ")):
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def consistent(rate: float, count: int, duration_s: float) -> bool:
    """``rate`` (rounded to 0.1) is ``count / duration_s`` (``duration_s`` rounded to 0.01)."""
    low, high = count / (duration_s + 0.005), count / max(duration_s - 0.005, 1e-6)
    return low - 0.05 - 1e-9 <= rate <= high + 0.05 + 1e-9


def ordered(p: dict[str, Any]) -> bool:
    values = [p[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
    return all(not math.isnan(v) for v in values) and values == sorted(values)
