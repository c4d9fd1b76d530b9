"""Celery's configuration for coupon-worker settings, and the settings an app carries.

Below the app factory (``worker.entrypoints.celery.app``) so that the publisher and the bootsteps
can read it without importing the app, its tasks and its steps. Why each reliability setting is
chosen is told in ``worker.entrypoints.celery.app``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import Celery

from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.names import TASK_INGEST, TASK_ISSUE, TASK_RETRY
from worker.config import Settings
from worker.domain.runtime_policy import PUBLISH_RETRY_POLICY


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for these coupon-worker settings."""
    tasks_queue = topology.tasks_queue(settings)
    retry_queue = topology.retry_queue(settings)
    transport_options = settings.broker_transport_options()
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 60,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_default_queue": tasks_queue.name,
        "task_default_exchange": tasks_queue.exchange.name,
        "task_default_routing_key": tasks_queue.routing_key,
        "task_queues": topology.consumed_queues(settings),
        "task_create_missing_queues": False,
        "task_routes": {
            TASK_ISSUE: {"queue": tasks_queue.name, "routing_key": tasks_queue.routing_key},
            TASK_INGEST: {"queue": tasks_queue.name, "routing_key": tasks_queue.routing_key},
            TASK_RETRY: {"queue": retry_queue.name, "routing_key": retry_queue.routing_key},
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A task killed by the hard time limit may have stopped anywhere, before its outcome
        # was committed: its message goes back to the queue rather than being acknowledged
        # into nothing. Re-running is safe (claims make a second delivery a no-op).
        "task_acks_on_timeout": False,
        # The tasks turn every error into a recorded rejection or a requeue; an exception that
        # escapes them anyway is a bug, and its message is rejected rather than acknowledged.
        "task_acks_on_failure": False,
        # The same for Celery releases that know only the combined setting.
        "task_acks_on_failure_or_timeout": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "task_time_limit": settings.task_hard_time_limit_s,
        "task_soft_time_limit": max(settings.task_hard_time_limit_s - 5.0, 1.0),
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Flower's view; each event is one more confirmed publish from the worker's main loop,
        # so a fleet that needs the last events/s may turn them off (Flower can still enable
        # them at runtime).
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_memory_per_child": None,
        "worker_disable_rate_limits": True,
        # Celery's consumer, exiting (non-zero) on broker errors that reconnecting cannot cure
        # instead of looping, and recording task messages it cannot decode as rejections.
        "worker_consumer": "worker.entrypoints.celery.task_consumer:TaskConsumer",
    }


class LazyConfig(Mapping[str, Any]):
    """Celery's configuration, computed from the settings when Celery first reads it."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            chosen = self._settings()
            self._data = {**celery_config(chosen), "coupon_settings": chosen}
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def settings_of(app: Celery) -> Settings:
    """The coupon-worker settings an app was configured with (configuring it if needed)."""
    settings = app.conf["coupon_settings"]
    assert isinstance(settings, Settings)
    return settings


def producer_app(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (by name): no tasks registered, no worker steps."""
    app = Celery("coupon-worker-producer", set_as_current=False)
    app.config_from_object(LazyConfig(lambda: settings))
    return app
