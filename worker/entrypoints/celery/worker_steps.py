"""What runs inside a worker besides the tasks, installed on the app in one place.

- ``EventsBridge`` (``worker.entrypoints.celery.bridge``, consumer step): the plain-JSON bus to the
  task queue.
- ``Sweeper`` (``worker.entrypoints.celery.sweeper``, worker step): due retries, crashed claims,
  dead letters, and the pause decision.
- ``ConsumptionGuard`` (``worker.entrypoints.celery.guard``, consumer step): carries out pauses and
  the bridge's back-pressure.
- ``MetricsServer`` (``worker.entrypoints.celery.metrics_step``, worker step): the Prometheus
  endpoint.
- ``BuildInfo`` and ``check_schema`` (``worker.entrypoints.celery.metrics_step``): the version and
  schema, checked at start-up (``worker_init``), logged, in the metrics and in the worker's stats.
- ``TaskConsumer`` (``worker.entrypoints.celery.task_consumer``): Celery's consumer, recording task
  messages it cannot decode.
- ``close_resources`` and ``close_process_resources``: at shutdown, the process's database pool
  disposed and Capillary's HTTP sessions closed (the metrics endpoint stops with its step).
The steps share a ``StepLinks`` (``worker.adapters.rabbitmq.links``) through the app's container.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

from celery import Celery, current_app, signals

from worker.config import load_settings
from worker.entrypoints.celery.bridge import EventsBridge, _peek
from worker.entrypoints.celery.context import (
    PREFORK_POOL,
    SUPPORTED_POOLS,
    THREADS_POOL,
    container_of,
    pool_name,
)
from worker.entrypoints.celery.guard import GUARD_INTERVAL_S, ConsumptionGuard
from worker.entrypoints.celery.metrics_step import (
    BuildInfo,
    MetricsServer,
    _check_metrics_dir,
    _remove_metrics_dir,
    check_schema,
    prepare_metrics_dir,
    task_finished,
)
from worker.entrypoints.celery.sweeper import Sweeper
from worker.entrypoints.celery.task_consumer import TaskConsumer
from worker.logs import configure_logging, write_from_one_thread

# Importable from here, where they used to be defined.
__all__ = ["GUARD_INTERVAL_S", "PREFORK_POOL", "THREADS_POOL", "ConsumptionGuard", "EventsBridge",
           "MetricsServer", "Sweeper", "TaskConsumer", "_peek", "install", "prepare_metrics_dir"]

log = logging.getLogger(__name__)


def _require_supported_pool(sender: Any = None, **_: Any) -> None:
    """Refuse a pool on which a stalled attempt could outlive its claim (solo, gevent…), and
    size this process's dependencies for the threads pool's concurrency."""
    name = pool_name(sender)
    if name not in SUPPORTED_POOLS:
        log.critical("worker.pool_refused", extra={"pool": name})
        raise SystemExit(f"coupon-worker runs on the prefork or threads pool, not {name}: "
                         "see docs/threads-pool.md")
    if name == "threads":
        # One process runs every task: its HTTP pool must hold a connection per thread.
        container_of(sender.app).threads = int(getattr(sender, "concurrency", 1) or 1)
        # ...and its threads must not take turns at writing to stderr.
        write_from_one_thread()


def _freeze_before_fork(sender: Any = None, **_: Any) -> None:
    """Keep what the main process loaded out of the collector's sight before the pool forks.

    A child's collections otherwise write to every object they visit, copying the pages the
    fork shared (the modules, the settings, the app): each child's private memory grows with
    its first collections. Frozen objects are never collected, and are meant to live as long
    as the process anyway.

    Before that, the start-up's garbage is collected rather than frozen, and the C heap's free
    pages go back to the system: every page resident in the main process at the fork is
    resident in each pool process too.
    """
    if pool_name(sender) == "prefork":
        gc.collect()
        release_free_heap()
        gc.freeze()


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``); False where
    the C library has no such call (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _setup_logging(**_: Any) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours is structured."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)


def close_resources(sender: Any = None, **_: Any) -> None:
    """``worker_shutdown`` (sent once the steps have stopped, the sweeper's threads with them):
    the main process's database pool disposed and Capillary's sessions closed."""
    app = getattr(sender, "app", None)
    if app is not None and hasattr(app, "coupon_container"):
        container_of(app).close()


def close_process_resources(**_: Any) -> None:
    """``worker_process_shutdown``: a pool process that exits lets its own connections go (the
    pool process runs the app it was started for as the current one)."""
    app: Any = current_app
    if hasattr(app, "coupon_container"):
        container_of(app).close()


def install(app: Celery) -> None:
    """Add the steps and signal handlers to ``app``."""
    app.steps["consumer"].add(EventsBridge)
    app.steps["consumer"].add(ConsumptionGuard)
    app.steps["worker"].add(Sweeper)
    app.steps["worker"].add(MetricsServer)
    app.steps["worker"].add(BuildInfo)
    signals.worker_init.connect(_require_supported_pool, weak=False)
    signals.worker_init.connect(check_schema, weak=False)
    signals.worker_init.connect(_check_metrics_dir, weak=False)
    # Last: after everything the main process loads before forking.
    signals.worker_init.connect(_freeze_before_fork, weak=False)
    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.worker_shutdown.connect(_remove_metrics_dir, weak=False)
    signals.worker_shutdown.connect(close_resources, weak=False)
    signals.worker_process_shutdown.connect(close_process_resources, weak=False)
    signals.task_postrun.connect(task_finished, weak=False)
