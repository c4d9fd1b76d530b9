"""`coupon-worker chaos --cluster`: a 3-node RabbitMQ cluster whose events queue's leader is
SIGKILLed mid-run and brought back, as a real subprocess.

The run starts the cluster itself (``coupon_devtools.harness.cluster``: three nodes of their
own on this host) and uses a database of its own on the machine's PostgreSQL, which it leaves
running; the machine's RabbitMQ is not touched. Exactly once and every worker consuming again
are asserted; the failover and recovery times are printed, not asserted (the run's own verdict
holds them to the recovery target).
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
from tests.conftest import PG_ADMIN_URL, REPO_ROOT, coupon_worker_command

pytestmark = [pytest.mark.slow, pytest.mark.disruptive]


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace for one run; its database is gone afterwards, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    yield tag
    drop_database(PG_ADMIN_URL, f"coupon_worker_chaos_{tag}")


def row(label: str, output: str) -> tuple[str, str]:
    match = re.search(rf"│ {label}\s+│\s+(.+?) │ (.*?)\s+│", output)
    assert match, f"no {label!r} in the table:\n{output}"
    return match.group(1), match.group(2)


def test_the_events_queue_leader_dies_and_every_entity_is_issued_exactly_once(
    tmp_path: Path, namespace: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "COUPONS_DATABASE_URL": PG_ADMIN_URL,
                "COLUMNS": "200"})
    # When the cluster profile runs: 200 events, the events queue's leader SIGKILLed mid-run
    done = subprocess.run(
        [coupon_worker_command(), "chaos", "--cluster", "--workdir", str(tmp_path / "chaos"),
         "--namespace", namespace],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    output = done.stdout
    assert "SIGKILL RabbitMQ node" in output, f"{output}\n{done.stderr}"
    assert "failed:" not in output, f"{output}\n{done.stderr}"
    print("\n".join(line for line in output.splitlines()
                    if re.search(r"SIGKILL|consuming|started again|at rest", line)))
    for label in ("leader killed", "reconnected", "failover", "node back", "in flight at the kill",
                  "time to settle"):
        print(label, *row(label, output))
    # Then every entity was issued exactly once, the ledger agreeing with the sandbox
    assert row("entities", output)[0] == "400"
    assert row("issued", output)[0] == "400"
    assert row("missing", output)[0] == "0"
    assert row("issued twice", output)[0] == "0"
    assert row("ledger vs sandbox", output)[0] == "0"
    # And every worker consumed again while the node was down, and with it back
    assert row("failover", output)[0] != "never", output
    assert row("node back", output)[0] != "never", output
    assert "3/3 workers alive" in output, output
    assert re.search(r"coupons\.events 3,\s+coupons\.tasks 3,\s+coupons\.retry 3", output), output
    # And the entities whose calls were in flight when the node died were all issued
    in_flight, recovered = row("in flight at the kill", output)
    assert in_flight == "0" or recovered.startswith(f"{in_flight}/{in_flight} issued"), output
    # And nothing of the run is left running (the three nodes, the sandbox, the workers)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert not left.stdout.strip(), f"still running: {left.stdout}"
