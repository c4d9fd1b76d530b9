"""Celery's consumer as the worker configures it: which publishes wait for a confirm, and how
many messages it holds."""

from __future__ import annotations

import threading
from time import monotonic
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer
from kombu.common import QoS

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


class _ThreadRecordingTimer(Timer):
    """kombu's timer, noting which thread put each entry on its heap."""

    def __init__(self) -> None:
        super().__init__()
        self.entered_from: list[int] = []

    def enter_at(self, entry: Any, eta: float | None = None, priority: int = 0,
                 time: Any = monotonic) -> Any:
        self.entered_from.append(threading.get_ident())
        return super().enter_at(entry, eta, priority, time)


def test_task_events_sent_from_pool_threads_leave_the_loops_timers_to_the_loop() -> None:
    # Given a consumer on a running event loop (kombu's hub, in a thread of its own)
    hub = Hub(timer=_ThreadRecordingTimer())
    loop = threading.Thread(target=hub.run_forever, daemon=True)
    loop.start()
    consumer: Any = object.__new__(TaskConsumer)
    consumer.hub = hub
    flushed = threading.Event()
    consumer._flush_events = flushed.set
    try:
        # When a pool thread (the threads pool sends task-succeeded from there) buffers an
        # event
        sender = threading.Thread(target=consumer.on_send_event_buffered)
        sender.start()
        sender.join()
        # Then the buffer is flushed within the interval, and only the loop's thread touched
        # its timers
        assert flushed.wait(5)
        timer = hub.timer
        assert timer.entered_from and set(timer.entered_from) == {loop.ident}
    finally:
        hub.stop()
        loop.join(5)
        hub.close()


def test_the_prefetch_restored_after_a_reconnect_is_sent_from_the_loops_thread() -> None:
    # Given a consumer on a running event loop, its prefetch lowered by a reconnect
    hub = Hub()
    loop = threading.Thread(target=hub.run_forever, daemon=True)
    loop.start()
    app = create_app(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    sent_from: list[int] = []
    sent = threading.Event()

    def basic_qos(prefetch_count: int) -> None:
        sent_from.append(threading.get_ident())
        sent.set()

    consumer: Any = object.__new__(TaskConsumer)
    consumer.hub, consumer.app = hub, app
    consumer.pool = SimpleNamespace(num_processes=4)
    consumer.prefetch_multiplier = 2
    consumer.qos = QoS(basic_qos, 2)
    consumer.initial_prefetch_count = 2
    consumer._maximum_prefetch_restored = False
    try:
        # When a pool thread acknowledges a task (Celery raises the prefetch from the promise
        # of the ack, in the acknowledging thread)
        acker = threading.Thread(
            target=consumer._restore_prefetch_count_after_connection_restart, args=(None,))
        acker.start()
        acker.join()
        # Then the basic.qos goes out from the loop's thread, never the pool's: the AMQP
        # connection is the loop's alone
        assert sent.wait(5)
        assert sent_from == [loop.ident]
        assert consumer.qos.value == 4
    finally:
        hub.stop()
        loop.join(5)
        hub.close()
