"""The producers' EventProducer on a real RabbitMQ: it rides out a dropped connection."""

from __future__ import annotations

from typing import Any

from kombu import Connection

from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from worker.broker.publisher import EventProducer
from worker.config import Settings


def _waiting(settings: Settings, queue: str) -> int:
    with Connection(settings.broker_url) as connection:
        channel: Any = connection.channel()
        return int(channel.queue_declare(queue=queue, passive=True).message_count)


def test_a_producer_publishes_both_ways_in_after_its_connection_was_dropped(
    settings: Settings,
) -> None:
    event = {"eventId": "e-1", "customer": {"id": "1"}, "seriesIds": [544770]}
    vhost = settings.broker_url.rsplit("/", 1)[1]
    with EventProducer.open(settings) as producer:
        producer.publish_event(event, via="bus")
        # Given the broker drops every connection of the vhost (a restart, a failover)
        rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "1000", "test")
        # When a task is published first (it reconnects the shared connection), then a bus
        # message on the same producer
        producer.publish_event(event, via="task")
        producer.publish_event(event, via="bus")
    # Then both went out, instead of the second failing on the channel the first replaced
    assert _waiting(settings, settings.events_queue) == 2
    assert _waiting(settings, settings.tasks_queue) == 1
