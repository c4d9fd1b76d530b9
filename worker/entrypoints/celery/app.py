"""The Celery app: broker, queues, routes and the reliability settings, chosen deliberately.

``celery -A worker.entrypoints.celery.app worker`` works as well as ``coupon-worker worker``.
Nothing is read or connected at import: the settings are loaded when Celery first reads its
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
- ``worker_prefetch_multiplier = 2`` (``COUPONS_PREFETCH_MULTIPLIER``): a worker holds at most two
  unacked messages per process. A process that finishes finds its next message already in the
  worker instead of waiting for the ack and a new delivery from RabbitMQ (at full load that wait
  was a tenth of a slot's cycle); a crash re-delivers little (claims make re-running safe) and a
  slow worker holds at most one event per process that a peer could have run.
- ``broker_transport_options.confirm_publish``: every publish waits for the broker's confirm;
  with durable queues and persistent messages nothing is acknowledged that the broker did not
  store.
- no ETA/countdown anywhere: scheduled retries wait in PostgreSQL, not in worker memory.
"""

from __future__ import annotations

from celery import Celery

from worker import tracing
from worker.adapters.rabbitmq.celery_config import LazyConfig, celery_config, settings_of
from worker.adapters.rabbitmq.names import TASK_INGEST, TASK_ISSUE, TASK_RETRY
from worker.bootstrap import worker_container
from worker.config import Settings, load_settings
from worker.entrypoints.celery import liveness, tasks, worker_steps

# Kept importable from here, where they used to be defined.
__all__ = ["TASK_INGEST", "TASK_ISSUE", "TASK_RETRY", "app", "celery_config", "create_app",
           "settings_of"]


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (or the environment's, read when first configured)."""
    app = Celery("coupon-worker", set_as_current=False)
    app.config_from_object(LazyConfig(lambda: settings or load_settings()))
    app.coupon_container = worker_container(  # type: ignore[attr-defined]
        app, lambda: settings_of(app))
    tasks.register(app)
    worker_steps.install(app)
    liveness.install(app)
    tracing.install_celery(lambda: settings_of(app))
    return app


app = create_app()
