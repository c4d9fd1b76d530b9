"""Where the demo's ledger and messages live: the local PostgreSQL and RabbitMQ when they
answer, else an embedded PostgreSQL (``pgserver``) and the file-based broker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from coupon_devtools.demo.defaults import (
    DEMO_DATABASE,
    DEMO_QUEUE_PREFIX,
    DEMO_VHOST,
    LOCAL_POSTGRES_URL,
    LOCAL_RABBIT,
    PROBE_TIMEOUT_S,
    Backend,
    DemoError,
    display,
    first_line,
)
from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.processes import (
    alive,
    command_line,
)
from coupon_devtools.harness.rabbitmqctl import create_vhost
from worker.domain.errors import BrokerUnavailable


@dataclass(frozen=True)
class Database:
    """Where the ledger lives for this run."""

    url: str
    label: str
    pgdata: Path | None = None  # set when the demo runs an embedded server


@dataclass(frozen=True)
class Broker:
    """Which broker carries the messages, and the settings that select it."""

    url: str
    label: str
    folder: Path | None = None  # the file-based broker's folder
    queues: Mapping[str, str] = field(default_factory=dict)  # queue-name settings, if not default

    def env(self) -> dict[str, str]:
        """The environment variables that point a process at this broker."""
        env = {"COUPONS_BROKER_URL": self.url, **self.queues}
        if self.folder is not None:
            env["COUPONS_BROKER_FOLDER"] = str(self.folder)
        return env


@dataclass(frozen=True)
class Backends:
    """The demo's choices, made once at start."""

    database: Database
    broker: Broker


def choose_backends(mode: Backend, workdir: Path, *, namespace: str = "") -> Backends:
    """Pick PostgreSQL and the broker: local services when they answer (or when ``local``),
    embedded ones otherwise (or when ``embedded``). Raises DemoError when ``local`` cannot be
    honoured."""
    suffix = f"_{namespace}" if namespace else ""
    database: Database | None = None
    broker: Broker | None = None
    pg_problem: str | None = "chosen with --backend embedded"
    broker_problem: str | None = pg_problem
    if mode != "embedded":
        database, pg_problem = local_database(DEMO_DATABASE + suffix)
        broker, broker_problem = local_broker(DEMO_VHOST + suffix.replace("_", "-"),
                                              DEMO_QUEUE_PREFIX + suffix.replace("_", "-"))
        if mode == "local" and (database is None or broker is None):
            raise DemoError("--backend local: " + "; ".join(
                p for p in (pg_problem, broker_problem) if p))
    if database is None:
        database = _embedded_database(workdir / "pg", DEMO_DATABASE + suffix)
        database = replace(database, label=f"{database.label}; {pg_problem}")
    if broker is None:
        broker = _file_broker(workdir / "broker")
        broker = replace(broker, label=f"{broker.label}; {broker_problem}")
    return Backends(database, broker)


def local_database(name: str) -> tuple[Database | None, str | None]:
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    configured = os.environ.get("COUPONS_DATABASE_URL")
    url = make_url(configured or LOCAL_POSTGRES_URL).set(
        drivername="postgresql+psycopg", database=name)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    try:
        drop_database(url, name, connect_timeout_s=PROBE_TIMEOUT_S)
    except sa_exc.OperationalError:
        return None, f"no PostgreSQL answered at {where}"
    except sa_exc.SQLAlchemyError as exc:
        return None, f"PostgreSQL at {where} refused: {first_line(exc)}"
    source = "COUPONS_DATABASE_URL" if configured else "local server"
    return Database(url.render_as_string(hide_password=False),
                    f"{source} at {where}, database {name} (dropped and recreated)"), None


def _embedded_database(pgdata: Path, name: str) -> Database:
    from sqlalchemy import exc as sa_exc

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes, so stay quiet.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        try:
            # cleanup_mode=None: the demo stops the server itself, so that --keep can keep it.
            server = get_server(pgdata, cleanup_mode=None)
        except Exception as exc:
            raise DemoError(f"could not start the embedded PostgreSQL in {display(pgdata)}: "
                            f"{type(exc).__name__}: {exc} (see {display(pgdata / 'log')})"
                            ) from exc
    # pgserver's URI is postgresql://postgres:@/postgres?host=<socket dir> (a TCP host:port
    # on systems without unix sockets).
    parts = urlsplit(server.get_uri())
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    url = (f"postgresql+psycopg://postgres@/{name}?host={socket_dir}" if socket_dir
           else f"postgresql+psycopg://postgres@{parts.hostname}:{parts.port}/{name}")
    try:
        drop_database(url, name, connect_timeout_s=PROBE_TIMEOUT_S)
    except sa_exc.SQLAlchemyError as exc:
        stop_embedded_postgres(pgdata)
        raise DemoError(f"the embedded PostgreSQL refused: {first_line(exc)}") from exc
    return Database(url, f"embedded PostgreSQL (pgserver) in {display(pgdata)}, database "
                         f"{name}", pgdata=pgdata)


def local_broker(vhost: str, queue_prefix: str) -> tuple[Broker | None, str | None]:
    configured = urlsplit(os.environ.get("COUPONS_BROKER_URL", ""))
    host = configured.hostname or LOCAL_RABBIT[0]
    port = configured.port or LOCAL_RABBIT[1]
    where = f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return None, f"no RabbitMQ answered at {where}"
    try:
        create_vhost(vhost, fresh=True)
    except BrokerUnavailable as exc:
        # Without rabbitmqctl (or its rights), share "/" but keep to queues of our own.
        queues = {f"COUPONS_{kind.upper()}_QUEUE": f"{queue_prefix}.{kind}"
                  for kind in ("events", "tasks", "retry", "dead")}
        broker = Broker(f"amqp://guest:guest@{where}//",
                        f"RabbitMQ at {where}, vhost / with queues {queue_prefix}.* "
                        f"(no vhost of its own: {exc})", queues=queues)
        try:
            _delete_queues(broker)
        except DemoError as problem:
            return None, str(problem)
        return broker, None
    broker = Broker(f"amqp://guest:guest@{where}/{vhost}",
                    f"RabbitMQ at {where}, vhost {vhost} (deleted and recreated)")
    try:
        _delete_queues(broker)  # nothing to delete in a new vhost: checks that guest gets in
    except DemoError as problem:
        return None, str(problem)
    return broker, None


def _delete_queues(broker: Broker) -> None:
    """Connect, and remove the demo's queues from a shared vhost so that no message of an
    earlier run is replayed."""
    from kombu import Connection

    try:
        with Connection(broker.url, connect_timeout=3) as connection:
            channel: Any = connection.channel()
            for name in broker.queues.values():
                channel.queue_delete(name)
    except Exception as exc:
        raise DemoError(f"RabbitMQ refused the demo: {type(exc).__name__}: {exc}") from exc


def _file_broker(folder: Path) -> Broker:
    from coupon_devtools.filebroker import FILE_BROKER_SCHEME, register

    register()  # this process publishes too
    # The layout Settings.broker_transport_options() derives from COUPONS_BROKER_FOLDER.
    for sub in ("messages", "control"):
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir(parents=True)
    # A host, although the transport ignores it, spares every connection a warning.
    return Broker(f"{FILE_BROKER_SCHEME}://localhost/",
                  f"kombu file-based transport in {display(folder)}",
                  folder=folder.resolve())


def stop_embedded_postgres(pgdata: Path) -> bool:
    """Fast-shutdown the embedded server of ``pgdata``; True if one was running."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if not alive(pid) or "postgres" not in command_line(pid):
        return False
    os.kill(pid, signal.SIGINT)  # SIGINT is PostgreSQL's "fast" shutdown
    deadline = time.monotonic() + 15
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True
