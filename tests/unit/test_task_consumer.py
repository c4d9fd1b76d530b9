"""Celery's consumer as the worker configures it: which publishes wait for a confirm."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from worker.broker.task_consumer import TaskConsumer
from worker.celery_app import create_app
from worker.config import load_settings


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
