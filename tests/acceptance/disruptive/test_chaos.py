"""`coupon-worker chaos --short`, the CI profile, as a real subprocess.

It restarts a real RabbitMQ node and PostgreSQL cluster, this session's own (as test_restarts
does): ``RABBITMQ_NODENAME`` points its ``rabbitmqctl`` at the node, and the database URL's port
names the cluster. The run itself waits until both answer again before it returns, which this
test checks too.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.rabbitmqctl import delete_vhost
from tests.acceptance.disruptive.conftest import PrivateServices
from tests.conftest import REPO_ROOT, coupon_worker_command

pytestmark = [pytest.mark.slow, pytest.mark.disruptive]


@pytest.fixture
def namespace(private_services: PrivateServices) -> Iterator[str]:
    """A namespace for one run; its database and vhost are gone afterwards, whatever
    happened."""
    tag = uuid.uuid4().hex[:8]
    yield tag
    drop_database(private_services.postgres.admin_url, f"coupon_worker_chaos_{tag}")
    delete_vhost(f"coupon-worker-chaos-{tag}", wait_while_node_down=True,
                 node=private_services.rabbit.node)


def number_after(label: str, output: str) -> int:
    match = re.search(rf"│ {label}\s+│\s+(\d+)", output)
    assert match, f"no {label!r} in the table:\n{output}"
    return int(match.group(1))


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_short_chaos_run_issues_exactly_once_and_leaves_everything_up(
    tmp_path: Path, namespace: str, private_services: PrivateServices, pool: str,
) -> None:
    postgres, rabbit = private_services.postgres, private_services.rabbit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "COUPONS_DATABASE_URL": postgres.admin_url,
                "COUPONS_BROKER_URL": rabbit.url("/"), "RABBITMQ_NODENAME": rabbit.node})
    # When the CI profile runs (wide enough a terminal for the table to keep one line a row)
    done = subprocess.run(
        [coupon_worker_command(), "chaos", "--short", "--workdir", str(tmp_path / "chaos"),
         "--namespace", namespace, "--pool", pool],
        cwd=REPO_ROOT, env={**env, "COLUMNS": "160"}, capture_output=True, text=True,
        timeout=240, check=False)
    output = done.stdout
    # Then every disruption happened, in the timeline
    command = "`coupon-worker worker`" if pool == "prefork" else "`coupon-worker worker -P threads`"
    for happened in ("mid-call", f"died from our SIGKILL; restarted with {command}",
                     "RabbitMQ started again", "restarted (fast shutdown", "API back",
                     "closed every broker connection"):
        assert happened in output, f"{happened!r} not in:\n{output}\n{done.stderr}"
    # And every entity was issued exactly once, with every worker alive at the end
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    assert "chaos: PASSED - 0 missing, 0 issued twice, 3/3 workers alive" in output
    assert number_after("entities", output) == 600
    assert number_after("issued", output) == 600
    assert number_after("missing", output) == 0
    assert number_after("issued twice", output) == 0
    assert number_after("workers restarted", output) >= 1
    # And the services answer again, and nothing of the run is left running
    assert postgres.ready()
    rabbit.ctl("await_startup")
    pids = [int(p) for listed in re.findall(r"\(pids? ([\d, ]+)", output)
            for p in listed.split(",") if p.strip()]
    assert len(pids) >= 5, f"the sandbox's, 3 workers' and a restarted one's pids:\n{output}"
    for pid in pids:
        left = subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True,
                              check=False)
        assert not left.stdout.strip(), f"session {pid} still has {left.stdout.split()}"
