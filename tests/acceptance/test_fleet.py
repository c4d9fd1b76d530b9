"""A fleet on one host: workers started with no flags coexist, a worker whose consumer is gone
for good exits non-zero, and `coupon-worker health` tells a consuming worker from a process
that merely exists."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu import Connection, Queue
from sqlalchemy import Engine

from coupon_devtools.bench.machine import process_table
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    publish,
    queue_consumers,
    wait_for_every_delivery,
    wait_for_state,
    workers_that_claimed,
)
from tests.conftest import (
    RABBIT_HOST,
    REPO_ROOT,
    WorkerProcess,
    coupon_worker_command,
    settings_env,
    wait_until,
)
from worker.config import Settings
from worker.health import check_health

NODE = re.compile(r"(coupon-worker-(\d+)@\S+) ready\.")


def _node_of(worker: WorkerProcess) -> tuple[str, int]:
    found = NODE.search(worker.log())
    assert found, f"no default node name in the log:\n{worker.log()[-3000:]}"
    return found.group(1), int(found.group(2))


def _free_port_pair() -> int:
    """A port that is free, and the one after it too."""
    for _attempt in range(50):
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))  # noqa: S104 - where the worker binds its metrics
            port = int(probe.getsockname()[1])
        if port < 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("0.0.0.0", port + 1))  # noqa: S104
                except OSError:
                    continue
            return port
    raise AssertionError("no two free ports in a row")


def test_workers_started_with_no_flags_share_a_host_and_all_consume(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given two workers started the way an operator would, twice on one host, no -n, the
    # same metrics port in both settings
    settings = settings_factory(metrics_port=_free_port_pair())
    first = start_worker(settings, concurrency=1, node_name=None)
    second = start_worker(settings, concurrency=1, node_name=None)
    # Then each has its own node name and both are up and consuming the task queue
    (node_a, pid_a), (node_b, pid_b) = _node_of(first), _node_of(second)
    assert node_a != node_b
    assert (pid_a, pid_b) == (first.process.pid, second.process.pid)
    wait_until(lambda: queue_consumers(settings, settings.tasks_queue) == 2,
               message="two consumers on the task queue")
    # And each serves its metrics, the second on the next port, which its heartbeat tells
    def ports() -> dict[int, int | None]:
        report = check_health(Path(settings.heartbeat_dir))
        return {w.pid: w.metrics_port for w in report.workers}

    wait_until(lambda: None not in ports().values() and len(ports()) == 2,
               message="both workers' heartbeats to name their metrics port")
    assert ports() == {pid_a: settings.metrics_port, pid_b: settings.metrics_port + 1}
    for port in ports().values():
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "coupon_worker_build_info" in scraped.text
    # And both issue: a slow Capillary keeps one worker busy while the other takes the next
    sandbox.configure(latency_seconds=0.2)
    events = [example_event(f"fleet-{n}", series=(544770,), customer=str(566_000_000 + n))
              for n in range(12)]
    publish(settings, *events)
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    wait_for_every_delivery(settings)
    # Claims are made by the pool's children: each worker's child claimed some.
    assert workers_that_claimed(clean_ledger, [pid_a, pid_b]) == {pid_a, pid_b}
    assert len(sandbox.ledger()) == 12
    for worker in (first, second):
        assert worker.process.poll() is None
        assert "RESOURCE_LOCKED" not in worker.log()


def test_a_worker_whose_node_name_is_taken_exits_non_zero(
    settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given another connection holding the exclusive control queue of the name we ask for
    node = f"taken-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    with Connection(settings.broker_url) as holder:
        Queue(f"{node}.celery.pidbox", exclusive=True, auto_delete=True)(
            holder.default_channel).declare()
        # When a worker starts with that name
        worker = start_worker(settings, node_name=node, wait_ready=False)
        # Then its consumer cannot start, and the process ends with a failure exit code
        code = worker.process.wait(timeout=60)
    assert code != 0, worker.log()[-3000:]
    assert "RESOURCE_LOCKED" in worker.log()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped by the process it was handed to."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_pool_processes_of_a_worker_killed_with_sigkill_die_with_it(
    settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a prefork worker with its two pool processes
    worker = start_worker(settings, concurrency=2)
    children = wait_until(
        lambda: {pid for pid, (ppid, _name, _cpu) in process_table().items()
                 if ppid == worker.process.pid}, message="its pool processes")
    # When only its main process is killed with SIGKILL (as the OOM killer would)
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    # Then the kernel ends the pool processes too (their parent-death signal): none is left
    # running a task no main process acknowledges, or holding a claim nobody renews
    wait_until(lambda: not any(_running(pid) for pid in children), timeout_s=10,
               message="the pool processes gone")


@pytest.fixture
def own_vhost() -> Iterator[str]:
    vhost = f"cw-test-gone-{uuid.uuid4().hex[:8]}"
    create_vhost(vhost, wait_while_node_down=True)
    yield vhost
    delete_vhost(vhost, wait_while_node_down=True)  # the test may have deleted it


def test_a_worker_whose_broker_is_gone_for_good_exits_non_zero(
    settings_factory: Callable[..., Settings], own_vhost: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(broker_url=f"amqp://guest:guest@{RABBIT_HOST}/{own_vhost}")
    worker = start_worker(settings)
    # When its vhost is deleted: the connection is closed and every reconnect is refused
    delete_vhost(own_vhost, wait_while_node_down=True)
    # Then the worker does not stay up reconnecting forever: it exits, with a failure code
    code = worker.process.wait(timeout=60)
    assert code != 0, worker.log()[-3000:]
    assert "consumer.unrecoverable" in worker.log()


# -- health --------------------------------------------------------------------------------


def _health(settings: Settings, *args: str) -> tuple[int, str]:
    result = subprocess.run([coupon_worker_command(), "health", *args], cwd=REPO_ROOT,
                            env=settings_env(settings), capture_output=True, text=True,
                            timeout=30, check=False)
    return result.returncode, result.stdout


def _healthy(settings: Settings) -> bool:
    """What ``coupon-worker health`` will say, read in this process: a test waits on this, then
    asks the command once (a command per poll would cost a process start each tenth of a
    second)."""
    return check_health(Path(settings.heartbeat_dir)).healthy


def test_health_reports_consumer_liveness(
    settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:
    # Before any worker: unhealthy
    code, out = _health(settings)
    assert code == 1 and out.startswith("unhealthy: no running worker"), out
    # While a worker consumes: healthy, by itself or by node name, in words and in JSON
    worker = start_worker(settings, node_name=None)
    node, pid = _node_of(worker)
    wait_until(lambda: _healthy(settings), message="health to pass")
    code, out = _health(settings, "--node", node)
    assert code == 0 and out.startswith("healthy: 1 worker(s) consuming"), out
    assert f"{node} (pid {pid}): consuming" in out
    code, out = _health(settings, "--pid", str(pid), "--json")
    report: dict[str, Any] = json.loads(out)
    assert code == 0 and report["healthy"] is True
    assert [(w["node"], w["status"]) for w in report["workers"]] == [(node, "healthy")]
    # When the consumer stops while the process stays (its event loop frozen): unhealthy
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not _healthy(settings), timeout_s=15,
                   message="health to fail while the consumer is stopped")
        code, out = _health(settings, "--node", node, "--json")
        assert code == 1
        assert json.loads(out)["workers"][0]["status"] == "stale"
        assert worker.process.poll() is None, "the process is still there"
    finally:
        os.kill(pid, signal.SIGCONT)
    # And healthy again once it consumes again
    wait_until(lambda: _healthy(settings), message="health to recover")
    assert _health(settings)[0] == 0
    # When the process is killed: unhealthy, and the named worker is reported gone
    worker.kill()
    code, out = _health(settings)
    assert code == 1 and "no running worker" in out, out
    code, out = _health(settings, "--node", node, "--json")
    assert code == 1 and json.loads(out)["workers"][0]["status"] == "gone"
