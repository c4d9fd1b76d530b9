"""A worker is either consuming or gone: never a process that looks alive and does nothing.

- ``default_node_name()``: one name per process, so any number of workers share a host and a
  vhost (Celery's default, ``celery@<host>``, is one name per host: the second worker's
  exclusive control queue is refused with RESOURCE_LOCKED).
- ``worker.broker.consumer.FleetConsumer`` (the ``worker_consumer`` setting): a broker error
  that no reconnect can cure stops the worker with a failure exit code.
- ``run_worker()``: runs Celery's worker command and returns the exit code Celery computed
  (``app.worker_main`` drops it, so a worker that died of an unrecoverable error exited 0).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, signals
from celery.platforms import EX_FAILURE

log = logging.getLogger(__name__)


def default_node_name(pid: int | None = None) -> str:
    """``coupon-worker-<pid>@<host>`` (``%h`` is expanded by Celery)."""
    return f"coupon-worker-{pid or os.getpid()}@%h"


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv``; the exit code the worker ended with.

    A worker that stopped on its own (an unrecoverable error, a cold shutdown) exits non-zero,
    a warm shutdown (SIGTERM) zero.
    """
    controllers: list[Any] = []

    def remember(sender: Any = None, **_: Any) -> None:
        controllers.append(sender)

    signals.worker_init.connect(remember, weak=False)
    try:
        app.worker_main(argv)
    finally:
        signals.worker_init.disconnect(remember)
    if not controllers:
        return 0  # no worker was started (e.g. --help)
    code = controllers[-1].exitcode
    # None: the worker was terminated (WorkerTerminate) rather than stopped with a code.
    exit_code = EX_FAILURE if code is None else int(code)
    if exit_code:
        lingering = [t.name for t in threading.enumerate()
                     if t.is_alive() and not t.daemon and t is not threading.main_thread()]
        if lingering:
            # Whatever still runs would keep a dead worker's process up: end it now.
            log.critical("worker.exit_forced", extra={"threads": lingering,
                                                      "exit_code": exit_code})
            logging.shutdown()
            os._exit(exit_code)
    return exit_code
