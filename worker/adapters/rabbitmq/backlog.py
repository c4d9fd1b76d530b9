"""How many messages wait in each of the project's queues (the console's overview, the
metrics)."""

from __future__ import annotations

from typing import Any

from kombu import Connection

from worker.adapters.rabbitmq.publisher import BROKER_ERRORS
from worker.config import Settings


def queue_names(settings: Settings) -> dict[str, str]:
    """The project's queues by role."""
    return {"events": settings.events_queue, "tasks": settings.tasks_queue,
            "retry": settings.retry_queue, "dead": settings.dead_queue}


def queue_backlogs(settings: Settings) -> dict[str, int | None]:
    """Ready messages per queue role; None where the broker or the queue did not answer."""
    queues = queue_names(settings)
    found: dict[str, int | None] = dict.fromkeys(queues)
    try:
        with Connection(settings.broker_url,
                        transport_options=settings.broker_transport_options(),
                        connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
            for role, queue in queues.items():
                # A channel each: a passive declare of a missing queue closes its channel.
                try:
                    channel: Any
                    with connection.channel() as channel:
                        _name, waiting, _consumers = channel.queue_declare(queue=queue,
                                                                           passive=True)
                        found[role] = int(waiting)
                except BROKER_ERRORS:
                    found[role] = None
    except BROKER_ERRORS:
        pass  # the broker is down: every count stays unknown, the page still answers
    return found
