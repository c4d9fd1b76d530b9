"""``coupon-worker bench --short``: the benchmark runs end to end against the real services.

Only the shape of the output is checked, never a figure: timings on a shared CI machine say
nothing about the code. Each run uses a database and a vhost of its own (``--namespace``) and
removes them, so it can run beside the rest of the suite or another bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import PG_ADMIN_URL, RABBIT_HOST, REPO_ROOT

BENCH_TIMEOUT_S = 180


def run_bench(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "COUPONS_DATABASE_URL": PG_ADMIN_URL,
                "COUPONS_BROKER_URL": f"amqp://guest:guest@{RABBIT_HOST}//"})
    return subprocess.run(
        [sys.executable, "-m", "coupon_devtools.bench", "--short", "--workdir", str(workdir),
         "--namespace", f"t{uuid.uuid4().hex[:8]}", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
        check=False,
    )


def test_short_bench_prints_ours_the_baseline_and_their_ratio(tmp_path: Path) -> None:
    # Given the local PostgreSQL and RabbitMQ (the bench starts its own sandbox and workers)
    # When the CI smoke mode runs
    done = run_bench(tmp_path)
    # Then it succeeds and prints every table, the baseline and the ratio among them
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for heading in ("Machine", "The sandbox's own ceiling", "Database work per issued event",
                    "Throughput and latency: coupon-worker vs baseline", "baseline",
                    "ratio ours / baseline", "events/s (backlog)", "API calls/s",
                    "latency p50", "latency p99", "worker RSS before -> after", "429s",
                    "Where an event's time goes in coupon-worker"):
        assert heading in out, f"{heading!r} missing from:\n{out}"
    # And it stopped every process it started
    assert "bench failed" not in done.stderr


def test_short_bench_as_json_has_both_systems_and_the_ratio(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    comparison = report["comparison"]
    assert {"ours", "baseline", "throughput_ratio"} <= set(comparison)
    for system in ("ours", "baseline"):
        run = comparison[system]
        assert run["completed"] == run["events"]
        assert {"events_per_s", "calls_per_s", "paced_latency", "rss_before",
                "rss_after", "status_429"} <= set(run)
    assert report["round_trips"] and report["sandbox_ceiling"]["calls"] > 0
    assert report["machine"]["cpus"] >= 1
