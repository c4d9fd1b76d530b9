"""`coupon-worker demo` as a newcomer runs it: a real subprocess, on either kind of backend.

Each run gets a work folder and a namespace of its own (database ``coupon_worker_demo_<ns>``,
vhost ``coupon-worker-demo-<ns>``), so it neither collides with a developer's ``make demo`` nor
with another test session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.processes import free_port
from coupon_devtools.harness.rabbitmqctl import delete_vhost
from tests.conftest import PG_ADMIN_URL, REPO_ROOT

pytestmark = pytest.mark.slow

EVENTS = 40
# 40 events x 2 series, less 1 expired series and the 2 series of 1 unknown customer.
EXPECTED_COUPONS = 77
EXPECTED_DUPLICATES = 4


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace for one run; its database and vhost are removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    yield tag
    drop_database(PG_ADMIN_URL, f"coupon_worker_demo_{tag}")
    delete_vhost(f"coupon-worker-demo-{tag}")


def run_demo(workdir: Path, backend: str, namespace: str,
             **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env["COUPONS_ENV_FILE"] = ""
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "coupon_devtools.demo", "--events", str(EVENTS), "--no-flower",
         "--timeout", "60", "--backend", backend, "--workdir", str(workdir),
         "--namespace", namespace],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=150, check=False,
    )


def number_after(label: str, output: str) -> int:
    match = re.search(rf"{label}\D+(\d+)", output)
    assert match, f"no {label!r} in the summary:\n{output}"
    return int(match.group(1))


def assert_succeeded(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    assert "exactly once: OK" in output
    assert number_after("coupons issued", output) == EXPECTED_COUPONS
    assert number_after("duplicates suppressed", output) == EXPECTED_DUPLICATES
    assert number_after("reconciled", output) >= 2
    assert "712 series expired" in output
    assert "701 customer not found" in output
    assert number_after("rejected messages", output) == 3
    assert re.search(r"support console  http://127\.0\.0\.1:\d+  log in as demo / \S+", output)
    return output


def assert_nothing_left_running(output: str, workdir: Path) -> None:
    pids = [int(p) for p in re.findall(r"\(pid (\d+),", output)]
    assert len(pids) == 3, f"expected the sandbox's, the worker's and the console's pids:\n{output}"
    for pid in pids:
        # Each was started in a session of its own: nothing may be left in it (pool children).
        left = subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True,
                              check=False)
        assert not left.stdout.strip(), f"session {pid} still has {left.stdout.split()}"
    mentioning = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True,
                                check=False)
    assert not mentioning.stdout.strip(), f"still running:\n{mentioning.stdout}"


def test_demo_on_the_local_services(tmp_path: Path, namespace: str) -> None:
    # Given the machine's PostgreSQL and RabbitMQ
    workdir = tmp_path / "demo"
    # When the demo runs on them
    done = run_demo(workdir, "local", namespace)
    # Then it says so, drains with every coupon issued exactly once, and leaves nothing running
    output = assert_succeeded(done)
    assert "PostgreSQL  local server at 127.0.0.1:5432" in output
    assert f"database coupon_worker_demo_{namespace}" in output
    assert f"broker      RabbitMQ at 127.0.0.1:5672, vhost coupon-worker-demo-{namespace}" \
        in output
    assert_nothing_left_running(output, workdir)


def test_demo_without_services_falls_back_to_embedded_ones(tmp_path: Path,
                                                            namespace: str) -> None:
    # Given PostgreSQL and RabbitMQ that do not answer (closed ports stand in for stopped
    # services, so the machine's own stay up for the other tests)
    workdir = tmp_path / "demo"
    closed = free_port()
    # When the demo runs on its default, auto
    done = run_demo(workdir, "auto", namespace,
                    COUPONS_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{closed}/x",
                    COUPONS_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{closed}//")
    # Then an embedded PostgreSQL and the file broker carry the same pipeline to the same end
    output = assert_succeeded(done)
    assert "PostgreSQL  embedded PostgreSQL (pgserver)" in output
    assert f"no PostgreSQL answered at 127.0.0.1:{closed}" in output
    assert "broker      kombu file-based transport" in output
    assert f"no RabbitMQ answered at 127.0.0.1:{closed}" in output
    assert (workdir / "broker" / "messages").is_dir()
    # And the embedded server was stopped with the rest
    assert not (workdir / "pg" / "postmaster.pid").exists()
    assert_nothing_left_running(output, workdir)


def test_the_exactly_once_check_names_each_kind_of_discrepancy() -> None:
    from coupon_devtools.demo.summary import exactly_once_problems

    def issued(code: str, customer: str, series: int) -> dict[str, object]:
        return {"code": code, "customerId": customer, "seriesId": series}

    # Given the sandbox issued A and B to customer 1, C to customer 2, D twice to customer 3
    sandbox = [issued("A", "1", 10), issued("B", "1", 11), issued("C", "2", 10),
               issued("D1", "3", 10), issued("D2", "3", 10)]
    # And our ledger has A, C under the wrong series, D1 and D2, and a coupon E nobody issued,
    # while customer 1's series 11 is still being retried
    ours = [("id:1", 10, "A"), ("id:2", 11, "C"), ("id:3", 10, "D1"), ("id:3", 10, "D2"),
            ("id:4", 10, "E")]
    # When they are compared
    problems, pending = exactly_once_problems(ours, sandbox, sandbox, {("id:1", 11)})
    # Then B is pending, not lost, and every real discrepancy is named
    assert pending == 1
    assert len(problems) == 3
    assert "coupon C is recorded for ('id:2', 11), issued for ('id:2', 10)" in problems
    assert "coupon E is in our ledger but the sandbox never issued it" in problems
    assert "customer 3 got 2 coupons of series 10" in problems
    # And a coupon missing for an entity at rest is a loss
    problems, pending = exactly_once_problems(ours[1:], sandbox, sandbox, set())
    assert any(p.startswith("coupon A (customer 1, series 10) was issued but is not") for p in
               problems)
    assert pending == 0
