"""The bus bridge (consumer step): plain JSON from ``coupons.events`` to ``coupons.ingest``.

Each message is forwarded, bytes untouched, as a ``coupons.ingest`` task; the raw message is
acknowledged only once the broker confirmed the task message, so nothing is lost between the
two. A body over ``COUPONS_MAX_EVENT_BYTES`` is not forwarded but recorded as rejected here.
How far the task queue may grow before the bridge holds messages is ``worker.domain.policy``'s
decision, applied by the guard (``worker.entrypoints.celery.guard``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections import deque
from typing import Any

from celery import Celery, bootsteps
from kombu import Consumer, Message

from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.names import TASK_INGEST
from worker.adapters.rabbitmq.publisher import BROKER_ERRORS, event_argsrepr, why
from worker.domain.errors import LedgerUnavailable
from worker.domain.events import EVENT_ID_MAX_CHARS, event_id_in_prefix, oversize_reason
from worker.domain.runtime_policy import BACKLOG_MIN, PUBLISH_RETRY_POLICY
from worker.domain.text import printable
from worker.entrypoints.celery.context import container_of, links_of, step_settings
from worker.usecases.rejection import record_rejection

log = logging.getLogger(__name__)

BRIDGE_PREFETCH = 20
# Flower shows these labels; a sender decides what is in them, so they are short and printable.
LABEL_MAX_CHARS = 80
SERIES_LABEL_MAX_CHARS = 120


def _peek(body: bytes, max_bytes: int) -> tuple[str | None, str | None, str | None]:
    """Event id, customer and series of a message, as printable labels for Flower.

    None where unreadable. The task validates the message and records whatever is wrong with
    it; this peek only has to never raise (deep nesting used to raise RecursionError here,
    outside any handler, and the message was never recorded).
    """
    if len(body) > max_bytes:
        return None, None, None
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return None, None, None
        candidate = data.get("eventId")
        event_id = (printable(candidate) if isinstance(candidate, str)
                    and 0 < len(candidate) <= EVENT_ID_MAX_CHARS else None)
        customer = data.get("customer")
        label = None
        if isinstance(customer, dict):
            for name in ("id", "mobile", "email", "externalId"):
                value = customer.get(name)
                if isinstance(value, str | int) and value:
                    label = printable(f"{name}:{value}", limit=LABEL_MAX_CHARS)
                    break
        series = data.get("seriesIds")
        series_label = (printable(json.dumps(series), limit=SERIES_LABEL_MAX_CHARS)
                        if series is not None else None)
    except (ValueError, TypeError, RecursionError):
        return None, None, None
    return event_id, label, series_label


class EventsBridge(bootsteps.ConsumerStep):
    """Forwards plain-JSON bus messages to the task queue, untouched.

    Back-pressure: while the task queue holds more than its high-water mark, messages are held
    here unacknowledged instead of forwarded; the consumer's prefetch bounds how many, so the
    rest of a backlog waits on the bus. ``ConsumptionGuard`` releases them as the pool drains.
    """

    def get_consumers(self, channel: Any) -> list[Consumer]:
        settings = step_settings(self._consumer)
        if settings.bus_intake != "bridge":
            # Celery's consumer reads the bus itself (``worker.entrypoints.celery.intake``)
            return []
        self._max_bytes = settings.max_event_bytes
        queue = topology.events_queue(settings)
        return [
            Consumer(channel, queues=[queue], on_message=self._on_message,
                     prefetch_count=BRIDGE_PREFETCH, no_ack=False)
        ]

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._consumer = parent
        self._max_bytes = 65_536
        self._held: deque[Message] = deque()
        self._last_held_tag: object = None
        #: Task messages forwarded since the guard last read the task queue's depth.
        self.forwarded = 0
        self.high_water = BACKLOG_MIN
        links_of(parent.app).bridge = self

    def stop(self, c: Any) -> None:
        self._held.clear()  # unacknowledged: the broker redelivers them
        super().stop(c)

    def _on_message(self, message: Message) -> None:
        if self._held or self.forwarded >= self.high_water:
            self._held.append(message)
            return
        if not self._settle(message):
            self._held.append(message)

    def release(self, room: int) -> None:
        """Forward held messages while the task queue has ``room``."""
        self.forwarded = 0
        while self._held and self.forwarded < room:
            if not self._settle(self._held[0]):
                return  # still first in line: tried again on the next release
            self._held.popleft()

    def _settle(self, message: Message) -> bool:
        """Forward, record or hand back one message; False when it must wait, held."""
        try:
            return self._forward(message)
        except Exception:
            # No message may end the consumer: it would come back to the next worker and end
            # that one too. Held, unacknowledged and in order, it waits for the next release.
            log.exception("bridge.forward_error")
            return False

    def _forward(self, message: Message) -> bool:
        body = message.body if isinstance(message.body, bytes) \
            else str(message.body).encode("utf-8", "surrogatepass")
        if len(body) > self._max_bytes:
            return self._record_oversize(message, body)
        try:
            text, encoding = body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode("ascii"), "base64"
        event_id, customer, series = _peek(body, self._max_bytes)
        app: Celery = self._consumer.app
        try:
            app.send_task(
                TASK_INGEST,
                kwargs={"body": text, "encoding": encoding, "content_type": message.content_type,
                        "source": "bus", "event_id": event_id},
                argsrepr="()",
                kwargsrepr=event_argsrepr(event_id, customer, series),
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
        except BROKER_ERRORS as exc:
            # Held, not handed back: handed back, the message would return at once and be
            # refused again, many times a second, for as long as the broker refuses. Held, it
            # is tried again on the guard's next release, and logged and counted once.
            if self._last_held_tag != message.delivery_tag:
                self._last_held_tag = message.delivery_tag
                log.error("bridge.forward_failed",
                          extra={"event_id": event_id, "error": why(exc)})
                container_of(app).metrics.bridge_forward_failures.inc()
            return False
        message.ack()
        self.forwarded += 1
        return True

    def _record_oversize(self, message: Message, body: bytes) -> bool:
        """Record a body over the size limit as rejected, here, instead of forwarding it.

        Forwarding would copy the whole body into the task queue, through the consumer's
        decoder and the pool's pipe, only to be refused there; a small marker task instead
        would lose the bytes support needs to fix and resubmit the event. One insert on this
        loop keeps them whole, for messages that should not exist. If the ledger cannot take
        it now, the message stays held (unacknowledged, in order) and is tried again on the
        next release, the way the bus waits while the database is down.
        """
        deps = container_of(self._consumer.app).deps()
        try:
            record_rejection(
                body, oversize_reason(len(body), self._max_bytes), source="bus", deps=deps,
                event_id=event_id_in_prefix(body), content_type=message.content_type)
        except LedgerUnavailable as exc:
            if self._last_held_tag != message.delivery_tag:  # once per message, not per retry
                self._last_held_tag = message.delivery_tag
                log.error("bridge.oversize_held",
                          extra={"size_bytes": len(body), "error": str(exc)})
            return False
        message.ack()
        return True
