"""A RabbitMQ cluster in the settings, in Celery's configuration and in the publisher: a list
of broker URLs, every password hidden, no native delayed delivery in the consumer, and a publish
the broker refused (a quorum queue between two leaders) published again."""

from __future__ import annotations

from collections.abc import Callable

import amqp.exceptions
import kombu.exceptions
import pytest
from celery import Celery

from worker.adapters.rabbitmq.celery_config import LazyConfig
from worker.adapters.rabbitmq.publisher import nack_pauses_s, nacked, until_confirmed
from worker.config import Settings, load_settings
from worker.domain.errors import ConfigurationError
from worker.entrypoints.celery.consumer import DELAYED_DELIVERY_STEP, FleetConsumer

NODES = ("amqp://coupons:pw-one@mq1:5672/coupons ; amqp://coupons:pw-two@mq2:5672/coupons;"
         "amqp://coupons:pw-three@mq3:5672/coupons;")


def cluster_settings(**overrides: object) -> Settings:
    return load_settings(broker_url=NODES, **overrides)


def test_a_list_of_broker_urls_names_every_node_in_order() -> None:
    settings = cluster_settings()
    assert settings.broker_urls == ["amqp://coupons:pw-one@mq1:5672/coupons",
                                    "amqp://coupons:pw-two@mq2:5672/coupons",
                                    "amqp://coupons:pw-three@mq3:5672/coupons"]
    # Celery and kombu read the same list (their failover form) and confirm every publish
    assert settings.broker_url == ";".join(settings.broker_urls)
    assert settings.broker_transport_options() == {"confirm_publish": True}


def test_the_summary_hides_the_password_of_every_node() -> None:
    summary = str(cluster_settings().safe_summary())
    assert "pw-" not in summary
    assert summary.count("coupons:**@") == 3


@pytest.mark.parametrize("value, problem", [
    (" ; ", "must be a broker URL"),
    ("filesystem://;filesystem://", "amqp:// URLs only"),
    ("amqp://a//;amqps://b//", "same scheme"),
])
def test_a_list_that_is_no_cluster_is_refused(value: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        load_settings(broker_url=value)


def test_kombu_fails_over_along_the_list() -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object(LazyConfig(cluster_settings))
    connection = app.connection_for_write()
    assert connection.alt == cluster_settings().broker_urls
    assert connection.as_uri() == "amqp://coupons:**@mq1:5672/coupons"


def test_the_consumer_leaves_native_delayed_delivery_out() -> None:
    steps = FleetConsumer.Blueprint.default_steps
    assert DELAYED_DELIVERY_STEP not in steps
    assert "celery.worker.consumer.tasks:Tasks" in steps
    assert len(steps) == 9  # Celery's ten, less one


def nack() -> Exception:
    """A refusal as kombu raises it: OperationalError from py-amqp's MessageNacked."""
    try:
        try:
            raise amqp.exceptions.MessageNacked()
        except amqp.exceptions.MessageNacked as cause:
            raise kombu.exceptions.OperationalError("") from cause
    except kombu.exceptions.OperationalError as exc:
        return exc


def flaky(*failures: Exception) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []

    def publish() -> None:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]

    return calls, publish


def test_a_nacked_publish_is_published_again_until_confirmed() -> None:
    # A quorum queue electing a new leader refuses for a moment
    calls, publish = flaky(nack(), nack())
    until_confirmed(publish, pauses_s=[0.0, 0.0, 0.0])
    assert len(calls) == 3


def test_the_last_nack_is_raised_and_other_errors_at_once() -> None:
    calls, publish = flaky(nack(), nack(), nack())
    with pytest.raises(kombu.exceptions.OperationalError) as raised:
        until_confirmed(publish, pauses_s=[0.0, 0.0])
    assert nacked(raised.value) and len(calls) == 3
    calls, publish = flaky(ConnectionResetError("lost"))
    with pytest.raises(ConnectionResetError):
        until_confirmed(publish, pauses_s=[0.0, 0.0])
    assert len(calls) == 1, "kombu's own retry handles a lost connection; not twice over"


def test_nacks_are_retried_with_the_publish_policys_pauses() -> None:
    assert nack_pauses_s() == pytest.approx([0.2, 0.7, 1.2, 1.7, 2.0])
