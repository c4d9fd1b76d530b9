"""Every Capillary call ends by its total deadline, and a process's threads share one
connection pool (``worker.adapters.capillary.transport``): what the threads pool relies on
instead of the hard time limit."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from coupon_devtools.sandbox import SandboxAdmin
from worker.adapters.capillary.client import CALL_DEADLINE, CapillaryClient
from worker.config import Settings
from worker.domain.model import Verdict

CUSTOMER = {"id": "566881933"}
META = {"sourceType": "Journeys", "notes": "[cw:deadline]"}


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """An HTTP server that answers at once, then sends its body one byte every 0.3 s: every
    read is well inside a read timeout, and the whole answer takes minutes."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{")
                for _ in range(999):
                    if stop.wait(0.3):
                        break
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_an_answer_that_trickles_in_ends_at_the_calls_deadline_as_unknown(
        trickling_server: str) -> None:
    # Given a client whose reads time out after 1 s, and a total deadline of 1.5 s
    client = CapillaryClient(trickling_server, connect_timeout_s=0.5, read_timeout_s=1.0)
    assert client.deadline_s == 1.5
    # When a server answers a byte every 0.3 s (no read ever times out)
    started = time.monotonic()
    result = client.bulk_issue(CUSTOMER, [544770], META)
    took = time.monotonic() - started
    # Then the call ends by its deadline, recorded as unknown (it was sent), not as an answer
    assert took < 3.0, took
    assert result.call.error_code == CALL_DEADLINE and result.call_level_failure
    assert result.entries[544770].verdict is Verdict.AMBIGUOUS
    assert "deadline" in (result.call.error_message or "")


def test_a_connection_back_in_the_pool_is_not_cut_by_the_deadline_of_the_call_it_served(
        settings_factory: Callable[..., Settings], sandbox: SandboxAdmin) -> None:
    # Given a client with a short deadline, and a call that ended well inside it
    client = CapillaryClient.from_settings(settings_factory())
    client.deadline_s = 0.5
    assert client.bulk_issue(CUSTOMER, [544770], META).call.status == 200
    # When that call's deadline has passed, and another thread takes the same connection
    time.sleep(0.8)
    sandbox.configure(latency_seconds=0.3)
    with ThreadPoolExecutor(1) as other:
        result = other.submit(client.bulk_issue, CUSTOMER, [553379], META).result()
    # Then its call is not ended by the deadline of the call before
    assert result.call.status == 200 and result.call.error_code is None
    assert len(sandbox.ledger()) == 2


def test_the_threads_of_a_process_share_one_connection_pool_sized_for_them(
        settings_factory: Callable[..., Settings], sandbox: SandboxAdmin) -> None:
    # Given the client a process of 12 threads builds (a pool smaller than that by default)
    settings = settings_factory()
    client = CapillaryClient.from_settings(settings, threads=12)
    assert settings.http_pool_size < 12 and client.pool_size == 12
    sandbox.configure(latency_seconds=0.2)
    # When 12 threads call at once, twice
    with ThreadPoolExecutor(12) as threads:
        for round_ in range(2):
            results = list(threads.map(
                lambda n, r=round_: client.bulk_issue({"id": f"8{r}{n:03d}"}, [544770], META),
                range(12)))
            assert all(r.call.status == 200 for r in results)
    # Then they drew on one pool, and the second round reused the first round's connections
    manager = client._adapter.poolmanager
    pool = manager.connection_from_url(client.base_url)
    assert len(manager.pools) == 1
    assert pool.num_connections <= 12, pool.num_connections
    assert len(sandbox.ledger()) == 24
