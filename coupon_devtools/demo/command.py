"""``coupon-worker demo``: the whole pipeline on one machine, faults included, in a few minutes.

What a run does, in order:

1. chooses its backends and says which: the local PostgreSQL and RabbitMQ when they answer,
   else an embedded PostgreSQL (``pgserver``) and kombu's file-based broker in the work folder;
2. migrates a database of its own, then starts the sandbox Capillary server, a real worker and
   Flower as subprocesses, each logging to a file in the work folder;
3. publishes tier-upgrade events through both ways in (the plain-JSON bus and Celery tasks),
   some of them twice, plus a few malformed messages, while the sandbox times out, fails after
   issuing, answers 503, refuses an expired series and an unknown customer;
4. watches the ledger drain, then prints what happened and checks the ledger against the
   sandbox's ground truth: every coupon issued is recorded, and none twice;
5. stops everything it started (unless ``--keep``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Literal, get_args
from urllib.parse import parse_qs, urlsplit

import click
from rich.console import Console
from rich.markup import escape

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.processes import (
    Spawned,
    alive,
    cli_command,
    command_line,
    free_port,
    group_alive,
    stop_groups,
)
from coupon_devtools.harness.processes import spawn as spawn_process
from coupon_devtools.harness.rabbitmqctl import create_vhost
from worker.errors import BrokerUnavailable, WorkerError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.config import Settings

# Heavier modules (SQLAlchemy, requests, aiohttp, pgserver) are imported where they are used:
# the CLI imports this module for every command, including the worker's own start-up.

Backend = Literal["auto", "local", "embedded"]
Via = Literal["bus", "task"]

DEMO_DATABASE: Final = "coupon_worker_demo"
DEMO_VHOST: Final = "coupon-worker-demo"
DEMO_QUEUE_PREFIX: Final = "demo"
LOCAL_POSTGRES_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_RABBIT: Final = ("127.0.0.1", 5672)
SANDBOX_USER, SANDBOX_PASSWORD = "store.server", "server123"
STATE_FILE: Final = "demo-state.json"

SERIES_GOLD: Final = 544770
SERIES_DELIVERY: Final = 553379
SERIES_EXPIRED: Final = 700712
FIRST_CUSTOMER_ID: Final = 566_881_001

STALL_S: Final = 4.0
"""Longer than the worker's read timeout (below): the sandbox issues, the worker times out."""
DEMO_ENVIRONMENT: Final[Mapping[str, str]] = {
    "CAPILLARY_USERNAME": SANDBOX_USER,
    "CAPILLARY_PASSWORD": SANDBOX_PASSWORD,
    # Short delays so a few hundred events with faults settle in seconds, not minutes.
    "COUPONS_RETRY_BASE_SECONDS": "0.5",
    "COUPONS_RETRY_MAX_SECONDS": "3",
    "COUPONS_RECONCILE_DELAY_SECONDS": "0.5",
    "COUPONS_HTTP_TIMEOUT_SECONDS": "2",
    "COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS": "5",
    "COUPONS_LEASE_SECONDS": "15",
    # Above connect + read timeout, and above the stalls below: an unknown outcome whose
    # read-back finds nothing is sent again after seconds, not the production two minutes.
    "COUPONS_SETTLE_WINDOW_SECONDS": "6",
    # A stalled ledger must fail a statement inside the short lease's hard time limit (10 s).
    "COUPONS_DB_CONNECT_TIMEOUT_SECONDS": "2",
    "COUPONS_DB_STATEMENT_TIMEOUT_SECONDS": "3",
    "COUPONS_DB_LOCK_TIMEOUT_SECONDS": "1",
    "COUPONS_DB_KEEPALIVE_IDLE_SECONDS": "2",
    "COUPONS_DB_KEEPALIVE_INTERVAL_SECONDS": "1",
    "COUPONS_DB_KEEPALIVE_COUNT": "3",
    "COUPONS_SWEEP_INTERVAL_SECONDS": "0.25",
    "COUPONS_LOG_LEVEL": "WARNING",
    # A developer's .env must not change what the demo shows.
    "COUPONS_ENV_FILE": "",
    "PYTHONUNBUFFERED": "1",
}
CALL_LABELS: Final[Mapping[str, str]] = {"bulk": "bulk issue", "readback": "read-back",
                                         "token": "token"}
DEAD_REASONS: Final[Mapping[str, str]] = {
    "712": "series expired",
    "701": "customer not found",
    "707": "invalid series",
}

READY_TIMEOUT_S: Final = 60.0
MIGRATE_TIMEOUT_S: Final = 120.0
STOP_GRACE_S: Final = 10.0
POLL_INTERVAL_S: Final = 0.25
PROBE_TIMEOUT_S: Final = 3  # seconds to connect to a local PostgreSQL that may not be there
FILE_BROKER_COMFORT: Final = 500


class DemoError(Exception):
    """The demo cannot go on; the message says why and where to look."""


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]


def _display(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- backends ------------------------------------------------------------------------------


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
        return None, f"PostgreSQL at {where} refused: {_first_line(exc)}"
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
            raise DemoError(f"could not start the embedded PostgreSQL in {_display(pgdata)}: "
                            f"{type(exc).__name__}: {exc} (see {_display(pgdata / 'log')})"
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
        _stop_embedded_postgres(pgdata)
        raise DemoError(f"the embedded PostgreSQL refused: {_first_line(exc)}") from exc
    return Database(url, f"embedded PostgreSQL (pgserver) in {_display(pgdata)}, database "
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
                  f"kombu file-based transport in {_display(folder)}",
                  folder=folder.resolve())


def _stop_embedded_postgres(pgdata: Path) -> bool:
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


# -- the scenario --------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One message to publish: an event the given way in, or raw (malformed) bytes."""

    via: Literal["bus", "task", "raw"]
    event: dict[str, Any] | None = None
    raw: bytes = b""


@dataclass(frozen=True)
class Plan:
    """Everything a run publishes and injects, decided before anything starts."""

    events: list[dict[str, Any]]
    deliveries: list[Delivery]
    unknown_customers: list[str]
    faults: list[dict[str, Any]]

    @property
    def duplicates(self) -> int:
        """Deliveries of an event that was already published once."""
        return sum(1 for d in self.deliveries if d.via != "raw") - len(self.events)

    @property
    def malformed(self) -> int:
        return sum(1 for d in self.deliveries if d.via == "raw")

    def describe(self) -> str:
        """One line on what the run will throw at the worker."""
        kinds = Counter(str(f["kind"]) for f in self.faults)
        expired = sum(1 for e in self.events if SERIES_EXPIRED in e["seriesIds"])
        return (f"{len(self.events)} events, {self.duplicates} sent twice, {self.malformed} "
                f"malformed; Capillary faults: {kinds['stall_after']} timeouts after issuing, "
                f"{kinds['error_after']} 5xx after issuing, {kinds['error_before']} 503s; "
                f"expired series {SERIES_EXPIRED} in {expired} events; unknown customers: "
                f"{len(self.unknown_customers)}")


def _spread(n_events: int, count: int, phase: float, taken: set[int]) -> list[int]:
    """``count`` event positions spread over the run, so faults do not come in a burst (five
    failures in a row would open the circuit breaker and pause the demo for 30 s)."""
    step = n_events / count
    chosen = []
    for j in range(count):
        index = int(step * (j + phase)) % n_events
        while index in taken:
            index = (index + 1) % n_events
        taken.add(index)
        chosen.append(index)
    return chosen


def plan_scenario(n_events: int) -> Plan:
    """The events, duplicates, malformed messages and faults of a run of ``n_events``."""
    taken: set[int] = set()
    stalled = _spread(n_events, max(1, n_events // 60), 0.1, taken)
    failed_after = _spread(n_events, max(1, n_events // 60), 0.3, taken)
    refused_503 = _spread(n_events, max(1, n_events // 40), 0.5, taken)
    unknown = _spread(n_events, max(1, n_events // 100), 0.7, taken)
    expired = set(_spread(n_events, max(1, n_events // 25), 0.9, taken))

    occurred = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    events = []
    for i in range(n_events):
        customer = str(FIRST_CUSTOMER_ID + i)
        series = [SERIES_GOLD, SERIES_EXPIRED if i in expired else SERIES_DELIVERY]
        events.append({
            "eventId": f"tier-upgrade-{customer}-gold", "eventType": "TierUpgraded",
            "occurredAt": occurred, "customer": {"id": customer}, "seriesIds": series,
            "metadata": {"sourceType": "Journeys", "sourceId": "demo-journey",
                         "sourceActivity": "Tier upgrade", "notes": "Gold tier welcome",
                         "reason": "Tier upgrade to Gold"},
        })

    deliveries: list[Delivery] = []
    repeats: dict[int, list[Delivery]] = {}
    for i, event in enumerate(events):
        via: Via = "task" if i % 5 == 2 else "bus"
        deliveries.append(Delivery(via, event))
        if i % 10 == 5:
            # ~10% arrive twice, the other way in, a few messages later (some while the
            # first delivery is still in flight, some after it completed).
            repeats.setdefault(i + 1 + i % 7, []).append(
                Delivery("bus" if via == "task" else "task", event))
        deliveries.extend(repeats.pop(i, []))
    deliveries.extend(d for later in repeats.values() for d in later)
    malformed = _malformed_messages()
    for n, raw in enumerate(malformed, start=1):
        deliveries.insert(len(deliveries) * n // (len(malformed) + 1), Delivery("raw", raw=raw))

    def customer_of(i: int) -> str:
        return str(FIRST_CUSTOMER_ID + i)

    faults = (
        [{"kind": "stall_after", "customer": customer_of(i), "delay_seconds": STALL_S}
         for i in stalled]
        + [{"kind": "error_after", "customer": customer_of(i), "status": 500}
           for i in failed_after]
        + [{"kind": "error_before", "customer": customer_of(i), "status": 503}
           for i in refused_503]
    )
    return Plan(events, deliveries, [customer_of(i) for i in unknown], faults)


def _malformed_messages() -> list[bytes]:
    return [
        b'{"eventId": "tier-upgrade-truncated", "customer": {"id": "566880001"}, "seriesIds": [',
        json.dumps({"eventId": "tier-upgrade-bad-series", "customer": {"id": "566880002"},
                    "seriesIds": str(SERIES_GOLD)}).encode(),
        json.dumps({"eventId": "tier-upgrade-no-customer", "seriesIds": [SERIES_GOLD]}).encode(),
    ]


def write_scenario(plan: Plan, path: Path) -> Path:
    """Write the sandbox's scenario file (series behaviours, unknown customers)."""
    scenario = {
        "series": {
            str(SERIES_GOLD): {"description": "Gold tier welcome: 500 off",
                               "discountType": "ABS", "discountValue": 500},
            str(SERIES_DELIVERY): {"description": "Free delivery for a month",
                                   "discountType": "PERC", "discountValue": 100,
                                   "discountUpto": 99},
            str(SERIES_EXPIRED): {"description": "Summer sale (ended)", "behaviour": "expired"},
        },
        "unknownCustomers": plan.unknown_customers,
    }
    path.write_text(json.dumps(scenario, indent=2) + "\n", encoding="utf-8")
    return path


# -- processes -----------------------------------------------------------------------------


@dataclass
class Service(Spawned):
    """One subprocess the demo started, in a session of its own, logging to a file."""

    url: str | None = None

    def check_running(self) -> None:
        """Raise :class:`DemoError`, with the log's tail, if the process has exited."""
        if not self.alive():
            raise DemoError(f"{self.name} exited with code {self.process.returncode}; "
                            f"its log ({_display(self.log_path)}) ends with:\n{self.log_tail()}")


def _cli(env: Mapping[str, str]) -> list[str]:
    from coupon_devtools.filebroker import LAUNCHER_MODULE, uses_file_broker

    if uses_file_broker(env.get("COUPONS_BROKER_URL", "")):
        # The file broker's scheme exists only where it is registered: its launcher does so.
        return [sys.executable, "-m", LAUNCHER_MODULE]
    return cli_command()


def demo_env(backends: Backends, sandbox_url: str, metrics_port: int) -> dict[str, str]:
    """The explicit environment of every subprocess: the demo's choices, nothing inherited
    from the caller's coupon-worker or Capillary settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update(DEMO_ENVIRONMENT)
    env.update(backends.broker.env())
    env["COUPONS_DATABASE_URL"] = backends.database.url
    env["CAPILLARY_BASE_URL"] = sandbox_url
    env["COUPONS_METRICS_PORT"] = str(metrics_port)
    return env


def spawn(name: str, args: Sequence[str], env: Mapping[str, str], logs: Path,
          services: list[Service]) -> Service:
    """Start ``coupon-worker ARGS`` and add it to ``services`` (what cleanup stops)."""
    spawned = spawn_process(name, [*_cli(env), *args], env, logs)
    service = Service(spawned.name, spawned.process, spawned.log_path)
    services.append(service)
    return service


def wait_until(service: Service, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        service.check_running()
        if time.monotonic() > deadline:
            raise DemoError(f"{service.name} was not {what} after {READY_TIMEOUT_S:g} s; see "
                            f"{_display(service.log_path)}:\n{service.log_tail()}")
        time.sleep(0.1)


def migrate(env: Mapping[str, str], logs: Path) -> None:
    """Run ``coupon-worker migrate`` with the demo's environment."""
    log_path = logs / "migrate.log"
    with log_path.open("wb") as log_file:
        done = subprocess.run([*_cli(env), "migrate"], env=dict(env), stdout=log_file,  # noqa: S603
                              stderr=subprocess.STDOUT, timeout=MIGRATE_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise DemoError(f"coupon-worker migrate failed; {_display(log_path)} says:\n"
                        + log_path.read_text(errors="replace")[-3000:])


def start_sandbox(env: Mapping[str, str], logs: Path, services: list[Service],
                  *args: str) -> Service:
    """Start ``coupon-worker sandbox ARGS`` at ``CAPILLARY_BASE_URL`` and wait until it
    answers."""
    from coupon_devtools.sandbox import SandboxAdmin

    sandbox = spawn("sandbox", ["sandbox", *args], env, logs, services)
    sandbox.url = env["CAPILLARY_BASE_URL"]
    with SandboxAdmin(sandbox.url, timeout_s=1.0) as admin:
        def sandbox_ready() -> bool:
            try:
                admin.wait_ready(timeout_s=0.5)
            except TimeoutError:
                return False
            return True

        wait_until(sandbox, sandbox_ready, "answering")
    return sandbox


def start_processes(env: Mapping[str, str], scenario: Path, logs: Path, *, sandbox_port: int,
                    flower: bool, services: list[Service]) -> None:
    """Start the sandbox, the worker and Flower (appended to ``services`` as they start, so a
    failure half-way still stops the ones already running) and wait until each is ready."""
    start_sandbox(env, logs, services, "--port", str(sandbox_port), "--scenario", str(scenario))
    args = ["worker", "-c", "4", "-n", "demo@%h"]
    # The worker logs " ready." at INFO; its log is a file, so the console stays quiet.
    worker = spawn("worker", args, {**env, "COUPONS_LOG_LEVEL": "INFO"}, logs, services)
    wait_until(worker, lambda: " ready." in worker.log_tail(100_000), "ready")
    if flower:
        # After the worker is up, so that Flower's first look at the workers finds one.
        port = free_port()
        browser = spawn("flower", ["flower", "--port", str(port)], env, logs, services)
        browser.url = f"http://127.0.0.1:{port}"
        wait_until(browser, lambda: _http_ok(f"{browser.url}/healthcheck"), "answering")


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1.0).status_code == 200
    except requests.RequestException:
        return False


def cleanup(services: Sequence[Service], database: Database | None, *, keep: bool) -> None:
    """Stop what the demo started (children first, then the embedded PostgreSQL)."""
    if keep:
        return
    stop_groups([s.pid for s in services], [s.process for s in services], grace_s=STOP_GRACE_S)
    if database is not None and database.pgdata is not None:
        _stop_embedded_postgres(database.pgdata)


def _save_state(workdir: Path, services: Sequence[Service], database: Database) -> Path:
    path = workdir / STATE_FILE
    path.write_text(json.dumps({
        "pids": [s.process.pid for s in services],
        "pgdata": str(database.pgdata) if database.pgdata else None,
    }) + "\n", encoding="utf-8")
    return path


def stop_kept(workdir: Path, console: Console) -> bool:
    """Stop what an earlier ``--keep`` run left running in ``workdir``; True if anything was."""
    path = workdir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # Only groups that still run our CLI: the pids may have been reused since.
    pids = [pid for pid in state.get("pids", [])
            if isinstance(pid, int) and group_alive(pid)
            and any(mark in command_line(pid)
                    for mark in ("coupon-worker", "worker.cli", "coupon_devtools.filebroker"))]
    stop_groups(pids, grace_s=STOP_GRACE_S)
    stopped = len(pids)
    if state.get("pgdata") and _stop_embedded_postgres(Path(state["pgdata"])):
        stopped += 1
    path.unlink(missing_ok=True)
    if stopped:
        console.print(f"stopped {stopped} process(es) left running by an earlier --keep run "
                      f"in {_display(workdir)}")
    return stopped > 0


# -- publishing ----------------------------------------------------------------------------


def publish_batch(settings: Settings, plan: Plan) -> None:
    """Publish every delivery of the plan, in order, with the project's producer."""
    from worker.broker.publisher import EventProducer

    with EventProducer.open(settings) as producer:
        for delivery in plan.deliveries:
            if delivery.event is None or delivery.via == "raw":
                producer.publish_raw(delivery.raw)
            else:
                producer.publish_event(delivery.event, via=delivery.via)


def inject_faults(sandbox_url: str, plan: Plan) -> None:
    """Register the plan's faults; each strikes the first bulk-issue call of one customer."""
    from coupon_devtools.sandbox import SandboxAdmin

    with SandboxAdmin(sandbox_url) as admin:
        for fault in plan.faults:
            admin.add_fault(times=1, **fault)


# -- watching ------------------------------------------------------------------------------

_RECEIVED = re.compile(r'^coupon_events_received_total\{outcome="(\w+)"\}\s+([0-9.eE+-]+)$',
                       re.MULTILINE)


def deliveries_taken_in(metrics_url: str) -> Counter[str] | None:
    """What the worker counted: new events, duplicate deliveries, rejected messages (None when
    its metrics endpoint does not answer or has counted nothing yet)."""
    import requests

    try:
        response = requests.get(metrics_url, timeout=2.0)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    counts: Counter[str] = Counter()
    for outcome, value in _RECEIVED.findall(response.text):
        counts[outcome] += int(float(value))
    return counts or None


@dataclass(frozen=True)
class Snapshot:
    """The ledger (and the worker's intake counters) at one moment."""

    events_at_rest: int
    rejected: int
    entities: Mapping[str, int]
    taken_in: Counter[str] | None

    def drained(self, plan: Plan) -> bool:
        """Every event at rest, every malformed message recorded and, when the worker's
        counters are readable, every delivery taken in (duplicates included)."""
        at_rest = self.events_at_rest >= len(plan.events) and self.rejected >= plan.malformed
        if not self.taken_in:
            return at_rest
        return at_rest and self.taken_in.total() >= len(plan.deliveries)


def snapshot(engine: Engine, metrics_url: str) -> Snapshot:
    """Read where the pipeline stands."""
    from sqlalchemy import exists, func, select

    from worker.domain import TERMINAL_STATES
    from worker.ledger import models as m
    from worker.views import entity_state_counts

    unsettled = exists().where(m.Entity.event_id == m.Event.event_id,
                               m.Entity.state.not_in([s.value for s in TERMINAL_STATES]))
    with engine.connect() as conn:
        # At rest means every entity at rest: the event row's own state can lag behind.
        at_rest = conn.execute(select(func.count()).select_from(m.Event).where(~unsettled)
                               ).scalar_one()
        rejected = conn.execute(select(func.count()).select_from(m.RejectedEvent)).scalar_one()
    return Snapshot(int(at_rest), int(rejected), entity_state_counts(engine),
                    deliveries_taken_in(metrics_url))


def watch_progress(engine: Engine, plan: Plan, metrics_url: str, timeout_s: float,
                   console: Console, services: Sequence[Service]) -> tuple[bool, Snapshot]:
    """Show the ledger draining; True when it drained within ``timeout_s``. Raises DemoError
    as soon as one of ``services`` dies, rather than waiting for the timeout."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description:<17}"), BarColumn(bar_width=20),
               MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    deadline = time.monotonic() + timeout_s
    with Progress(*columns, console=console) as progress:
        at_rest = progress.add_task("events at rest", total=len(plan.events), detail="")
        taken: TaskID | None = None
        counted: Counter[str] | None = None
        while True:
            now = snapshot(engine, metrics_url)
            # A scrape can time out while the worker is busy: keep the last counters read.
            now = replace(now, taken_in=now.taken_in or counted)
            counted = now.taken_in
            states = now.entities
            busy = sum(n for state, n in states.items() if state not in ("issued", "dead"))
            progress.update(at_rest, completed=now.events_at_rest,
                            detail=f"issued {states.get('issued', 0)} · busy {busy} · "
                                   f"dead {states.get('dead', 0)}")
            if now.taken_in:
                # Shown once the worker's counters are readable (absent until its first event).
                if taken is None:
                    taken = progress.add_task("messages taken in",
                                              total=len(plan.deliveries), detail="")
                progress.update(taken, completed=now.taken_in.total(),
                                detail=f"duplicates {now.taken_in['duplicate']} · "
                                       f"rejected {now.rejected}")
            if now.drained(plan):
                return True, now
            if time.monotonic() > deadline:
                return False, now
            for service in services:
                service.check_running()
            time.sleep(POLL_INTERVAL_S)


# -- the summary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the run did, read from the ledger, the worker's counters and the sandbox."""

    coupons: Mapping[str, int]  # by recorded_via
    retried: int
    dead: list[tuple[str, str, int]]  # code, label, count
    rejected: list[str]
    duplicates: int | None
    calls: Mapping[str, int]
    problems: list[str]
    pending: int  # coupons issued whose entity is not at rest yet (a run that did not drain)
    sandbox_issued: int
    examples: Mapping[str, str]

    @property
    def exactly_once(self) -> bool:
        return not self.problems and not self.pending


def exactly_once_problems(ours: Sequence[tuple[str, int, str]],
                           before: Sequence[Mapping[str, Any]],
                           after: Sequence[Mapping[str, Any]],
                           unsettled: set[tuple[str, int]]) -> tuple[list[str], int]:
    """Compare our ledger's coupons (customer key, series, code) with the sandbox's, read
    ``before`` and ``after`` ours, so that a worker still running cannot fake a discrepancy.

    Returns the discrepancies, and how many coupons the sandbox issued for entities still being
    retried (a timeout's coupon is recorded only once the retry reconciles it)."""
    problems = []
    pending = 0
    by_code = {code: (customer, series) for customer, series, code in ours}
    for coupon in before:
        code = str(coupon["code"])
        expected = (f"id:{coupon['customerId']}", int(coupon["seriesId"]))
        if code not in by_code and expected in unsettled:
            pending += 1
        elif code not in by_code:
            problems.append(f"coupon {code} (customer {coupon['customerId']}, series "
                            f"{coupon['seriesId']}) was issued but is not in our ledger")
        elif by_code[code] != expected:
            problems.append(f"coupon {code} is recorded for {by_code[code]}, issued for "
                            f"{expected}")
    issued_codes = {str(c["code"]) for c in after}
    for code in sorted(set(by_code) - issued_codes):
        problems.append(f"coupon {code} is in our ledger but the sandbox never issued it")
    twice = Counter((c["customerId"], c["seriesId"]) for c in after)
    for (customer, series), count in sorted(twice.items()):
        if count > 1:
            problems.append(f"customer {customer} got {count} coupons of series {series}")
    return problems, pending


def summarise(engine: Engine, sandbox_url: str, taken_in: Counter[str] | None) -> Outcome:
    """Gather the run's numbers and the exactly-once verdict."""
    from sqlalchemy import distinct, func, select

    from coupon_devtools.sandbox import SandboxAdmin
    from worker.domain import TERMINAL_STATES
    from worker.ledger import models as m

    with SandboxAdmin(sandbox_url) as admin:
        before = admin.ledger()
    with engine.connect() as conn:
        coupons = {str(via): int(n) for via, n in conn.execute(
            select(m.IssuedCoupon.recorded_via, func.count()).group_by(
                m.IssuedCoupon.recorded_via))}
        retried = conn.execute(select(func.count(distinct(m.EntityHistory.entity_id))).where(
            m.EntityHistory.kind == "retry_scheduled")).scalar_one()
        dead = [(str(code), DEAD_REASONS.get(str(code), str(message or "")[:60]), int(n))
                for code, message, n in conn.execute(
                    select(m.Entity.last_error_code, func.min(m.Entity.last_error_message),
                           func.count()).where(m.Entity.state == "dead")
                    .group_by(m.Entity.last_error_code).order_by(func.count().desc()))]
        rejected = [str(r) for r in conn.execute(
            select(m.RejectedEvent.reason).order_by(m.RejectedEvent.id)).scalars()]
        ours = [(str(c), int(s), str(code)) for c, s, code in conn.execute(
            select(m.IssuedCoupon.customer_key, m.IssuedCoupon.series_id, m.IssuedCoupon.code))]
        unsettled = {(str(c), int(s)) for c, s in conn.execute(
            select(m.Entity.customer_key, m.Entity.series_id).where(
                m.Entity.state.not_in([s.value for s in TERMINAL_STATES])))}
        examples = _examples(conn)
    with SandboxAdmin(sandbox_url) as admin:
        after = admin.ledger()
        calls = admin.stats().get("calls", {})
    problems, pending = exactly_once_problems(ours, before, after, unsettled)
    return Outcome(
        coupons=coupons, retried=int(retried), dead=dead, rejected=rejected,
        duplicates=taken_in["duplicate"] if taken_in is not None else None,
        calls={str(k): int(v) for k, v in calls.items()},
        problems=problems, pending=pending, sandbox_issued=len(after),
        examples=examples,
    )


def _examples(conn: Any) -> dict[str, str]:
    """Real event ids worth a look: one reconciled, one retried, one dead, one rejected."""
    from sqlalchemy import select

    from worker.ledger import models as m

    queries = {
        "reconciled after a timeout or 5xx": select(m.IssuedCoupon.event_id)
        .where(m.IssuedCoupon.recorded_via == "reconcile"),
        "retried after a 503": select(m.Entity.event_id).join(
            m.EntityHistory, m.EntityHistory.entity_id == m.Entity.id)
        .where(m.EntityHistory.kind == "retry_scheduled", m.EntityHistory.error_code == "http_503"),
        "a series dead-lettered": select(m.Entity.event_id).where(m.Entity.state == "dead"),
        "a rejected message": select(m.RejectedEvent.event_id)
        .where(m.RejectedEvent.event_id.is_not(None)),
    }
    found = {}
    for label, query in queries.items():
        event_id = conn.execute(query.limit(1)).scalar()
        if event_id:
            found[label] = str(event_id)
    return found


def print_summary(console: Console, plan: Plan, outcome: Outcome, *, drained: bool,
                  drain_s: float, total_s: float) -> None:
    """The table a newcomer reads: what went in, what came out, what went wrong and why."""
    from rich.table import Table

    issued = sum(outcome.coupons.values())
    reconciled = outcome.coupons.get("reconcile", 0)
    table = Table(title="what happened", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    table.add_row("events published", str(len(plan.deliveries)),
                  f"messages: {len(plan.events)} distinct events, {plan.duplicates} repeated, "
                  f"{plan.malformed} malformed")
    table.add_row("coupons issued", str(issued),
                  f"{issued - reconciled} on the first answer, {reconciled} by read-back")
    duplicates = outcome.duplicates
    table.add_row("duplicates suppressed",
                  str(duplicates if duplicates is not None else plan.duplicates),
                  "deliveries that found nothing to claim" if duplicates is not None
                  else "published minus distinct (worker metrics unavailable)")
    table.add_row("retried", str(outcome.retried), "entities scheduled for another attempt")
    table.add_row("reconciled", str(reconciled),
                  "coupons confirmed by read-back after a timeout or 5xx")
    dead_total = sum(n for _code, _label, n in outcome.dead)
    table.add_row("dead-lettered", str(dead_total),
                  escape("\n".join(f"{n} x {code} {label}" for code, label, n in outcome.dead))
                  or "-")
    table.add_row("rejected messages", str(len(outcome.rejected)),
                  escape("\n".join(_shorten(r, 60) for r in outcome.rejected)) or "-")
    table.add_row("Capillary calls", str(sum(outcome.calls.values())),
                  ", ".join(f"{n} {CALL_LABELS.get(path, path)}"
                            for path, n in outcome.calls.items() if n))
    table.add_row("elapsed", f"{total_s:.1f} s",
                  f"{drain_s:.1f} s from first publish to "
                  + ("drained" if drained else "giving up"))
    console.print(table)
    if outcome.exactly_once and drained:
        console.print(f"[bold green]exactly once: OK[/] - the sandbox issued "
                      f"{outcome.sandbox_issued} coupons; every one is in the ledger, none twice")
    elif not outcome.problems:
        console.print(f"[bold yellow]exactly once: not verified[/] - the pipeline did not drain; "
                      f"no discrepancy among the {outcome.sandbox_issued} coupons issued so far"
                      + (f" ({outcome.pending} not recorded yet: their entities are still "
                         "in progress)" if outcome.pending else ""))
    else:
        console.print(f"[bold red]exactly once: FAILED[/] - {len(outcome.problems)} "
                      "discrepancies:")
        for problem in outcome.problems[:20]:
            console.print(f"  {escape(problem)}")


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def print_next_steps(console: Console, backends: Backends, outcome: Outcome,
                     flower_url: str | None, *, keep: bool, workdir: Path) -> None:
    """Copy-pasteable commands into the run's ledger and logs."""
    from sqlalchemy.engine import make_url

    console.print("\n[bold]where to look next[/]")
    if flower_url:
        console.print(f"  Flower    {flower_url}"
                      + ("" if keep else "  (stopped with the demo: rerun with --keep)"))
    console.print(f"  logs      {_display(workdir / 'logs')}/")
    if backends.database.pgdata is not None and not keep:
        console.print("  (the embedded PostgreSQL is stopped now: rerun with --keep to query "
                      "the ledger with the commands below)")
    exports = {"COUPONS_DATABASE_URL": backends.database.url, **backends.broker.env(),
               "COUPONS_ENV_FILE": ""}
    if make_url(backends.database.url).password:
        # Never echo a password the caller configured.
        exports["COUPONS_DATABASE_URL"] = make_url(backends.database.url).render_as_string()
    for name, value in exports.items():
        console.print(f"  export {name}={_shell_quote(value)}")
    for label, event_id in outcome.examples.items():
        console.print(f"  coupon-worker events show {event_id}    # {label}")
    console.print("  coupon-worker dlq list")
    if keep:
        console.print(f"\neverything is still running; stop it with:  coupon-worker demo "
                      f"--stop --workdir {_shell_quote(_display(workdir))}")


def _shell_quote(value: str) -> str:
    return shlex.quote(value) if value else "''"


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """The command's options."""

    events: int
    timeout_s: float
    backend: Backend
    workdir: Path
    flower: bool
    keep: bool
    namespace: str = ""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same road as Ctrl-C, so the finally block stops the children.
    raise KeyboardInterrupt


def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; returns the exit code (0: drained and exactly once)."""
    from coupon_devtools.sandbox import SandboxAdminError

    started = time.monotonic()
    workdir = options.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    stop_kept(workdir, console)
    console.print(f"[bold]coupon-worker demo[/]: {options.events} tier-upgrade events through "
                  "the real worker, with faults")
    services: list[Service] = []
    database: Database | None = None
    keep = False  # only a run that got to the end leaves its processes running
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        backends = choose_backends(options.backend, workdir, namespace=options.namespace)
        database = backends.database
        console.print(f"  PostgreSQL  {escape(backends.database.label)}")
        console.print(f"  broker      {escape(backends.broker.label)}")
        code = _run_pipeline(options, backends, workdir, services, console, started)
        if options.keep:
            _save_state(workdir, services, backends.database)
            keep = True
        return code
    except (DemoError, WorkerError, SandboxAdminError) as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep and (services or (database and database.pgdata)):
            console.print("stopping what the demo started...")
        cleanup(services, database, keep=keep)


def _run_pipeline(options: DemoOptions, backends: Backends, workdir: Path,
                  services: list[Service], console: Console, started: float) -> int:
    from sqlalchemy import create_engine

    from worker.config import Settings

    logs = workdir / "logs"
    plan = plan_scenario(options.events)
    scenario = write_scenario(plan, workdir / "scenario.json")
    console.print(f"  scenario    {plan.describe()}")
    if backends.broker.folder is not None and options.events > FILE_BROKER_COMFORT:
        console.print(f"  note        the file-based broker lists its folder for every message, "
                      f"so beyond about {FILE_BROKER_COMFORT} events it slows down a lot")
    sandbox_port, metrics_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env = demo_env(backends, sandbox_url, metrics_port)
    migrate(env, logs)
    start_processes(env, scenario, logs, sandbox_port=sandbox_port, flower=options.flower,
                    services=services)
    for service in services:
        console.print(f"  {service.name:<11} {service.url or 'demo@' + socket.gethostname()}"
                      f"  (pid {service.process.pid}, log {_display(service.log_path)})")
    inject_faults(sandbox_url, plan)

    engine = create_engine(backends.database.url, pool_size=2)
    try:
        publish_started = time.monotonic()
        publish_batch(Settings.model_validate(env), plan)
        drained, last = watch_progress(engine, plan, f"http://127.0.0.1:{metrics_port}/metrics",
                                       options.timeout_s, console, services)
        drain_s = time.monotonic() - publish_started
        if not drained:
            console.print(f"[bold red]not drained after {options.timeout_s:g} s[/]: "
                          f"{len(plan.events) - last.events_at_rest} events not at rest; "
                          f"entities by state: {dict(last.entities)}")
        outcome = summarise(engine, sandbox_url, last.taken_in)
    finally:
        engine.dispose()
    print_summary(console, plan, outcome, drained=drained, drain_s=drain_s,
                  total_s=time.monotonic() - started)
    flower_url = next((s.url for s in services if s.name == "flower"), None)
    print_next_steps(console, backends, outcome, flower_url, keep=options.keep, workdir=workdir)
    return 0 if drained and outcome.exactly_once else 1


def demo_command() -> click.Command:
    """The ``demo`` command, for ``main.add_command(demo_command())`` in the CLI."""

    @click.command("demo")
    @click.option("--events", type=click.IntRange(10, 100_000), default=300, show_default=True,
                  help="Distinct tier-upgrade events to publish.")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=180.0,
                  show_default=True, help="Seconds to wait for the ledger to drain.")
    @click.option("--backend", type=click.Choice(get_args(Backend)), default="auto",
                  show_default=True,
                  help="auto: local PostgreSQL and RabbitMQ when they answer, embedded ones "
                       "otherwise; local or embedded: force one.")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(".demo"), show_default=True,
                  help="Work folder: logs, scenario, embedded database and file broker.")
    @click.option("--flower/--no-flower", default=True, show_default=True,
                  help="Start Flower to watch the tasks.")
    @click.option("--keep", is_flag=True,
                  help="Leave everything running at the end (stop it with --stop).")
    @click.option("--stop", is_flag=True,
                  help="Only stop what an earlier --keep run left running in --workdir.")
    @click.option("--namespace", default="", hidden=True,
                  help="Suffix for the database and vhost names, so parallel runs (tests) do "
                       "not collide.")
    def demo(events: int, timeout_s: float, backend: Backend, workdir: Path, flower: bool,
             keep: bool, stop: bool, namespace: str) -> None:
        """Run the whole pipeline on this machine: sandbox Capillary, worker, Flower, faults.

        Uses the local PostgreSQL and RabbitMQ when they answer, else embedded ones, and
        checks at the end that every coupon was issued exactly once.
        """
        console = Console(highlight=False, soft_wrap=True)
        if stop:
            if not stop_kept(workdir.resolve(), console):
                console.print(f"nothing left running in {_display(workdir.resolve())}")
            return
        if namespace and not re.fullmatch(r"[a-z0-9]{1,20}", namespace):
            raise click.BadParameter("lower-case letters and digits only", param_hint="namespace")
        code = run_demo(DemoOptions(events, timeout_s, backend, workdir, flower, keep,
                                    namespace), console)
        sys.exit(code)

    return demo

