"""Bus intake without a second publish: a raw bus message runs in the pool as ``coupons.ingest``.

Celery's own consumer reads ``coupons.events`` beside the task queues (``COUPONS_BUS_INTAKE``
``direct``, the default). A message from it carries no task header: before Celery looks at it,
``as_ingest_task`` turns it, in place, into the ``coupons.ingest`` task message the bridge
used to publish (the bytes untouched, base64 when not UTF-8), and Celery then runs it like any
task: in the pool, acknowledged late, once the outcome is committed, put back if the pool
process dies. The broker stores each event once instead of twice, and the main loop no longer
waits for a confirm per event. A prefetch of one per pool slot bounds what is taken from the
bus, so a backlog waits there, and the guard pauses the bus with the task queue.

A body over ``COUPONS_MAX_EVENT_BYTES`` is recorded as rejected here, as the bridge does,
rather than copied through the pool; while the ledger cannot take it, it goes back to the bus.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

from celery import Celery
from kombu import Message

from worker.adapters.rabbitmq.names import TASK_INGEST
from worker.adapters.rabbitmq.publisher import event_argsrepr
from worker.domain.errors import LedgerUnavailable
from worker.domain.events import event_id_in_prefix, oversize_reason
from worker.entrypoints.celery.bridge import _peek
from worker.entrypoints.celery.context import container_of
from worker.usecases.rejection import record_rejection

log = logging.getLogger(__name__)


def is_bus_message(message: Message, events_queue: str) -> bool:
    """Whether a delivery came from the plain-JSON bus (whatever headers a producer set)."""
    return (message.delivery_info or {}).get("routing_key") == events_queue


def as_ingest_task(message: Message, app: Celery, *, max_bytes: int) -> bool:
    """Make a raw bus message the ``coupons.ingest`` task it stands for; False when settled.

    Settled here: an oversize body, recorded and acknowledged (or, the ledger being down,
    handed back to the bus).
    """
    body = message.body if isinstance(message.body, bytes) \
        else str(message.body).encode("utf-8", "surrogatepass")
    if len(body) > max_bytes:
        _record_oversize(message, body, app, max_bytes)
        return False
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    event_id, customer, series = _peek(body, max_bytes)
    task = app.amqp.as_task_v2(
        str(uuid.uuid4()), TASK_INGEST,
        kwargs={"body": text, "encoding": encoding, "content_type": message.content_type,
                "source": "bus", "event_id": event_id},
        argsrepr="()", kwargsrepr=event_argsrepr(event_id, customer, series),
    )
    message.headers = {**(message.headers or {}), **task.headers}
    raw: Any = message  # kombu types the body as text; it holds the bytes received
    raw.body = json.dumps(task.body).encode("utf-8")
    raw.content_type, raw.content_encoding = "application/json", "utf-8"
    raw._decoded_cache = None  # the body it would cache was replaced
    return True


def _record_oversize(message: Message, body: bytes, app: Celery, max_bytes: int) -> None:
    try:
        record_rejection(
            body, oversize_reason(len(body), max_bytes), source="bus",
            deps=container_of(app).deps(), event_id=event_id_in_prefix(body),
            content_type=message.content_type)
    except LedgerUnavailable as exc:
        # The guard pauses the bus within seconds of the ledger going down.
        log.error("intake.oversize_requeued", extra={"size_bytes": len(body), "error": str(exc)})
        message.reject(requeue=True)
        return
    message.ack()
