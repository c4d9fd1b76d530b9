"""Celery's consumer as the worker configures it: which publishes wait for a confirm, and how
many messages it holds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from worker.adapters.rabbitmq.celery_config import celery_config
from worker.config import load_settings
from worker.domain.errors import ConfigurationError
from worker.entrypoints.celery.app import create_app
from worker.entrypoints.celery.task_consumer import TaskConsumer


def test_task_events_are_published_without_confirms_and_everything_else_with() -> None:
    # Given the worker's app, confirming every publish by default
    app = create_app(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    consumer: Any = SimpleNamespace(app=app, ensure_connected=lambda conn: conn)
    # When Celery asks its consumer for the connection its event dispatcher publishes on
    events = TaskConsumer.connection_for_write(consumer, heartbeat=None)
    # Then task events (Flower's) do not wait for RabbitMQ's confirm on the main loop...
    assert events.transport_options["confirm_publish"] is False
    # ...while tasks, retries and dead letters still do
    assert app.connection_for_write().transport_options["confirm_publish"] is True
    assert events.transport_options.keys() == app.connection_for_write().transport_options.keys()


def test_the_prefetch_is_the_settings_and_two_unless_told() -> None:
    # A finished pool process finds its next message in the worker: two per process by default
    default = celery_config(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    assert default["worker_prefetch_multiplier"] == 2
    one = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//",
                        prefetch_multiplier=1)
    assert celery_config(one)["worker_prefetch_multiplier"] == 1
    for out_of_range in (0, 17):
        with pytest.raises(ConfigurationError, match="COUPONS_PREFETCH_MULTIPLIER"):
            load_settings(prefetch_multiplier=out_of_range)
