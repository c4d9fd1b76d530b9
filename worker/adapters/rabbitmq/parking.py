"""The broker's own net under the quorum queues: a delivery limit, and a parking queue.

A message that keeps coming back unacknowledged (it kills the pool process every time, or the
connection of whichever worker holds it is lost again and again) would go round forever. A
quorum queue counts deliveries, and past a *delivery limit* RabbitMQ dead-letters the message.
RabbitMQ 4 sets a limit of 20 by default and *drops* the message if no dead-letter target is
set: the target matters as much as the limit.

Both come from a policy, not from queue arguments: RabbitMQ refuses to declare a queue again
with other arguments, so arguments would break every deployment whose queues already exist (and
every worker of the old release still declaring them without), while a policy applies to live
queues and can be changed at any time. The policy (:func:`queue_policy`):

- applies to the events, task and retry queues, by exact name;
- ``delivery-limit``: ``COUPONS_DELIVERY_LIMIT`` (default 50), above
  ``COUPONS_MESSAGE_FAILURE_LIMIT``, so the worker's own count (which keeps the message in the
  ledger) acts first; the broker's limit catches the deliveries the worker never saw end;
- ``dead-letter-exchange``: the exchange ``COUPONS_PARKED_QUEUE``, bound to the quorum queue of
  that name; ``dead-letter-strategy: at-least-once`` (the source queue keeps the message until
  the parked queue confirmed it; it requires ``overflow: reject-publish``, which only matters
  with a length limit, and none is set).

Nothing consumes the parked queue: :func:`browse` lists what is there (from which queue, why,
how often it died) and :func:`move_back` publishes each message back, bytes and headers
untouched, to the queue it came from, and removes it from the parked queue only once the broker
confirmed the copy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from kombu import Connection, Producer, Queue

from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.publisher import BROKER_ERRORS, why
from worker.config import Settings
from worker.domain.errors import BrokerUnavailable

POLICY_NAME: Final = "coupon-worker"
POLICY_PRIORITY: Final = 10
RABBITMQCTL_TIMEOUT_S: Final = 60.0
# The properties a message keeps when it is moved back (besides body, headers and content).
_KEPT_PROPERTIES: Final = ("correlation_id", "reply_to", "message_id", "priority", "expiration",
                           "type", "user_id", "app_id", "timestamp")


@dataclass(frozen=True)
class QueuePolicy:
    """A RabbitMQ policy: which queues, what it sets."""

    name: str
    pattern: str
    definition: Mapping[str, object]
    # "queues": RabbitMQ 3.10 knows no narrower kind ("quorum_queues" came in 3.12); the
    # pattern names the queues, and a classic queue ignores the delivery limit anyway.
    apply_to: str = "queues"
    priority: int = POLICY_PRIORITY

    def rabbitmqctl_args(self, vhost: str) -> list[str]:
        """``rabbitmqctl`` arguments that set it in ``vhost``."""
        return ["set_policy", "-p", vhost, "--apply-to", self.apply_to, "--priority",
                str(self.priority), self.name, self.pattern,
                json.dumps(self.definition, separators=(",", ":"))]

    def as_definition(self, vhost: str) -> dict[str, object]:
        """The policy as in a definitions file (``rabbitmqctl import_definitions``)."""
        return {"vhost": vhost, "name": self.name, "pattern": self.pattern,
                "apply-to": self.apply_to, "priority": self.priority,
                "definition": dict(self.definition)}


def queue_policy(settings: Settings) -> QueuePolicy:
    """The delivery limit and dead-letter target for the queues the worker consumes."""
    names = (settings.events_queue, settings.tasks_queue, settings.retry_queue)
    parked = topology.parked_queue(settings)
    return QueuePolicy(
        name=POLICY_NAME,
        pattern="^(" + "|".join(re.escape(name) for name in names) + ")$",
        definition={
            "delivery-limit": settings.delivery_limit,
            "dead-letter-exchange": parked.exchange.name,
            "dead-letter-routing-key": parked.routing_key,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        },
    )


def vhost_of(settings: Settings) -> str:
    """The vhost of the broker URL (of the first, for a list: they name the same one)."""
    path = urlsplit(settings.broker_urls[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@contextmanager
def _connection(settings: Settings) -> Iterator[Connection]:
    try:
        with Connection(settings.broker_url, connect_timeout=5,
                        transport_options=settings.broker_transport_options()) as connection:
            connection.ensure_connection(max_retries=3)
            yield connection
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"broker unavailable: {why(exc)}") from exc


def declare_parking(settings: Settings) -> None:
    """Declare the parked queue and its exchange (a no-op when they exist)."""
    with _connection(settings) as connection:
        try:
            topology.parked_queue(settings)(connection.default_channel).declare()
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"could not declare the parked queue: {why(exc)}") from exc


def apply_policy(policy: QueuePolicy, vhost: str, *, node: str | None = None) -> None:
    """Set ``policy`` in ``vhost`` with ``rabbitmqctl`` (on this host, able to reach the node:
    the Erlang cookie); ``node`` names the node, else rabbitmqctl's default."""
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise BrokerUnavailable("rabbitmqctl is not on this host: run `coupon-worker broker "
                                "setup --print` and set the policy where it is")
    argv = [command, "-q", *(["-n", node] if node else []), *policy.rabbitmqctl_args(vhost)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True,  # noqa: S603 - ours
                              timeout=RABBITMQCTL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerUnavailable("rabbitmqctl set_policy timed out") from exc
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["?"])[-1]
        raise BrokerUnavailable(f"rabbitmqctl set_policy failed: {last}")


# -- what the broker parked ------------------------------------------------------------------


@dataclass(frozen=True)
class ParkedMessage:
    """One message in the parked queue, as far as its headers tell (never its payload)."""

    origin: str | None
    reason: str | None
    deaths: int
    task: str | None
    ids: str | None
    size_bytes: int


def _describe(message: Any) -> ParkedMessage:
    headers: Mapping[str, Any] = message.headers or {}
    deaths = sum(int(d.get("count", 1)) for d in headers.get("x-death") or []
                 if isinstance(d, Mapping))
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    ids = headers.get("kwargsrepr")
    if ids is None and message.content_type == "application/json":
        try:
            data = json.loads(body)
            ids = f"event={data.get('eventId')}" if isinstance(data, dict) else None
        except ValueError:
            ids = None
    return ParkedMessage(
        origin=_text(headers.get("x-first-death-queue")),
        reason=_text(headers.get("x-first-death-reason")),
        deaths=deaths, task=_text(headers.get("task")),
        ids=None if ids is None else str(ids)[:200], size_bytes=len(body))


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def parked_count(settings: Settings) -> int:
    """How many messages wait in the parked queue (0 when it was never declared)."""
    with _connection(settings) as connection:
        channel: Any = connection.channel()
        try:
            _name, count, _consumers = channel.queue_declare(
                queue=settings.parked_queue, passive=True)
        except BROKER_ERRORS:
            return 0
        finally:
            channel.close()
        return int(count)


def browse(settings: Settings, limit: int) -> list[ParkedMessage]:
    """The first ``limit`` parked messages, left where they are (fetched unacknowledged, then
    handed back when the channel closes)."""
    found = []
    with _connection(settings) as connection:
        channel: Any = connection.channel()
        try:
            queue = topology.parked_queue(settings)(channel)
            for _ in range(limit):
                message = queue.get(no_ack=False, accept=None)
                if message is None:
                    break
                found.append(_describe(message))
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"could not read the parked queue: {why(exc)}") from exc
        finally:
            channel.close()
    return found


@dataclass(frozen=True)
class MoveReport:
    moved: Mapping[str, int]
    kept: Sequence[str]


def move_back(settings: Settings, limit: int) -> MoveReport:
    """Publish up to ``limit`` parked messages back to the queue each came from, confirmed,
    and only then remove each from the parked queue. One whose origin is not a queue of ours
    stays parked (listed in ``kept``)."""
    targets: dict[str, Queue] = {q.name: q for q in (
        topology.events_queue(settings), topology.tasks_queue(settings),
        topology.retry_queue(settings))}
    moved: dict[str, int] = {}
    kept: list[str] = []
    with _connection(settings) as connection:
        channel: Any = connection.channel()
        try:
            producer = Producer(channel)
            queue = topology.parked_queue(settings)(channel)
            for _ in range(limit):
                message = queue.get(no_ack=False, accept=None)
                if message is None:
                    break
                described = _describe(message)
                target = targets.get(described.origin or "")
                if target is None:
                    # Unacknowledged: it goes back to the parked queue when the channel closes.
                    kept.append(f"from {described.origin or 'an unknown queue'}: not a queue "
                                "of this worker's settings")
                    continue
                properties: dict[str, Any] = {k: message.properties[k] for k in _KEPT_PROPERTIES
                              if message.properties.get(k) is not None}
                producer.publish(
                    message.body, exchange=target.exchange, routing_key=target.routing_key,
                    headers=dict(message.headers or {}), content_type=message.content_type,
                    content_encoding=message.content_encoding, delivery_mode=2,
                    # No retry on a new connection: this channel's fetched messages would go
                    # back to the parked queue with it, after their copies were published.
                    retry=False, **properties)
                message.ack()
                moved[target.name] = moved.get(target.name, 0) + 1
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"moving parked messages back failed (what was not "
                                    f"confirmed stays parked): {why(exc)}") from exc
        finally:
            channel.close()
    return MoveReport(moved, kept)
