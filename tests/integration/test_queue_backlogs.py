"""The queues' depths (the metrics' scrape, the console's overview) on a real RabbitMQ, over
one connection kept between reads."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

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
        # Then it answers "unknown" within the connect timeout, once, instead of hanging
        assert set(found.values()) == {None}
        assert time.monotonic() - started < READ_TIMEOUT_S
    finally:
        backlogs.close()
        listener.close()
        for conn in held:
            conn.close()


class _FreezingProxy:
    """A TCP forwarder to the broker that can go silent: connections stay open, nothing
    passes either way (a partition, a hung node, after the handshake)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client = self.listener.accept()[0]
                upstream = socket.create_connection(self.target)
                self.sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)  # held, never dropped: the peer sees only silence
                sink.sendall(data)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_kept_connection_that_goes_silent_costs_a_read_seconds_then_is_replaced(
    settings_factory: Callable[..., Settings],
) -> None:
    direct = settings_factory()
    url = urlsplit(direct.broker_url)
    proxy = _FreezingProxy((url.hostname or "127.0.0.1", url.port or 5672))
    settings = settings_factory(broker_url=direct.broker_url.replace(
        f"{url.hostname}:{url.port or 5672}", f"127.0.0.1:{proxy.port}"))
    try:
        with _reader_after(settings, published=1) as backlogs:
            # Given a read that kept its connection
            assert backlogs.read()["events"] == 1 and backlogs.opened == 1
            # When the broker goes silent after the handshake (nothing answers, nothing is
            # closed)
            proxy.frozen.set()
            done: list[dict[str, int | None]] = []
            started = time.monotonic()
            reader = threading.Thread(target=lambda: done.append(backlogs.read()), daemon=True)
            reader.start()
            reader.join(timeout=6 * READ_TIMEOUT_S)
            # Then the read gives up within its timeout, without trying a new connection the
            # silent broker would hold as long: unknown, inside a scrape's 10 s
            assert done, "the read still hangs on a silent broker"
            assert set(done[0].values()) == {None}
            assert time.monotonic() - started < 2 * READ_TIMEOUT_S
            # And once the broker answers again, the next read does too, on a new connection
            proxy.frozen.clear()
            assert backlogs.read()["events"] == 1
            assert backlogs.opened >= 2
    finally:
        proxy.close()
