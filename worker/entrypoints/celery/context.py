"""What a bootstep reaches from its Celery app: the settings, the container and the links.

The container is the one object the composition root (``worker.entrypoints.celery.app``) attaches to
the app; everything else a step needs is reached through it.
"""

from __future__ import annotations

from typing import Any

from worker.adapters.rabbitmq.celery_config import settings_of
from worker.adapters.rabbitmq.links import StepLinks
from worker.bootstrap import Container
from worker.config import Settings

__all__ = ["PREFORK_POOL", "SUPPORTED_POOLS", "THREADS_POOL", "container_of", "links_of",
           "pool_name", "settings_of", "step_settings"]

PREFORK_POOL = "celery.concurrency.prefork:TaskPool"
THREADS_POOL = "celery.concurrency.thread:TaskPool"
#: The pools the worker keeps its promises on. Prefork: a process per task, ended by the hard
#: time limit. Threads: every deadline is kept without a signal (HTTP timeouts and a total
#: deadline per call, the statement timeout, leases renewed only within the task's deadline).
#: Not gevent or eventlet: they need the standard library patched before any import, and a
#: stretch of CPU in one task would stop every other, the claims' heartbeat included
#: (docs/threads-pool.md, "Why not gevent").
SUPPORTED_POOLS = {"prefork": PREFORK_POOL, "threads": THREADS_POOL}


def pool_name(worker: Any) -> str:
    """Which pool a worker (Celery's ``WorkController``) runs: ``prefork``, ``threads``, or
    Celery's path of any other."""
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}:" \
        f"{getattr(pool, '__name__', '')}"
    for short, path in SUPPORTED_POOLS.items():
        if name in (short, path):
            return short
    return name


def container_of(app: Any) -> Container:
    """The app's per-process dependencies (``worker.bootstrap.Container``)."""
    container: Container = app.coupon_container
    return container


def links_of(app: Any) -> StepLinks:
    """How the steps of this app's worker find each other."""
    return container_of(app).links


def step_settings(parent: Any) -> Settings:
    """The settings of a step's parent (the worker or its consumer)."""
    return settings_of(parent.app)
