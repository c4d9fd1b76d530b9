"""Celery's consumer for coupon-worker (the ``worker_consumer`` setting)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from kombu import Message
from vine import promise

from worker.adapters.rabbitmq.celery_config import settings_of
from worker.domain.errors import LedgerUnavailable
from worker.domain.events import TOO_DEEP
from worker.domain.text import printable
from worker.entrypoints.celery.consumer import FleetConsumer
from worker.entrypoints.celery.context import container_of
from worker.entrypoints.celery.intake import as_ingest_task, is_bus_message
from worker.usecases.rejection import record_rejection

log = logging.getLogger(__name__)

#: How long task events (Flower's view) wait in the main loop's buffer before they are sent
#: together. Celery sends them on the next turn of the loop, one small publish each turn.
EVENTS_FLUSH_INTERVAL_S: Final = 0.1


class TaskConsumer(FleetConsumer):
    """Celery's consumer, keeping the task messages it cannot decode as rejections.

    Celery acknowledges such a message and only logs it (a ``coupons.issue`` whose event is
    nested past the interpreter's recursion limit, or a hand-made message that is not JSON),
    so the payload would be gone. It is recorded instead, from this loop, like an oversize
    bus body, and acknowledged; should the ledger refuse, Celery's own handling (log with the
    body, acknowledge) follows.
    """

    def connection_for_write(self, url: str | None = None,
                             heartbeat: float | None = None) -> Any:
        """The connection Celery publishes task events (Flower) on: without confirms.

        Celery asks for it only for its event dispatcher. With the broker's setting
        (``confirm_publish``), every task-received, -started and -succeeded event waited for
        RabbitMQ's confirm on the main loop, which also feeds the pool: about half of the main
        process's time at full load. A lost monitoring event costs Flower one line; nothing
        the ledger or the exactly-once promise rests on goes through this connection.
        """
        conn = self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False})
        return self.ensure_connected(conn)

    #: When the scheduled flush of buffered task events is due (None: none scheduled).
    _events_flush_due: float | None = None

    def on_send_event_buffered(self) -> Any:  # celery-types says a callable; Celery returns None
        """Send buffered task events within ``EVENTS_FLUSH_INTERVAL_S``, many per publish.

        Celery flushes on the next turn of the loop, so at full load nearly every task-received,
        -started and -succeeded event was a publish of its own: a third of the main process's
        work, on the loop that also feeds the pool. A full buffer (Celery's limit) is still sent
        at once. Flower sees each event up to that interval later.
        """
        celery_consumer: Any = self  # the hub and _flush_events are not in the type stubs
        hub = celery_consumer.hub
        if hub is None:
            return super().on_send_event_buffered()
        now = time.monotonic()
        due = self._events_flush_due
        # A flush overdue by a whole interval had its timer dropped (the loop was reset after
        # a lost connection): schedule another.
        if due is not None and now < due + EVENTS_FLUSH_INTERVAL_S:
            return
        self._events_flush_due = now + EVENTS_FLUSH_INTERVAL_S
        # Under the threads pool, task-started and -succeeded are sent from the pool's
        # threads, and the loop's timers are a heap only its own thread may touch: pushed onto
        # from another thread, entries were lost (a chaos run's worker stopped beating, its
        # heartbeat timer gone, while it still held its consumers). call_soon is kombu's
        # thread-safe way onto the loop.
        hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:
        celery_consumer: Any = self
        celery_consumer.hub.call_later(EVENTS_FLUSH_INTERVAL_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._events_flush_due = None
        celery_consumer: Any = self
        celery_consumer._flush_events()

    def _restore_prefetch_count_after_connection_restart(self, p: Any, *args: Any) -> None:
        """Celery's step back up to the full prefetch after a reconnect, run on the loop.

        After a lost connection Celery lowers the prefetch and raises it again as each task
        is acknowledged, from the promise of the task's ack, in the thread that acknowledged.
        Under the threads pool that is a pool thread, and the ``basic.qos`` it sent raced the
        loop on the one AMQP connection: a chaos run's worker stopped consuming for good
        right after ``close_all_connections`` (heartbeat stale, consumers still registered,
        its prefetched events held unacknowledged). The loop's own thread sends it instead.
        """
        celery_consumer: Any = self  # neither the hub nor this method is in the type stubs
        base: Any = super()
        hub, restore = celery_consumer.hub, base._restore_prefetch_count_after_connection_restart
        if hub is None:
            restore(p, *args)
        else:
            hub.call_soon(restore, p, *args)

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], Any]:
        """Celery's handler of every delivery, taking raw bus messages in as tasks first."""
        handle = super().create_task_handler(promise)
        settings = settings_of(self.app)
        if settings.bus_intake != "direct":
            return handle
        events_queue, max_bytes = settings.events_queue, settings.max_event_bytes

        def on_message(message: Message) -> Any:
            if is_bus_message(message, events_queue) and not as_ingest_task(
                    message, self.app, max_bytes=max_bytes):
                return None
            return handle(message)

        return on_message

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, RecursionError):
            cause = cause.__cause__ or cause.__context__
        detail = TOO_DEEP if cause is not None else printable(str(exc), limit=300)
        if not self._keep(message, f"task message cannot be decoded: {detail}"):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        if not self._keep(message, "not a task message: no task name in its headers"):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name = printable(str((message.headers or {}).get("task")), limit=200)
        if not self._keep(message, f"no such task: {name!r} (this worker runs "
                                   "coupons.issue, coupons.ingest and coupons.retry)"):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        detail = printable(str(exc), limit=300)
        if not self._keep(message, f"invalid task message: {detail}"):
            super().on_invalid_task(body, message, exc)

    def _keep(self, message: Message, reason: str) -> bool:
        """Record a task message Celery would drop with a log line, and acknowledge it;
        False when it could not be recorded (Celery's own handling follows)."""
        body = message.body if isinstance(message.body, bytes) \
            else str(message.body).encode("utf-8", "surrogatepass")
        try:
            record_rejection(body, reason, source="task",
                                      deps=container_of(self.app).deps(),
                                      content_type=message.content_type)
        except LedgerUnavailable as exc:
            # The database is down: the message waits on its queue (the guard pauses the
            # consumers within seconds) rather than being dropped unrecorded.
            log.error("task.refused_requeued", extra={"size_bytes": len(body),
                                                      "error": str(exc)})
            message.reject(requeue=True)
            return True
        except Exception:
            log.exception("task.undecodable_not_recorded", extra={"size_bytes": len(body)})
            return False
        message.ack()
        return True
