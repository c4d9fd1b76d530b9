"""How many messages wait in each of the project's queues (the console's overview, the
metrics)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from kombu import Connection

from worker.adapters.rabbitmq.publisher import BROKER_ERRORS
from worker.config import Settings


def queue_names(settings: Settings) -> dict[str, str]:
    """The project's queues by role."""
    return {"events": settings.events_queue, "tasks": settings.tasks_queue,
            "retry": settings.retry_queue, "dead": settings.dead_queue}


#: How long a read of the depths may take: a broker that stops answering (a partition) must
#: not hold the scrape, nor the scrapes queued behind it, for ever.
READ_TIMEOUT_S = 5.0


class QueueBacklogs:
    """Reads the queues' depths over one connection, kept between reads.

    Every worker of a fleet is scraped every few seconds: opening a connection for each read
    cost RabbitMQ a handshake, and two lines in its log, per worker and scrape. A connection
    the broker dropped (a restart, a node gone) is noticed at the next read, which opens a new
    one and reads again, once. Safe to share between threads (the reads take turns).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._queues = queue_names(settings)
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        #: Connections opened so far.
        self.opened = 0

    def read(self) -> dict[str, int | None]:
        """Ready messages per queue role; None where the broker or the queue did not answer.

        At most one read's timeout on a kept connection that went silent, or a connect
        timeout and a read's on a new one: a scrape (Prometheus gives it 10 s by default) is
        never held longer.
        """
        unknown: dict[str, int | None] = dict.fromkeys(self._queues)
        if not self._lock.acquire(timeout=2 * READ_TIMEOUT_S):
            return unknown  # a read still waits on the broker
        try:
            kept = self._connection is not None
            try:
                return self._read(self._connected())
            except TimeoutError:
                # A broker that stopped answering (a partition, a hung node) would be as
                # silent to a new connection: unknown now, a new connection next time.
                self._drop(graceful=False)
                return unknown
            except BROKER_ERRORS:
                self._drop()
                if not kept:
                    return unknown
            # The kept connection was gone (a restart, a failover): read on a new one, once.
            try:
                return self._read(self._connected())
            except BROKER_ERRORS:
                self._drop(graceful=False)
                return unknown
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connected(self) -> Connection:
        if self._connection is None:
            options = self._settings.broker_transport_options()
            if self._settings.broker_url.startswith(("amqp", "pyamqp")):
                options.update(read_timeout=READ_TIMEOUT_S, write_timeout=READ_TIMEOUT_S)
            connection = Connection(self._settings.broker_url, transport_options=options,
                                    connect_timeout=3)
            try:
                # One try: ``read`` decides whether another is worth it.
                connection.ensure_connection(max_retries=0)
            except BaseException:
                connection.collect()
                raise
            self._connection = connection
            self.opened += 1
        return self._connection

    def _read(self, connection: Connection) -> dict[str, int | None]:
        found: dict[str, int | None] = dict.fromkeys(self._queues)
        for role, queue in self._queues.items():
            # A channel each: a passive declare of a missing queue closes its channel (the
            # connection stays up). A lost connection raises out of the loop, to reconnect.
            channel: Any = connection.channel()
            try:
                _name, waiting, _consumers = channel.queue_declare(queue=queue, passive=True)
                found[role] = int(waiting)
            except connection.channel_errors:
                found[role] = None
            finally:
                with contextlib.suppress(*BROKER_ERRORS):
                    channel.close()
        return found

    def _drop(self, *, graceful: bool = True) -> None:
        """Forget the kept connection; ``graceful``: close it with the broker's handshake,
        which a silent broker would hold for another timeout."""
        if self._connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                if graceful:
                    self._connection.release()
                else:
                    self._connection.collect()
            self._connection = None
