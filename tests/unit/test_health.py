"""Heartbeat files and the health verdict: fresh and running is healthy, anything else is not."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.health import (
    HealthReport,
    Heartbeat,
    check_health,
    heartbeat_path,
    process_exists,
    read_heartbeats,
    remove_heartbeat,
    write_heartbeat,
)

HOST = "host-a"
NOW = 1_800_000_000.0


def beat(node: str, pid: int, age_s: float, *, host: str = HOST,
         interval_s: float = 5.0) -> Heartbeat:
    return Heartbeat(node=node, pid=pid, host=host, interval_s=interval_s,
                     beat_at=NOW - age_s, started_at=NOW - 600)


def check(directory: Path, running: set[int], *, node: str | None = None,
          pid: int | None = None, max_age_s: float | None = None) -> HealthReport:
    return check_health(directory, node=node, pid=pid, max_age_s=max_age_s, clock=lambda: NOW,
                        host=HOST, exists=lambda found: found in running)


def test_a_heartbeat_is_replaced_whole_and_read_back(tmp_path: Path) -> None:
    first = beat("coupon-worker-1@host-a", 1, 10)
    path = write_heartbeat(tmp_path / "beats", first)
    second = beat("coupon-worker-1@host-a", 1, 0)
    assert write_heartbeat(tmp_path / "beats", second) == path
    assert read_heartbeats(tmp_path / "beats") == [second]
    assert [p.name for p in (tmp_path / "beats").iterdir()] == [path.name], "no scratch files"
    remove_heartbeat(tmp_path / "beats", second.node)
    remove_heartbeat(tmp_path / "beats", second.node)  # twice is fine
    assert read_heartbeats(tmp_path / "beats") == []


def test_the_metrics_port_travels_with_the_beat_and_older_beats_have_none(
    tmp_path: Path,
) -> None:
    with_port = Heartbeat(node="a@host-a", pid=1, host=HOST, interval_s=5.0, beat_at=NOW,
                          started_at=NOW - 600, metrics_port=9809)
    write_heartbeat(tmp_path, with_port)
    # A beat written before the port was recorded (a worker of an earlier release)
    (tmp_path / "old.json").write_text(json.dumps({
        "node": "b@host-a", "pid": 2, "host": HOST, "interval_s": 5.0, "beat_at": NOW,
        "started_at": NOW - 600}))
    report = check(tmp_path, {1, 2})
    assert {w.node: w.metrics_port for w in report.workers} == {"a@host-a": 9809,
                                                                "b@host-a": None}
    described = [w.describe() for w in report.workers]
    assert described[0].endswith("metrics on port 9809") and "metrics" not in described[1]


def test_unreadable_files_are_skipped(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("good@host-a", 1, 0))
    (tmp_path / "half.json").write_text('{"node": "x", "pid"')
    (tmp_path / "other.json").write_text(json.dumps({"node": "y"}))
    assert [b.node for b in read_heartbeats(tmp_path)] == ["good@host-a"]


def test_node_names_become_safe_file_names(tmp_path: Path) -> None:
    assert heartbeat_path(tmp_path, "../evil/name@h").parent == tmp_path


def test_healthy_while_every_running_worker_beats(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("a@host-a", 11, 1))
    write_heartbeat(tmp_path, beat("b@host-a", 12, 14))
    report = check(tmp_path, {11, 12})
    assert report.healthy
    assert report.reason == "2 worker(s) consuming"


def test_a_silent_consumer_in_a_running_process_is_unhealthy(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("a@host-a", 11, 1))
    write_heartbeat(tmp_path, beat("b@host-a", 12, 16))  # 3 intervals of 5 s
    report = check(tmp_path, {11, 12})
    assert not report.healthy
    assert report.reason == "1 of 2 worker(s) not consuming"
    statuses = {w.node: w.status for w in report.workers}
    assert statuses == {"a@host-a": "healthy", "b@host-a": "stale"}


def test_max_age_overrides_the_workers_interval(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("a@host-a", 11, 4))
    assert check(tmp_path, {11}).healthy
    assert not check(tmp_path, {11}, max_age_s=3).healthy


def test_workers_that_are_gone_are_ignored_unless_asked_for(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("old@host-a", 10, 3600))
    write_heartbeat(tmp_path, beat("new@host-a", 11, 1))
    assert check(tmp_path, {11}).healthy
    named = check(tmp_path, {11}, node="old@host-a")
    assert not named.healthy
    assert [w.status for w in named.workers] == ["gone"]
    assert not check(tmp_path, set()).healthy
    assert check(tmp_path, set()).reason.startswith("no running worker on this host")


def test_selection_by_node_or_pid(tmp_path: Path) -> None:
    write_heartbeat(tmp_path, beat("a@host-a", 11, 1))
    write_heartbeat(tmp_path, beat("b@host-a", 12, 60))
    assert check(tmp_path, {11, 12}, node="a@host-a").healthy
    assert check(tmp_path, {11, 12}, pid=11).healthy
    assert not check(tmp_path, {11, 12}, pid=12).healthy
    missing = check(tmp_path, {11, 12}, node="c@host-a")
    assert not missing.healthy
    assert missing.reason.startswith("no heartbeat from node c@host-a")


def test_other_hosts_heartbeats_are_not_judged_here(tmp_path: Path) -> None:
    # A directory shared between hosts: their process ids mean nothing here.
    write_heartbeat(tmp_path, beat("a@host-b", 11, 1, host="host-b"))
    assert not check(tmp_path, {11}).healthy


def test_no_directory_at_all_is_unhealthy_not_an_error(tmp_path: Path) -> None:
    report = check(tmp_path / "never-created", set())
    assert not report.healthy
    assert report.as_dict()["workers"] == []


def test_process_exists() -> None:
    assert process_exists(os.getpid())
    child = subprocess.Popen(["true"])
    # An exited child that was not reaped yet is a zombie: not a running worker.
    assert _eventually(lambda: not process_exists(child.pid))
    child.wait()
    assert not process_exists(child.pid)


def _eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("age_s", [0.0, 14.9])
def test_json_report_shape(tmp_path: Path, age_s: float) -> None:
    write_heartbeat(tmp_path, beat("a@host-a", 11, age_s))
    data = check(tmp_path, {11}).as_dict()
    assert data == {"healthy": True, "reason": "1 worker(s) consuming",
                    "workers": [{"node": "a@host-a", "pid": 11, "status": "healthy",
                                 "age_s": age_s, "max_age_s": 15.0, "metrics_port": None}]}
