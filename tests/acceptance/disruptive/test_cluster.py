"""A 3-node RabbitMQ cluster whose nodes die: the producers fail over, and
`coupon-worker chaos --cluster` (the events queue's leader SIGKILLed mid-run and brought back)
issues every entity exactly once, as a real subprocess.

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

from coupon_devtools.harness.cluster import RabbitCluster
from coupon_devtools.harness.databases import drop_database
from tests.conftest import PG_ADMIN_URL, REPO_ROOT, coupon_worker_command
from worker.adapters.postgres.records import DueEntity
from worker.adapters.rabbitmq.celery_config import producer_app
from worker.adapters.rabbitmq.publisher import CeleryPublisher, EventProducer
from worker.config import Settings, load_settings

pytestmark = [pytest.mark.slow, pytest.mark.disruptive]


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace for one run; its database is gone afterwards, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    yield tag
    drop_database(PG_ADMIN_URL, f"coupon_worker_chaos_{tag}")


@pytest.fixture
def cluster(tmp_path: Path, session_tag: str) -> Iterator[RabbitCluster]:
    started = RabbitCluster.start(tmp_path / "cluster", session_tag[:6])
    try:
        yield started
    finally:
        started.stop()


def depth(settings: Settings, queue: str) -> int:
    """Messages on ``queue`` as its leader counts them (AMQP: rabbitmqctl's counts lag)."""
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True)[1])


def test_producers_publish_on_through_another_node_when_theirs_dies(
    cluster: RabbitCluster,
) -> None:
    cluster.create_vhost("producers")
    # Given quorum queues led by the first node, and producers on the first and second nodes
    on_first = load_settings(broker_url=cluster.urls("producers"), queue_type="quorum")
    on_second = load_settings(broker_url=cluster.rotated("producers", 1), queue_type="quorum")
    worker_side = CeleryPublisher(producer_app(on_first), on_first)
    with EventProducer.open(on_first) as first, EventProducer.open(on_second) as second:
        first.publish_raw(b'{"n": 0}')
        first.publish_event({"eventId": "before"}, via="task")
        worker_side.publish_retries([DueEntity(1, "before", 544770, "id:1", 1)])
        leader = cluster.leader("producers", on_first.events_queue)
        assert leader == cluster.nodes[0].node
        # When that node is SIGKILLed
        cluster.kill(leader)
        # Then every publish goes on, confirmed: through the next node for the producers that
        # were connected to the dead one, to the new leader for the other
        for n in range(1, 11):
            first.publish_raw(b'{"n": %d}' % n)
            second.publish_raw(b'{"n": %d}' % n)
            first.publish_event({"eventId": f"after-{n}"}, via="task")
        worker_side.publish_retries([DueEntity(2, "after", 544770, "id:1", 1)])
    # And every message is there once (all were confirmed, none needed publishing again)
    assert depth(on_second, on_first.events_queue) == 21
    assert depth(on_second, on_first.tasks_queue) == 11
    assert depth(on_second, on_first.retry_queue) == 2
    assert cluster.leader("producers", on_first.events_queue) != leader


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
    # And the delivery-limit policy was in force (set as `broker setup` does), parking nothing
    assert "policy      coupon-worker: delivery limit 50" in output
    assert row("parked", output)[0] == "0", output
    # And nothing of the run is left running (the three nodes, the sandbox, the workers)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert not left.stdout.strip(), f"still running: {left.stdout}"
