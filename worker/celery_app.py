"""The Celery app: broker, queues, routes and the reliability settings, chosen deliberately.

``celery -A worker.celery_app worker`` works as well as ``coupon-worker worker``. Nothing is
read or connected at import: the settings are loaded when Celery first reads its
configuration (a lazy mapping), so importing this module is free.

Reliability settings and why:
- ``task_acks_late``: a message is acknowledged after the task returns, i.e. after the outcome
  is committed to the ledger. Celery's default (ack before running) loses the event if the
  worker dies mid-task.
- ``task_reject_on_worker_lost``: a child killed mid-task (SIGKILL, OOM, time limit) puts its
  message back on the queue instead of acking it. Re-running is safe because the ledger claims
  entities before calling Capillary and reconciles a claim whose worker died.
- ``task_acks_on_timeout = False``: a task past its hard time limit is killed wherever it was,
  maybe before its outcome was committed, so its message goes back too. The ledger's statement
  and lock timeouts fail a stalled task well before that limit (``LedgerUnavailable``, which
  the task turns into a requeue); the time limit is the last resort.
- ``worker_prefetch_multiplier = 1``: a worker holds at most one unacked message per process, so
  a crash re-delivers little and a slow worker does not hoard events its peers could run.
- ``broker_transport_options.confirm_publish``: every publish waits for the broker's confirm;
  with durable queues and persistent messages nothing is acknowledged that the broker did not
  store.
- no ETA/countdown anywhere: scheduled retries wait in PostgreSQL, not in worker memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import Celery

from worker.broker import topology
from worker.config import Settings, load_settings

TASK_ISSUE = "coupons.issue"
TASK_INGEST = "coupons.ingest"
TASK_RETRY = "coupons.retry"


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
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0.2,
                                      "interval_step": 0.5, "interval_max": 2.0},
        "task_time_limit": settings.task_hard_time_limit_s,
        "task_soft_time_limit": max(settings.task_hard_time_limit_s - 5.0, 1.0),
        "worker_prefetch_multiplier": 1,
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
        "worker_consumer": "worker.broker.worker_steps:TaskConsumer",
    }


class _LazyConfig(Mapping[str, Any]):
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


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (or the environment's, read when first configured)."""
    app = Celery("coupon-worker", set_as_current=False)
    app.config_from_object(_LazyConfig(lambda: settings or load_settings()))
    from worker import tasks
    from worker.bootstrap import Container
    from worker.broker import liveness, worker_steps
    from worker.broker.publisher import CeleryPublisher

    app.coupon_container = Container(  # type: ignore[attr-defined]
        lambda: settings_of(app), lambda chosen: CeleryPublisher(app, chosen))
    tasks.register(app)
    worker_steps.install(app)
    liveness.install(app)
    return app


def settings_of(app: Celery) -> Settings:
    """The coupon-worker settings an app was configured with (configuring it if needed)."""
    settings = app.conf["coupon_settings"]
    assert isinstance(settings, Settings)
    return settings


app = create_app()
