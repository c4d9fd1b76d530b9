"""``coupon-worker bench --scenario targets --short --json``: the targets table's figures, cold
runs timed from the worker command's start, agree with each other.

No figure is judged (a shared machine says nothing about the code): every run issues its whole
backlog, its rate is its events over the time from the command's start, start-up included, and
each row's ratio is the rounds' ratios of the runs it compares. Every run is also measured from
outside, from the sandbox's log of its answers, and the agreement rows compare the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, RABBIT_HOST, REPO_ROOT, coupon_worker_command

pytestmark = pytest.mark.slow


def test_the_targets_table_has_one_verdict_per_row_from_cold_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "COUPONS_DATABASE_URL": PG_ADMIN_URL,
                "COUPONS_BROKER_URL": f"amqp://guest:guest@{RABBIT_HOST}//"})
    # When the targets scenario runs in its smoke mode
    done = subprocess.run(
        [coupon_worker_command(), "bench", "--scenario", "targets", "--short", "--json",
         "--workdir", str(tmp_path), "--namespace", f"t{uuid.uuid4().hex[:8]}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    targets = report["targets"]
    # Then the machine it ran on, and how busy it already was, come with the figures
    machine = report["machine"]
    assert machine["cpus"] > 0 and machine["cpu_model"] and machine["memory_gb"] > 0
    assert len(machine["load_average"]) == 3 and machine["background_busy_pct"] >= 0
    # Then every run is cold and issued its whole backlog: ready before it was done, and its
    # rate counted from the command's start
    runs = targets["runs"]
    assert {(r["system"], r["pool"]) for r in runs} == {
        ("coupon-worker", "threads"), ("baseline", "threads"), ("coupon-worker", "prefork"),
        ("baseline", "prefork")}
    for run in runs:
        assert 0 < run["ready_s"] < run["duration_s"], run
        assert run["events_per_s"] == pytest.approx(run["events"] / run["duration_s"],
                                                    abs=0.06), run
        assert run["cpu_s"] > 0 and run["rss_mb"] > 0 and run["pss_mb"] > 0
        # measured from outside too: the sandbox answered the whole backlog, timed from the
        # same spawn, and the kernel started the command when the bench says it spawned it
        assert run["outside_events"] == run["events"], run
        assert 0 < run["ready_s"] < run["outside_duration_s"], run
        assert run["outside_events_per_s"] > 0
        assert run["outside_events_per_s"] == pytest.approx(
            run["events"] / run["outside_duration_s"], abs=0.06), run
        assert run["command_started_s"] is not None
        assert -0.05 < run["command_started_s"] < run["ready_s"], run
    # And there is one verdict per row: the six targets of the threads and prefork pools, and
    # the agreement of each pool's throughput ratio with the outside measurement
    rows = targets["rows"]
    assert len(rows) == 8 and all(isinstance(r["met"], bool) for r in rows)
    assert [r["figure"].split(":")[0] for r in rows] == [
        "300 ms, threads x 8"] * 3 + ["50 ms, prefork x 8"] * 3 + [
        "300 ms, threads x 8", "50 ms, prefork x 8"]
    # (one round: ours and the bare task on threads, ours on prefork x 8 at 300 ms, then ours
    # and the bare task on prefork at 50 ms)
    assert [(r["system"], r["pool"]) for r in runs] == [
        ("coupon-worker", "threads"), ("baseline", "threads"), ("coupon-worker", "prefork"),
        ("coupon-worker", "prefork"), ("baseline", "prefork")]
    for agreement, throughput, (ours_run, bare_run) in ((rows[6], rows[1], runs[0:2]),
                                                        (rows[7], rows[3], runs[3:5])):
        assert "agreement with an outside measurement" in agreement["figure"]
        # ours is the throughput row's ratio, the other the same ratio from the sandbox's log
        assert agreement["ours"] == throughput["ratio"]
        assert agreement["other"]["median"] == pytest.approx(
            ours_run["outside_events_per_s"] / bare_run["outside_events_per_s"], abs=0.001)
        difference = agreement["difference"]["median"]
        assert difference == pytest.approx(
            agreement["ours"]["median"] - agreement["other"]["median"], abs=0.002)
        assert agreement["target"] == "difference <= 0.02"
        assert agreement["met"] is (abs(difference) <= 0.02)
    # And each ratio is ours over what it is compared with (one round: no spread)
    for row in rows:
        ratio, ours, other = row["ratio"], row["ours"], row["other"]
        assert ratio["low"] == ratio["median"] == ratio["high"]
        assert ratio["median"] == pytest.approx(ours["median"] / other["median"], rel=0.01)
