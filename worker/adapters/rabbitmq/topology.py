"""Every queue the worker declares, built in one place so the arguments always agree.

RabbitMQ refuses a second declaration of a queue with other arguments, so producers, the
bridge and the Celery app all take their ``Queue`` objects from here.

- ``coupons.events``: plain JSON events from any producer (the loyalty bus);
- ``coupons.tasks``: Celery tasks ``coupons.issue`` / ``coupons.ingest``;
- ``coupons.retry``: one message per entity whose retry is due (``coupons.retry``);
- ``coupons.dead``: one message per dead entity or rejected event, for people and alerting.
  Nobody consumes it and the ledger is the source of truth, so it keeps the newest
  ``COUPONS_DEAD_QUEUE_MAX_LENGTH`` messages and drops the oldest;
- ``coupons.parked``: where RabbitMQ dead-letters a message of the first three that was
  delivered more than ``COUPONS_DELIVERY_LIMIT`` times (quorum queues;
  ``worker.adapters.rabbitmq.parking``). Declared by ``coupon-worker broker setup``, never by the
  worker; nothing consumes it.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from worker.config import Settings


def _queue(name: str, settings: Settings, **arguments: object) -> Queue:
    exchange = Exchange(name, type="direct", durable=True)
    if settings.queue_type == "quorum":
        # Replicated queues for production clusters; the worker uses neither ETA nor global
        # QoS, the two things quorum queues do not support.
        arguments["x-queue-type"] = "quorum"
    return Queue(name, exchange, routing_key=name, durable=True,
                 queue_arguments=arguments or None)


def events_queue(settings: Settings) -> Queue:
    return _queue(settings.events_queue, settings)


def tasks_queue(settings: Settings) -> Queue:
    return _queue(settings.tasks_queue, settings)


def retry_queue(settings: Settings) -> Queue:
    return _queue(settings.retry_queue, settings)


def dead_queue(settings: Settings) -> Queue:
    return _queue(
        settings.dead_queue, settings,
        **{"x-max-length": settings.dead_queue_max_length, "x-overflow": "drop-head"},
    )


def parked_queue(settings: Settings) -> Queue:
    return _queue(settings.parked_queue, settings)


def consumed_queues(settings: Settings) -> list[Queue]:
    """The queues Celery's own consumer reads (the events queue too, unless the bridge does)."""
    bus = [events_queue(settings)] if settings.bus_intake == "direct" else []
    return [*bus, tasks_queue(settings), retry_queue(settings)]
