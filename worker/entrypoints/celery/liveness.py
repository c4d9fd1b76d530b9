"""A worker is either consuming or gone: never a process that looks alive and does nothing.

- ``default_node_name()``: one name per process, so any number of workers share a host and a
  vhost (Celery's default, ``celery@<host>``, is one name per host: the second worker's
  exclusive control queue is refused with RESOURCE_LOCKED).
- ``worker.entrypoints.celery.consumer.FleetConsumer`` (the ``worker_consumer`` setting): a broker
  error that no reconnect can cure stops the worker with a failure exit code.
- ``Heartbeat`` (consumer step): a timer on the consumer's event loop writes this worker's
  heartbeat file (``worker.health``); it goes stale as soon as the loop stops running.
- ``run_worker()``: runs Celery's worker command and returns the exit code Celery computed
  (``app.worker_main`` drops it, so a worker that died of an unrecoverable error exited 0).
  The command alone, not Celery's whole command line: that one loads every plugin installed
  (Flower and its web server, an interactive shell), which the pool's children then carry.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals
from celery.platforms import EX_FAILURE

from worker.adapters.rabbitmq.celery_config import settings_of
from worker.config import Settings
from worker.entrypoints.celery.context import links_of
from worker.health import Heartbeat as HeartbeatRecord
from worker.health import remove_heartbeat, write_heartbeat
from worker.optional_modules import WORKER_UNUSED, without

log = logging.getLogger(__name__)


def default_node_name(pid: int | None = None) -> str:
    """``coupon-worker-<pid>@<host>`` (``%h`` is expanded by Celery)."""
    return f"coupon-worker-{pid or os.getpid()}@%h"


def _settings(consumer: Any) -> Settings:
    return settings_of(consumer.app)


class Heartbeat(bootsteps.StartStopStep):
    """Writes the heartbeat file from the consumer's event loop while it runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._trefs: list[Any] = []
        self._directory: Path | None = None
        self._interval_s = 5.0
        self._started_at = time.time()
        self._failing = False

    def start(self, c: Any) -> None:
        settings = _settings(c)
        self._directory = Path(settings.heartbeat_dir)
        self._interval_s = settings.heartbeat_interval_s
        # Timer entries fire only from the running event loop: the first beat proves the
        # loop runs, not merely that the steps started.
        self._trefs = [c.timer.call_after(0.0, self._beat, (c,)),
                       c.timer.call_repeatedly(self._interval_s, self._beat, (c,))]

    def stop(self, c: Any) -> None:
        # A connection lost: the file goes stale by itself unless the consumer comes back.
        for tref in self._trefs:
            tref.cancel()
        self._trefs = []

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self._directory is not None:
            remove_heartbeat(self._directory, c.hostname)

    def _beat(self, c: Any) -> None:
        if self._directory is None:
            return
        record = HeartbeatRecord(node=c.hostname, pid=os.getpid(), host=socket.gethostname(),
                                 interval_s=self._interval_s, beat_at=time.time(),
                                 started_at=self._started_at,
                                 metrics_port=links_of(c.app).metrics_port)
        try:
            write_heartbeat(self._directory, record)
        except OSError as exc:
            # Unhealthy is the right verdict for a worker that cannot write its heartbeat;
            # the loop itself must go on consuming.
            if not self._failing:
                log.error("heartbeat.write_failed", extra={"dir": str(self._directory),
                                                           "error": str(exc)})
            self._failing = True
        else:
            self._failing = False


def install(app: Celery) -> None:
    app.steps["consumer"].add(Heartbeat)


def _celery_worker_command() -> tuple[Any, Any]:
    """Celery's ``CLIContext`` and ``worker`` command, imported without the optional modules
    a worker has no use for (``worker.optional_modules``): ``celery.bin.base`` would build a
    Pygments lexer and formatter for its help texts, ``celery.apps.worker`` load psutil."""
    with without(WORKER_UNUSED):
        import celery.apps.worker  # noqa: F401  (the command imports it when it starts a worker)
        from celery.bin.base import CLIContext
        from celery.bin.worker import worker as worker_command
    return CLIContext, worker_command


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv``; the exit code the worker ended with.

    A worker that stopped on its own (an unrecoverable error, a cold shutdown) exits non-zero,
    a warm shutdown (SIGTERM) zero.
    """
    controllers: list[Any] = []

    def remember(sender: Any = None, **_: Any) -> None:
        controllers.append(sender)

    signals.worker_init.connect(remember, weak=False)
    CLIContext, worker_command = _celery_worker_command()
    from click.exceptions import Exit

    args = argv[1:] if argv[:1] == ["worker"] else argv
    try:
        worker_command.main(args=args, prog_name="celery worker", standalone_mode=False,
                            obj=CLIContext(app=app, no_color=False, workdir=None))
    except Exit:
        pass
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
