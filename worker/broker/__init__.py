"""RabbitMQ: the queue topology, the Celery app, publishers and the plain-JSON bridge."""

from kombu.transport import TRANSPORT_ALIASES

# The demo's no-server fallback (see file_transport); registering a name is not I/O.
TRANSPORT_ALIASES.setdefault("cwfile", "worker.broker.file_transport:Transport")
