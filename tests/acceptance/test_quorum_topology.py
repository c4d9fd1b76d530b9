"""In quorum mode the worker declares its own queues and nothing else, on a real RabbitMQ.

Celery declares 28 ``celery_delayed_*`` queues and their exchanges as soon as one queue is a
quorum queue (native delayed delivery, for ETA tasks the worker never sends); the worker's
consumer leaves that step out (``worker.entrypoints.celery.consumer``). The test runs in a vhost of
its own, so that every queue and exchange listed there is the worker's doing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost, rabbitmqctl
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import RABBIT_HOST, WorkerProcess
from worker.config import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def own_vhost() -> Iterator[str]:
    vhost = f"cw-quorum-{uuid.uuid4().hex[:8]}"
    create_vhost(vhost, wait_while_node_down=True)
    yield vhost
    delete_vhost(vhost, wait_while_node_down=True)


def listed(what: str, vhost: str, *columns: str) -> list[list[str]]:
    out = rabbitmqctl(what, "-p", vhost, *columns, "--no-table-headers")
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def test_in_quorum_mode_the_worker_declares_only_the_queues_it_uses(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], own_vhost: str,
) -> None:
    # Given a worker in quorum mode, alone in its vhost, that has issued one event
    settings = settings_factory(queue_type="quorum",
                                broker_url=f"amqp://guest:guest@{RABBIT_HOST}/{own_vhost}")
    worker = start_worker(settings)
    publish(settings, example_event("quorum-topology"))
    wait_for_state(clean_ledger, "quorum-topology", "completed")
    # When the vhost's queues and exchanges are listed
    queues = {name: kind for name, kind in listed("list_queues", own_vhost, "name", "type")}
    exchanges = {row[0] for row in listed("list_exchanges", own_vhost, "name")}
    # Then there are the three queues it consumes, replicated, and its remote-control mailbox
    pidbox = f"{worker.name}@"
    assert {q: k for q, k in queues.items() if not q.startswith(pidbox)} == {
        settings.events_queue: "quorum", settings.tasks_queue: "quorum",
        settings.retry_queue: "quorum"}, queues
    assert [q for q in queues if q.startswith(pidbox)] != [], "the worker's pidbox"
    # And no exchange of native delayed delivery, nor any other it does not use
    assert not [e for e in exchanges if e.startswith("celery_delayed")], exchanges
    ours = {settings.events_queue, settings.tasks_queue, settings.retry_queue}
    builtin = {e for e in exchanges if e.startswith("amq.") or e == ""}
    assert exchanges - builtin - ours <= {"celery.pidbox", "celeryev", "reply.celery.pidbox"}, \
        exchanges
