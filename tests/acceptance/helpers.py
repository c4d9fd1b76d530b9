"""Helpers for tests that drive the real worker: publish, and read the ledger's answer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine

from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from tests.conftest import wait_until
from worker.adapters.rabbitmq.publisher import EventProducer
from worker.config import Settings
from worker.domain.errors import NotFound
from worker.usecases.queries import event_story


def example_event(event_id: str = "tier-upgrade-566881933-2026-11-25",
                  series: tuple[int, ...] = (544770, 553379),
                  customer: str = "566881933") -> dict[str, Any]:
    return {
        "eventId": event_id, "eventType": "TierUpgraded", "occurredAt": "2026-11-25T10:00:00Z",
        "customer": {"id": customer}, "seriesIds": list(series),
        "metadata": {"sourceType": "Journeys", "sourceId": "journey-block-001",
                     "sourceActivity": "Tier upgrade", "notes": "Gold reward",
                     "reason": "Tier upgrade to Gold"},
    }


def publish_raw(settings: Settings, *bodies: bytes) -> None:
    with EventProducer.open(settings) as producer:
        for body in bodies:
            producer.publish_raw(body)


def publish(settings: Settings, *events: dict[str, Any], via: str = "bus") -> None:
    with EventProducer.open(settings) as producer:
        for event in events:
            if via == "bus":
                producer.publish_raw(json.dumps(event).encode())
            else:
                producer.publish_event(event, via="task")


def story(engine: Engine, event_id: str) -> dict[str, Any] | None:
    try:
        return event_story(engine, event_id)
    except NotFound:
        return None


def wait_for_state(engine: Engine, event_id: str, state: str,
                   timeout_s: float = 30.0) -> dict[str, Any]:
    seen: list[dict[str, Any] | None] = [None]

    def reached() -> dict[str, Any] | None:
        seen[0] = found = story(engine, event_id)
        return found if found and found["state"] == state else None

    try:
        result: dict[str, Any] = wait_until(reached, timeout_s=timeout_s,
                                            message=f"event {event_id} to be {state}")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; the ledger's story: {seen[0]!r}") from None
    return result


def _declared(settings: Settings, queue: str) -> tuple[int, int]:
    """Ready messages and consumers RabbitMQ counts on ``queue`` (a passive declare: it must
    exist)."""
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        _name, ready, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
        return int(ready), int(consumers)


def queue_consumers(settings: Settings, queue: str) -> int:
    """How many consumers RabbitMQ counts on ``queue``."""
    return _declared(settings, queue)[1]


def queue_ready(settings: Settings, queue: str) -> int:
    """How many messages wait on ``queue``, ready (not held by a consumer)."""
    return _declared(settings, queue)[0]


def circuit(engine: Engine) -> tuple[str, int]:
    """The fleet's circuit as the ledger holds it: state and how often it opened."""
    from sqlalchemy import text

    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT state, times_opened FROM circuit_breakers WHERE name = 'capillary'")).first()
    return (str(row[0]), int(row[1])) if row else ("closed", 0)


def wait_for_circuit_opened(engine: Engine, timeout_s: float = 30.0) -> None:
    wait_until(lambda: circuit(engine)[1] >= 1, timeout_s=timeout_s,
               message="the circuit to open")


def wait_for_consumers(settings: Settings, queue: str, predicate: Any,
                       timeout_s: float = 30.0, what: str = "consumers") -> None:
    wait_until(lambda: predicate(queue_consumers(settings, queue)), timeout_s=timeout_s,
               message=what)


# -- every delivery processed --------------------------------------------------------------


def _vhost(settings: Settings) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(settings.broker_url).path[1:]) or "/"


def queue_counts(settings: Settings, node: str | None = None) -> dict[str, tuple[int, int]]:
    """Ready and unacknowledged messages of this test's events, task and retry queues.

    From ``rabbitmqctl`` (the queues' own counts), since AMQP's passive declare tells only the
    ready ones: a message a consumer holds, or a task the pool is running, is unacknowledged.
    A queue not declared yet holds nothing. ``node``: a RabbitMQ node other than the machine's.
    """
    ours = (settings.events_queue, settings.tasks_queue, settings.retry_queue)
    out = rabbitmqctl("list_queues", "-p", _vhost(settings), "--no-table-headers",
                      "name", "messages_ready", "messages_unacknowledged",
                      wait_while_node_down=True, node=node)
    counts = {name: (0, 0) for name in ours}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] in counts:
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


def wait_for_every_delivery(settings: Settings, timeout_s: float = 60.0,
                            node: str | None = None) -> None:
    """Wait until RabbitMQ delivered every message published so far and each was acknowledged.

    The worker acknowledges a task after its outcome is committed (late acks) and the bridge a
    bus message after the task it forwards is confirmed, so empty queues with nothing
    unacknowledged mean every delivery was processed. Two snapshots in a row: one listing
    reads the queues one after another, and a bus message forwarded between the reads of the
    task queue and of the events queue would escape it; the second reads the task queue after
    the first read an empty events queue, and nothing new reaches the bus.
    """
    def empty() -> bool:
        return all(counts == (0, 0) for counts in queue_counts(settings, node).values())

    def twice() -> bool:
        return empty() and empty()

    # Each read is a rabbitmqctl run (about a second of CPU): poll at a pace the CPU can spare.
    wait_until(twice, timeout_s=timeout_s, interval_s=0.5,
               message="every message to be delivered and acknowledged")


# -- which worker did it -------------------------------------------------------------------


def _parent_of(pid: int) -> int:
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def workers_that_claimed(engine: Engine, main_pids: Sequence[int]) -> set[int]:
    """Which workers (by main process) claimed entities.

    The ledger records the pool process that claimed (``host:pid``, then ``/task:<id>``); two
    pool processes of one worker are one worker, so each is mapped to its parent, the worker's
    main process (under the threads pool the main process claims itself). Claims by any other
    process (another host, a pool process that is gone) count as unknown (-1).
    """
    import socket

    from sqlalchemy import text

    host = socket.gethostname()
    with engine.connect() as conn:
        claimers = {r[0] for r in conn.execute(text(
            "SELECT DISTINCT split_part(worker, '/task:', 1) FROM entity_history "
            "WHERE kind = 'claimed'"))}
    found: set[int] = set()
    for claimer in claimers:
        name, _, pid = claimer.rpartition(":")
        try:
            parent = -1 if name != host else (
                int(pid) if int(pid) in main_pids else _parent_of(int(pid)))
        except (OSError, ValueError):
            parent = -1
        found.add(parent if parent in main_pids else -1)
    return found


# -- a broker that refuses -----------------------------------------------------------------


@contextmanager
def refusing(settings: Settings, queue: str) -> Iterator[None]:
    """While inside, RabbitMQ refuses every message for ``queue`` with a nack.

    A policy of length 0 that rejects new messages (``reject-publish``): the broker answers a
    confirmed publish with ``basic.nack`` and drops the message; an unconfirmed publish is
    dropped in silence. The policy names this test's queue only.
    """
    vhost = _vhost(settings)
    name = f"refuse-{queue}"
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", name,
                f"^{re.escape(queue)}$", '{"max-length": 0, "overflow": "reject-publish"}')
    try:
        yield
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, name)


def metric_value(body: str, name: str, **labels: str) -> float:
    """A sample's value in a Prometheus exposition (0 when absent)."""
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0
