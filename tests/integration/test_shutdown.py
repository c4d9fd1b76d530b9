"""What a process opened is let go when it stops: the worker's database pool and Capillary's
HTTP sessions at the worker's shutdown, the metrics endpoint's port when its step stops, the
console's database pool when it exits, every thread's HTTP session when the client closes."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime

from celery import signals
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from worker.adapters.capillary.client import CapillaryClient
from worker.config import Settings
from worker.entrypoints.celery.app import create_app
from worker.entrypoints.celery.context import container_of
from worker.entrypoints.celery.metrics_step import MetricsServer
from worker.metrics import serve_metrics, stop_metrics

CUSTOMER = {"mobile": "919800000123"}


class _Worker:
    """What a step or a signal's receiver reads of Celery's worker: its app."""

    def __init__(self, app: object) -> None:
        self.app = app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))  # noqa: S104 - the endpoint listens on every address
        port: int = probe.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - as the endpoint binds
        except OSError:
            return False
        return True


def _pooled_connections(client: CapillaryClient) -> int:
    """Connections the client's sessions keep alive, over every host they called."""
    return sum(len(adapter.poolmanager.pools)  # type: ignore[attr-defined]
               for session in client._sessions for adapter in session.adapters.values())


def test_the_worker_shutdown_disposes_the_database_pool_and_closes_capillary_sessions(
        settings: Settings, clean_ledger: Engine) -> None:
    # Given a worker process that used the ledger and called Capillary
    app = create_app(settings)
    container = container_of(app)
    deps = container.deps()
    engine = container.engine
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    pool = engine.pool
    assert pool.checkedin() == 1
    assert isinstance(deps.api, CapillaryClient)
    client = deps.api
    client.find_coupons(CUSTOMER, 1, datetime(2024, 1, 1, tzinfo=UTC))
    assert client.open_sessions == 1 and _pooled_connections(client) >= 1

    # When Celery announces the worker's shutdown (after its steps stopped)
    signals.worker_shutdown.send(sender=_Worker(app))

    # Then the pool's connections are closed and so are the HTTP sessions
    assert pool.checkedin() == 0
    assert engine.pool is not pool, "the engine was disposed"
    assert client.open_sessions == 0


def test_the_metrics_port_is_free_once_the_step_stops(settings_factory: object,
                                                      clean_ledger: Engine) -> None:
    # Given a worker whose metrics step serves on a port
    port = _free_port()
    app = create_app(settings_factory(metrics_port=port))  # type: ignore[operator]
    parent = _Worker(app)
    step = MetricsServer(parent)
    step.start(parent)
    assert container_of(app).links.metrics_port == port
    assert not _port_is_free(port)

    # When the step stops
    step.stop(parent)

    # Then the port can be bound again at once (a restarted worker takes it back)
    assert _port_is_free(port)
    container_of(app).close()


def test_stopping_the_metrics_endpoint_frees_its_port() -> None:
    server, port = serve_metrics(_free_port(), CollectorRegistry())
    stop_metrics(server)
    assert _port_is_free(port)


def test_closing_the_client_closes_every_threads_session(settings: Settings) -> None:
    # Given a client called from two threads (each has a session of its own)
    client = CapillaryClient.from_settings(settings)
    since = datetime(2024, 1, 1, tzinfo=UTC)
    client.find_coupons(CUSTOMER, 1, since)
    other = threading.Thread(target=client.find_coupons, args=(CUSTOMER, 1, since))
    other.start()
    other.join()
    assert client.open_sessions == 2
    sessions = list(client._sessions)
    assert _pooled_connections(client) >= 2

    # When it closes
    client.close()

    # Then no session keeps a connection, and a later call still works on a new one
    assert client.open_sessions == 0
    assert all(not adapter.poolmanager.pools  # type: ignore[attr-defined]
               for session in sessions for adapter in session.adapters.values())
    assert client.find_coupons(CUSTOMER, 1, since).call.status == 200
    client.close()
