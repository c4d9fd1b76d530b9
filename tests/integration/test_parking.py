"""The quorum queues' delivery limit and parked queue, on a real RabbitMQ.

``coupon-worker broker setup`` sets the policy; a message delivered past the limit is parked
by RabbitMQ itself (not lost), ``broker parked`` lists it and ``broker move-back`` puts it back
on its queue as it was. Each test has a vhost of its own: policies are per vhost.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Message, Producer

from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost, rabbitmqctl
from tests.conftest import RABBIT_HOST, run_cli, wait_until
from worker.adapters.rabbitmq import topology
from worker.config import Settings


@pytest.fixture
def own_vhost() -> Iterator[str]:
    vhost = f"cw-parking-{uuid.uuid4().hex[:8]}"
    create_vhost(vhost, wait_while_node_down=True)
    yield vhost
    delete_vhost(vhost, wait_while_node_down=True)


@pytest.fixture
def quorum(settings_factory: Callable[..., Settings], own_vhost: str) -> Settings:
    """Quorum queues, a delivery limit of 2 (the worker's own failure limit below it)."""
    return settings_factory(queue_type="quorum", delivery_limit=2, message_failure_limit=1,
                            broker_url=f"amqp://guest:guest@{RABBIT_HOST}/{own_vhost}")


TASK_HEADERS = {"task": "coupons.issue", "id": "7d1c", "lang": "py",
                "kwargsrepr": "event=parked-1 customer=id:1 series=[544770]"}
TASK_BODY = json.dumps([[], {"event": {"eventId": "parked-1"}}, {}]).encode()


def publish_task(settings: Settings) -> None:
    queue = topology.tasks_queue(settings)
    with Connection(settings.broker_url) as conn:
        Producer(conn.default_channel).publish(
            TASK_BODY, exchange=queue.exchange, routing_key=queue.routing_key,
            declare=[queue], headers=TASK_HEADERS, content_type="application/json",
            content_encoding="utf-8", correlation_id="7d1c", delivery_mode=2)


def refuse_until_gone(settings: Settings, limit_s: float = 20.0) -> int:
    """Take the task queue's message and hand it back (``basic.reject``, requeue), as a worker
    that dies holding it would, until RabbitMQ no longer delivers it; return the deliveries."""
    deliveries = 0
    deadline = time.monotonic() + limit_s
    with Connection(settings.broker_url) as conn:
        queue = topology.tasks_queue(settings)(conn.default_channel)
        while time.monotonic() < deadline:
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                if deliveries:
                    return deliveries
                time.sleep(0.1)
                continue
            deliveries += 1
            message.reject(requeue=True)
    raise AssertionError(f"still delivered after {deliveries} deliveries")


def take_task(settings: Settings) -> Message:
    with Connection(settings.broker_url) as conn:
        message: Any = topology.tasks_queue(settings)(conn.default_channel).get(
            no_ack=True, accept=["json"])
        assert message is not None, "the task queue is empty"
        return message  # type: ignore[no-any-return]


def test_a_message_delivered_past_the_limit_is_parked_listed_and_moved_back_untouched(
    quorum: Settings, own_vhost: str,
) -> None:
    # Given the policy set on the worker's queues
    done = run_cli(quorum, "broker", "setup")
    assert done.exit_code == 0, done.output
    policies = rabbitmqctl("list_policies", "-p", own_vhost, "--formatter", "json")
    policy, = json.loads(policies)
    assert policy["name"] == "coupon-worker" and policy["apply-to"] == "queues"
    definition = json.loads(policy["definition"]) if isinstance(policy["definition"], str) \
        else policy["definition"]
    assert definition["delivery-limit"] == 2
    assert definition["dead-letter-exchange"] == quorum.parked_queue
    assert definition["dead-letter-strategy"] == "at-least-once"
    # When a task comes back unacknowledged delivery after delivery
    publish_task(quorum)
    assert refuse_until_gone(quorum) == 3  # the first delivery and two more
    # Then RabbitMQ parked it (its dead-lettering, at least once, is asynchronous: the
    # parked copy lands a moment after the queue stops delivering), and the command lists
    # where it came from and why
    def parked_now() -> dict[str, Any]:
        listed = run_cli(quorum, "broker", "parked", "--json")
        assert listed.exit_code == 0, listed.output
        found: dict[str, Any] = json.loads(listed.stdout)
        return found

    parked = wait_until(lambda: (found := parked_now())["total"] and found,
                        timeout_s=15, message="the message parked")
    assert parked["total"] == 1
    entry, = parked["messages"]
    assert entry["origin"] == quorum.tasks_queue
    assert entry["reason"] == "delivery_limit"
    assert entry["task"] == "coupons.issue"
    assert entry["ids"] == TASK_HEADERS["kwargsrepr"]
    # And listing it left it there; moving it back puts it on its queue as it was published
    moved = run_cli(quorum, "broker", "move-back")
    assert moved.exit_code == 0, moved.output
    assert f"moved 1 message(s) back: 1 to {quorum.tasks_queue}" in moved.stdout
    back = take_task(quorum)
    body = back.body  # py-amqp hands a body in a text encoding over decoded
    assert (body if isinstance(body, bytes) else str(body).encode("utf-8")) == TASK_BODY
    assert {k: back.headers[k] for k in TASK_HEADERS} == TASK_HEADERS
    assert back.properties["correlation_id"] == "7d1c"
    assert back.content_type == "application/json"
    assert json.loads(run_cli(quorum, "broker", "parked", "--json").stdout)["total"] == 0
    assert "nothing parked" in run_cli(quorum, "broker", "move-back").stdout


def test_setup_is_the_upgrade_path_for_queues_that_already_exist(
    quorum: Settings, own_vhost: str,
) -> None:
    # Given the queues declared by a release without the policy (no delivery limit)
    with Connection(quorum.broker_url) as conn:
        for queue in topology.consumed_queues(quorum):
            queue(conn.default_channel).declare()
    # When the setup runs (twice: it changes nothing the second time)
    for _ in range(2):
        done = run_cli(quorum, "broker", "setup")
        assert done.exit_code == 0, done.output
    # Then the live queues carry the policy, without being declared again
    out = rabbitmqctl("list_queues", "-p", own_vhost, "name", "policy", "--no-table-headers")
    applied = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    assert {q.name: applied[q.name] for q in topology.consumed_queues(quorum)} == dict.fromkeys(
        (quorum.events_queue, quorum.tasks_queue, quorum.retry_queue), "coupon-worker")
    assert applied[quorum.parked_queue] == "", "the parked queue has no limit of its own"
    # And the worker's own declaration still agrees with the queues (same arguments)
    with Connection(quorum.broker_url) as conn:
        for queue in topology.consumed_queues(quorum):
            queue(conn.default_channel).declare()


def test_setup_prints_what_it_would_set_and_refuses_classic_queues(
    settings_factory: Callable[..., Settings],
) -> None:
    printed = run_cli(settings_factory(queue_type="quorum"), "broker", "setup", "--print")
    assert printed.exit_code == 0, printed.output
    assert "rabbitmqctl set_policy -p" in printed.stdout
    assert '"delivery-limit":50' in printed.stdout
    assert '"policies"' in printed.stdout
    classic = run_cli(settings_factory(queue_type="classic"), "broker", "setup")
    assert classic.exit_code == 2
    assert "COUPONS_QUEUE_TYPE=quorum" in classic.stderr
