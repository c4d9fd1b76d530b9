"""Celery's consumer, minus the endless reconnecting to a broker that refuses us for good, and
minus native delayed delivery.

Celery's consumer treats every connection error as recoverable: with a deleted vhost or
refused credentials it reconnects several times a second forever, while the process (and its
sweeper thread) look alive. The broker transport knows which errors a reconnect can cure;
on any other, this consumer stops the worker with a failure exit code so that its supervisor
restarts it or shows the crash loop. Selected by the ``worker_consumer`` setting.

Celery adds a ``DelayedDelivery`` step as soon as one queue is a quorum queue: it declares 28
``celery_delayed_*`` queues and exchanges and binds every queue of ours to them, on each start
of the consumer and for every broker URL of a failover list, retrying against a node that is
down. It serves tasks sent with an ETA or countdown, which the worker never sends (retries are
due in PostgreSQL and dispatched by the sweeper), so the consumer's blueprint leaves it out.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import WorkerShutdown
from celery.platforms import EX_FAILURE
from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)

#: Celery's consumer step for ETA tasks on quorum queues, which the worker does not use.
DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class FleetConsumer(Consumer):
    """Gives up, and takes the worker down, on errors reconnecting cannot fix."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc,valid-type]  # a class
        """Celery's consumer steps without native delayed delivery (see the module's doc)."""

        default_steps = tuple(step for step in Consumer.Blueprint.default_steps
                              if step != DELAYED_DELIVERY_STEP)

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
