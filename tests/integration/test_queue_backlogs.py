"""The queues' depths (the metrics' scrape, the console's overview) on a real RabbitMQ, over
one connection kept between reads."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from worker.adapters.rabbitmq.backlog import READ_TIMEOUT_S, QueueBacklogs
from worker.adapters.rabbitmq.publisher import EventProducer
from worker.config import Settings

EVENT = {"eventId": "e-1", "customer": {"id": "1"}, "seriesIds": [544770]}


@contextlib.contextmanager
def _reader_after(settings: Settings, *, published: int) -> Iterator[QueueBacklogs]:
    """A depth reader, once ``published`` events wait on the bus; closed afterwards."""
    with EventProducer.open(settings) as producer:
        for _ in range(published):
            producer.publish_event(EVENT, via="bus")
    backlogs = QueueBacklogs(settings)
    try:
        yield backlogs
    finally:
        backlogs.close()


def test_reads_share_one_connection_which_a_broker_drop_only_replaces(
    settings: Settings,
) -> None:
    with _reader_after(settings, published=2) as backlogs:
        # Scrape after scrape, one connection
        for _ in range(3):
            assert backlogs.read()["events"] == 2
        assert backlogs.opened == 1
        # Given the broker drops every connection of the vhost (a restart, a failover)
        vhost = settings.broker_url.rsplit("/", 1)[1]
        rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "1000", "test")
        # Then the next read still answers, on a new connection
        assert backlogs.read()["events"] == 2
        assert backlogs.opened == 2


def test_a_missing_queue_is_unknown_and_costs_the_connection_nothing(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(dead_queue="no-such-queue-here")
    with _reader_after(settings, published=1) as backlogs:
        for _ in range(2):
            found = backlogs.read()
            assert found["dead"] is None and found["events"] == 1
        assert backlogs.opened == 1


def test_an_unreachable_broker_leaves_every_count_unknown(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(broker_url="amqp://guest:guest@127.0.0.1:1//")
    backlogs = QueueBacklogs(settings)
    assert set(backlogs.read().values()) == {None}
    assert backlogs.opened == 0


def test_a_broker_that_stops_answering_costs_a_read_seconds_not_the_scrape(
    settings_factory: Callable[..., Settings],
) -> None:
    # Given a "broker" that takes the connection and then says nothing (a partition, a hung
    # node)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    settings = settings_factory(broker_url=f"amqp://guest:guest@127.0.0.1:{port}//")
    backlogs = QueueBacklogs(settings)
    try:
        # When a scrape reads the depths
        started = time.monotonic()
        found = backlogs.read()
        # Then it answers "unknown" within the read timeout, instead of hanging
        assert set(found.values()) == {None}
        assert time.monotonic() - started < 4 * READ_TIMEOUT_S
    finally:
        backlogs.close()
        listener.close()
        for conn in held:
            conn.close()
