"""The consumption guard (consumer step, on the event loop): carries out pauses and back-pressure.

Every ``GUARD_INTERVAL_S`` it cancels or restores the task and retry queues' consumers as the
sweeper's last ``ConsumptionPause`` says (messages stay in RabbitMQ meanwhile), and lets the
bridge forward only as far as the task queue has room (``worker.domain.policy.bridge_high_water``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from worker.adapters.rabbitmq.publisher import BROKER_ERRORS
from worker.domain.runtime_policy import QueueRole, bridge_high_water, bridge_room
from worker.entrypoints.celery.context import links_of, step_settings

log = logging.getLogger(__name__)

GUARD_INTERVAL_S = 0.25


class ConsumptionGuard(bootsteps.StartStopStep):
    """Cancels and restores queue consumers as the sweeper's last pause decision says."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None
        self._paused: set[str] = set()

    def start(self, c: Any) -> None:
        # Not forgotten on a restart (a broker reconnect): Celery keeps a cancelled queue
        # deselected, so the new task consumer leaves it out too, and only this step's
        # add_task_queue brings it back once the pause is over.
        self._tref = c.timer.call_repeatedly(GUARD_INTERVAL_S, self._check, (c,))

    def stop(self, c: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _check(self, c: Any) -> None:
        self._apply_backpressure(c)
        settings = step_settings(c)
        pause = links_of(c.app).pause
        # Fresh events come by the task queue and, read directly, by the bus: both pause.
        bus = [settings.events_queue] if settings.bus_intake == "direct" else []
        queues_of: dict[QueueRole, list[str]] = {"tasks": [*bus, settings.tasks_queue],
                                                 "retry": [settings.retry_queue]}
        wanted = {queue for role in pause.roles for queue in queues_of[role]}
        for queue in sorted(wanted - self._paused):
            log.error("consumer.paused", extra={"queue": queue, "reason": pause.reason})
            c.cancel_task_queue(queue)
        for queue in sorted(self._paused - wanted):
            log.warning("consumer.resumed", extra={"queue": queue})
            c.add_task_queue(queue)
        self._paused = wanted
        links_of(c.app).paused_queues = frozenset(wanted)

    def _apply_backpressure(self, c: Any) -> None:
        """Let the bridge forward only while the task queue is short (``bridge_high_water``)."""
        bridge = links_of(c.app).bridge
        settings = step_settings(c)
        if bridge is None or settings.bus_intake != "bridge":
            # Direct intake has no bridge to hold back: reading the depth would cost the
            # event loop a broker round trip four times a second for nothing.
            return
        try:
            _name, waiting, _consumers = c.connection.default_channel.queue_declare(
                queue=settings.tasks_queue, passive=True)
        except BROKER_ERRORS:
            return
        bridge.high_water = bridge_high_water(c.pool.num_processes)
        bridge.release(room=bridge_room(bridge.high_water, waiting))
