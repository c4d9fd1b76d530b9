"""Celery's consumer, minus the endless reconnecting to a broker that refuses us for good.

Celery's consumer treats every connection error as recoverable: with a deleted vhost or
refused credentials it reconnects several times a second forever, while the process (and its
sweeper thread) look alive. The broker transport knows which errors a reconnect can cure;
on any other, this consumer stops the worker with a failure exit code so that its supervisor
restarts it or shows the crash loop. Selected by the ``worker_consumer`` setting.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import WorkerShutdown
from celery.platforms import EX_FAILURE
from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


class FleetConsumer(Consumer):
    """Gives up, and takes the worker down, on errors reconnecting cannot fix."""

    def on_connection_error_before_connected(self, exc: Exception) -> None:
        self._give_up_unless_recoverable(exc)
        super().on_connection_error_before_connected(exc)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self._give_up_unless_recoverable(exc)
        super().on_connection_error_after_connected(exc)

    def _give_up_unless_recoverable(self, exc: Exception) -> None:
        conninfo: Any = self.conninfo  # type: ignore[attr-defined]  # set in Consumer.__init__
        recoverable = (tuple(conninfo.recoverable_connection_errors)
                       + tuple(conninfo.recoverable_channel_errors))
        if isinstance(exc, recoverable):
            return
        log.critical("consumer.unrecoverable", extra={"error": repr(exc)})
        # SystemExit: the worker stops warm with this exit code, and its supervisor restarts
        # it (or shows the crash loop) instead of it retrying the same refusal forever.
        raise WorkerShutdown(EX_FAILURE) from exc
