"""The producers' EventProducer on a real RabbitMQ: it rides out a dropped connection."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Connection

from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from tests.acceptance.helpers import queue_counts, queue_ready, refusing
from worker.adapters.postgres.records import DueEntity
from worker.adapters.rabbitmq.celery_config import producer_app
from worker.adapters.rabbitmq.publisher import CeleryPublisher, EventProducer
from worker.config import Settings
from worker.domain.errors import BrokerUnavailable


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
    assert queue_ready(settings, settings.events_queue) == 2
    assert queue_ready(settings, settings.tasks_queue) == 1


# -- publisher confirms --------------------------------------------------------------------


@pytest.mark.parametrize("via", ["bus", "task"])
def test_a_publish_the_broker_refuses_raises_and_a_confirmed_one_is_on_the_queue(
    settings: Settings, via: str,
) -> None:
    event = {"eventId": f"confirm-{via}", "customer": {"id": "1"}, "seriesIds": [544770]}
    queue = settings.events_queue if via == "bus" else settings.tasks_queue
    with EventProducer.open(settings) as producer:
        producer.publish_event(event, via=via)  # type: ignore[arg-type]
    assert queue_ready(settings, queue) == 1
    # Given RabbitMQ refuses messages for the queue
    with refusing(settings, queue):
        assert queue_ready(settings, queue) == 0, "the policy applies"
        # When a producer publishes: then it is told, instead of the message vanishing
        with pytest.raises(BrokerUnavailable, match="refused the message"), \
                EventProducer.open(settings) as producer:
            producer.publish_event(event, via=via)  # type: ignore[arg-type]
    # And once the broker accepts again, a confirmed publish is on the queue
    with EventProducer.open(settings) as producer:
        producer.publish_event(event, via=via)  # type: ignore[arg-type]
    assert queue_ready(settings, queue) == 1


def test_the_workers_publishes_raise_when_the_broker_refuses_them(settings: Settings) -> None:
    publisher = CeleryPublisher(producer_app(settings), settings)
    due = [DueEntity(entity_id=7, event_id="e-7", customer_key="id:1", series_id=544770,
                     attempts=1)]
    with refusing(settings, settings.retry_queue), \
            pytest.raises(BrokerUnavailable, match="refused the message"):
        publisher.publish_retries(due)
    publisher.publish_retries(due)
    assert queue_ready(settings, settings.retry_queue) == 1


def test_the_delivery_gate_sees_messages_waiting_and_messages_held_unacknowledged(
    settings: Settings,
) -> None:
    # The acceptance tests' "every delivery processed" reads these counts: a message taken by
    # a consumer and not yet acknowledged must keep it waiting.
    with EventProducer.open(settings) as producer:
        producer.publish_raw(b"{}")
    assert queue_counts(settings)[settings.events_queue] == (1, 0)
    with Connection(settings.broker_url) as connection:
        channel: Any = connection.channel()
        held = channel.basic_get(settings.events_queue, no_ack=False)
        assert held is not None
        assert queue_counts(settings)[settings.events_queue] == (0, 1)
        channel.basic_ack(held.delivery_tag)
        assert queue_counts(settings)[settings.events_queue] == (0, 0)
