"""Publishing to RabbitMQ: retries and dead letters (the worker) and events (producers).

Every publish waits for the broker's confirm (``confirm_publish``) and uses persistent
messages on durable queues. Broker errors are translated to ``BrokerUnavailable``.

A lost connection is kombu's to cure (``retry=True``: it connects again, to the next node of a
URL list, and publishes again). A refusal (``basic.nack``) is not: kombu raises at once. A
quorum queue refuses for a moment while it elects a new leader (its node died), so a nacked
publish is published again here, with ``PUBLISH_RETRY_POLICY``'s pauses, before the refusal is
raised (:func:`until_confirmed`). The bridge does not wait here: it runs on the consumer's loop,
and holds the message to try again on the guard's next release instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import amqp.exceptions
import kombu.exceptions
from celery import Celery
from kombu import Connection, Producer

from worker.adapters.postgres.records import DeadLetterRecord, DueEntity
from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.celery_config import producer_app
from worker.adapters.rabbitmq.names import TASK_ISSUE, TASK_RETRY
from worker.config import Settings
from worker.domain.errors import BrokerUnavailable
from worker.domain.events import LoyaltyEvent
from worker.domain.runtime_policy import PUBLISH_RETRY_POLICY

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.KombuError, amqp.exceptions.AMQPError, OSError,
)
__all__ = ["BROKER_ERRORS", "PUBLISH_RETRY_POLICY", "CeleryPublisher", "EventProducer",
           "event_argsrepr"]
Via = Literal["bus", "task"]


def why(exc: BaseException) -> str:
    """A broker error in words: a nack carries none of its own."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, amqp.exceptions.MessageNacked):
            return "the broker refused the message (nack)"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or repr(exc)


def nacked(exc: BaseException) -> bool:
    """Whether the broker refused the message (``basic.nack``), however kombu wrapped it."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, amqp.exceptions.MessageNacked):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def nack_pauses_s(policy: dict[str, float] = PUBLISH_RETRY_POLICY) -> list[float]:
    """The pauses between publishes of a nacked message: kombu's retry policy's."""
    start, step, top = policy["interval_start"], policy["interval_step"], policy["interval_max"]
    return [min(start + step * i, top) for i in range(int(policy["max_retries"]))]


def until_confirmed(publish: Callable[[], object],
                    pauses_s: Sequence[float] | None = None) -> None:
    """Run ``publish`` until the broker confirms it: published again after each nack, with
    ``pauses_s`` between; the last nack (and any other error) is raised."""
    for pause_s in [*(nack_pauses_s() if pauses_s is None else pauses_s), None]:
        try:
            publish()
            return
        except BROKER_ERRORS as exc:
            if pause_s is None or not nacked(exc):
                raise
        time.sleep(pause_s)


def event_argsrepr(event_id: str | None, customer: str | None, series: object) -> str:
    """How a task's arguments read in Flower: ids only, never metadata or secrets."""
    return f"event={event_id} customer={customer} series={series}"


class CeleryPublisher:
    """The worker's ``Publisher``: retry tasks and dead-letter messages."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self._tasks_queue = topology.tasks_queue(settings)
        self._retry_queue = topology.retry_queue(settings)
        self._dead_queue = topology.dead_queue(settings)

    def publish_retries(self, due: Sequence[DueEntity]) -> None:
        try:
            with self._app.producer_or_acquire() as producer:
                for d in due:
                    until_confirmed(lambda d=d: self._app.send_task(  # type: ignore[misc]
                        TASK_RETRY,
                        kwargs={"entity_id": d.entity_id},
                        queue=self._retry_queue.name,
                        # Through the queue's own exchange, not Celery's shortcut through the
                        # default one: a broker user may then publish to these queues only
                        # (worker.adapters.rabbitmq.permissions).
                        exchange=self._retry_queue.exchange.name,
                        routing_key=self._retry_queue.routing_key,
                        producer=producer,
                        argsrepr="()",
                        kwargsrepr=f"entity={d.entity_id} "
                        + event_argsrepr(d.event_id, d.customer_key, d.series_id),
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                    ))
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"could not publish retries: {why(exc)}") from exc

    def submit_event(self, event: LoyaltyEvent, *, source: str) -> None:
        """Send a valid event as the ``coupons.issue`` task, as a Python producer would."""
        try:
            until_confirmed(lambda: self._app.send_task(
                TASK_ISSUE,
                kwargs={"event": event.to_message(), "source": source},
                queue=self._tasks_queue.name,
                exchange=self._tasks_queue.exchange.name,
                routing_key=self._tasks_queue.routing_key,
                argsrepr="()",
                kwargsrepr=event_argsrepr(event.eventId, event.customer.key,
                                          list(event.seriesIds)),
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            ))
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"could not publish the event: {why(exc)}") from exc

    def publish_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        try:
            with self._app.producer_or_acquire() as producer:
                for record in records:
                    until_confirmed(lambda record=record: producer.publish(  # type: ignore[misc]
                        record.as_message(),
                        exchange=self._dead_queue.exchange,
                        routing_key=self._dead_queue.routing_key,
                        declare=[self._dead_queue],
                        serializer="json",
                        delivery_mode=2,
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                    ))
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"could not publish dead letters: {why(exc)}") from exc


class EventProducer:
    """What a producer uses to put events on the bus (plain JSON) or as Celery tasks."""

    def __init__(self, settings: Settings, connection: Connection) -> None:
        self._settings = settings
        self._connection = connection
        self._events_queue = topology.events_queue(settings)
        self._tasks_queue = topology.tasks_queue(settings)
        self._producer = Producer(connection.default_channel)
        # Sends ``coupons.issue`` by name over this connection; built now, it connects nothing.
        self._app = producer_app(settings)

    @classmethod
    @contextmanager
    def open(cls, settings: Settings) -> Iterator[EventProducer]:
        transport_options = settings.broker_transport_options()
        try:
            with Connection(settings.broker_url, transport_options=transport_options,
                            connect_timeout=5) as connection:
                connection.ensure_connection(max_retries=3)
                yield cls(settings, connection)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"broker unavailable: {why(exc)}") from exc

    def publish_raw(self, body: bytes, *, content_type: str = "application/json") -> None:
        """Publish bytes as they are to the events queue, as a loyalty bus would."""
        until_confirmed(lambda: self._publish_raw(body, content_type))

    def _publish_raw(self, body: bytes, content_type: str) -> None:
        if self._producer.connection is None:
            # A task published since re-established the shared connection, on a new channel:
            # this producer's channel is closed, and kombu cannot revive it from there.
            self._producer.revive(self._connection.default_channel)
        self._producer.publish(
            body,
            exchange=self._events_queue.exchange,
            routing_key=self._events_queue.routing_key,
            declare=[self._events_queue],
            content_type=content_type,
            content_encoding="utf-8" if content_type.startswith("application/json") else "binary",
            delivery_mode=2,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )

    def publish_event(self, event: LoyaltyEvent | dict[str, Any], *, via: Via = "bus") -> None:
        """Publish one event, validated or not, the chosen way in."""
        data = event.to_message() if isinstance(event, LoyaltyEvent) else event
        if via == "bus":
            self.publish_raw(json.dumps(data).encode("utf-8"))
            return
        app = self._app
        customer = data.get("customer") if isinstance(data, dict) else None
        until_confirmed(lambda: app.send_task(
            TASK_ISSUE,
            kwargs={"event": data, "source": "task"},
            queue=self._tasks_queue.name,
            connection=self._connection,
            argsrepr="()",
            kwargsrepr=event_argsrepr(
                data.get("eventId"), _customer_label(customer), data.get("seriesIds")),
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        ))


def _customer_label(customer: object) -> str | None:
    if isinstance(customer, dict):
        for name in ("id", "mobile", "email", "externalId"):
            if customer.get(name):
                return f"{name}:{customer[name]}"
    return None
