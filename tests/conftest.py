"""Shared fixtures: a database, a RabbitMQ vhost and a sandbox of this test session's own.

Real services, no skipping: if PostgreSQL or RabbitMQ is down the tests fail (``.ci/services``
starts them). Each session creates its own database (migrated with Alembic) and vhost and drops
them at the end; each test empties the ledger, resets the sandbox and gets queue names of its
own, so tests run in any order and twice in a row.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, text

from coupon_devtools.harness.databases import create_migrated, drop_database
from coupon_devtools.harness.pgbouncer import PgBouncer
from coupon_devtools.harness.processes import Spawned, spawn
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost
from coupon_devtools.sandbox import BackgroundSandbox, SandboxAdmin, SandboxOptions
from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
from worker.config import Settings, load_settings
from worker.health import check_health

PG_ADMIN_URL = os.environ.get(
    "COUPONS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
RABBIT_HOST = os.environ.get("COUPONS_TEST_RABBIT_HOST", "127.0.0.1:5672")
REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
LEDGER_TABLES = ("coupons", "entity_history", "api_calls", "operator_actions", "entities",
                 "events", "rejected_events", "circuit_breakers", "rate_limit_buckets",
                 "replay_job_items", "replay_jobs", "message_failures", "maintenance_runs",
                 "console_sessions", "login_attempts", "dead_letter_groups")
SANDBOX_USER, SANDBOX_PASSWORD = "store.server", "server123"

# Tests must not pick up a developer's .env file.
os.environ["COUPONS_ENV_FILE"] = ""


# Test modules whose tests must share one test process: the bench's two checks share one run
# (a module fixture), the disruptive tests the PostgreSQL cluster and RabbitMQ node that their
# process creates (tests/acceptance/disruptive/conftest.py); the chaos run, the longest, has a
# group of its own, and so has the chaos run on a RabbitMQ cluster. Named here, by file, because
# pytest-xdist's xdist_group mark is lost with pytest 9's node ids.
SHARED_PROCESS = {
    "tests/acceptance/test_bench.py": "bench",
    "tests/acceptance/disruptive/test_chaos.py": "chaos",
    "tests/acceptance/disruptive/test_cluster.py": "cluster",
    "tests/acceptance/disruptive/test_restarts.py": "restarts",
    "tests/acceptance/disruptive/test_reconnect.py": "restarts",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's load scheduling, with each group of ``SHARED_PROCESS`` one unit of work,
    handed out first (every other test is a unit of its own, handed out in collection order:
    the acceptance tests, the longest, come first)."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedProcessScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_PROCESS.get(nodeid.split("::", 1)[0], nodeid)

    return SharedProcessScheduling(config, log)


# The slow suites by what they start, so that `make test-fast` can leave them out: a test that
# asks for a PgBouncer, a RabbitMQ cluster or the browser is marked as such whatever its module
# says, and every acceptance test runs real worker subprocesses.
MARK_BY_FIXTURE = {"pgbouncer": "pooler", "cluster": "cluster", "console_url": "browser"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith("tests/acceptance/"):
            item.add_marker(pytest.mark.slow)
        fixtures = getattr(item, "fixturenames", ())
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(getattr(pytest.mark, mark))


def _session_tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def session_tag() -> str:
    return _session_tag()


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def fresh_url() -> Iterator[str]:
    """The URL of a database that does not exist yet (a migration test creates it), dropped
    afterwards."""
    name = f"cw_fresh_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    drop_database(PG_ADMIN_URL, name)


@pytest.fixture(scope="session")
def database_url(session_tag: str) -> Iterator[str]:
    name = f"cw_test_{session_tag}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    create_migrated(url)
    yield url
    drop_database(PG_ADMIN_URL, name)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(database_url, pool_size=5, pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture
def clean_ledger(engine: Engine) -> Engine:
    """An empty ledger for this test."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(LEDGER_TABLES)} RESTART IDENTITY CASCADE"))
    return engine


@pytest.fixture(scope="session")
def pgbouncer(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    """A PgBouncer of this test process's own in transaction pooling mode, in front of the
    session's database, started when first asked for (docs/pooler.md)."""
    bouncer = PgBouncer.start(tmp_path_factory.mktemp("pgbouncer"), database_url)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def pooled_engine(pgbouncer: PgBouncer, database_url: str) -> Iterator[Engine]:
    """The worker's engine through ``pgbouncer`` (``COUPONS_DB_POOLER=transaction``), with the
    test settings' statement and lock timeouts (3 s, 1 s)."""
    engine = make_engine(pgbouncer.url(database_url), application_name="coupon-worker-test",
                         limits=ConnectionLimits(statement_timeout_s=3.0, lock_timeout_s=1.0,
                                                 pooler="transaction"))
    yield engine
    engine.dispose()


@pytest.fixture
def pooled_settings_factory(settings_factory: Callable[..., Settings], pgbouncer: PgBouncer,
                            database_url: str) -> Callable[..., Settings]:
    """Settings whose ledger is reached through ``pgbouncer``, as ``COUPONS_DB_POOLER`` says."""
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"database_url": pgbouncer.url(database_url),
                                  "db_pooler": "transaction"}
        values.update(overrides)
        return settings_factory(**values)

    return make


# -- RabbitMQ ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker_url(session_tag: str) -> Iterator[str]:
    # Tests restart the broker: a command landing while it starts waits for it.
    vhost = f"cw-test-{session_tag}"
    create_vhost(vhost, wait_while_node_down=True)
    yield f"amqp://guest:guest@{RABBIT_HOST}/{vhost}"
    delete_vhost(vhost, wait_while_node_down=True)


# -- the sandbox ---------------------------------------------------------------------------


#: The stricter sandbox the tests run against by default: Capillary as it may really answer,
#: beyond what its documentation promises (entries in an order of their own).
STRICT_SANDBOX = SandboxOptions(shuffle_entries=True)


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(STRICT_SANDBOX) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: BackgroundSandbox) -> Iterator[SandboxAdmin]:
    """The sandbox's admin client, reset for this test."""
    with SandboxAdmin(sandbox_server.url) as admin:
        admin.reset()
        yield admin


@pytest.fixture(scope="session")
def tls_sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    """A second sandbox, over HTTPS: its CA's certificate is ``ca_file``."""
    with BackgroundSandbox(STRICT_SANDBOX,
                           tls_dir=tmp_path_factory.mktemp("sandbox-tls")) as server:
        yield server


@pytest.fixture
def tls_sandbox(tls_sandbox_server: BackgroundSandbox) -> Iterator[SandboxAdmin]:
    """The HTTPS sandbox's admin client, reset for this test."""
    with SandboxAdmin(tls_sandbox_server.url, ca_file=str(tls_sandbox_server.ca_file)) as admin:
        admin.reset()
        yield admin


# -- settings ------------------------------------------------------------------------------


@pytest.fixture
def queue_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings_factory(database_url: str, broker_url: str, sandbox_server: BackgroundSandbox,
                     queue_prefix: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "broker_url": broker_url,
            "capillary_base_url": sandbox_server.url,
            "capillary_username": SANDBOX_USER,
            "capillary_password": SANDBOX_PASSWORD,
            "events_queue": f"{queue_prefix}.events",
            "tasks_queue": f"{queue_prefix}.tasks",
            "retry_queue": f"{queue_prefix}.retry",
            "dead_queue": f"{queue_prefix}.dead",
            "http_timeout_s": 2.0,
            "http_connect_timeout_s": 1.0,
            "rate_limit_max_wait_s": 5.0,
            "lease_s": 15.0,
            "settle_window_s": 4.0,
            "retry_base_s": 0.2,
            "retry_max_s": 1.0,
            "reconcile_delay_s": 0.2,
            # Each sweep is a few statements: every fifth of a second, an idle test worker
            # cost 7 % of a core (and its PostgreSQL backend more), a half second half that.
            "sweep_interval_s": 0.5,
            "metrics_port": 0,
            # Inside the short test leases' hard time limit (lease - 5 s).
            "db_connect_timeout_s": 2,
            "db_statement_timeout_s": 3.0,
            "db_lock_timeout_s": 1.0,
            "db_keepalive_idle_s": 1,
            "db_keepalive_interval_s": 1,
            "db_keepalive_count": 2,
            "heartbeat_dir": str(tmp_path / "heartbeats"),
            "heartbeat_interval_s": 0.5,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


def _env_names() -> dict[str, str]:
    """Every setting's environment variable, read from the settings model itself."""
    return {
        name: field.validation_alias
        for name, field in Settings.model_fields.items()
        if isinstance(field.validation_alias, str)
    }


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess load exactly these settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    for attr, name in _env_names().items():
        value = getattr(settings, attr)
        if isinstance(value, SecretStr):
            env[name] = value.get_secret_value()
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        elif value is not None:
            env[name] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- worker subprocesses -------------------------------------------------------------------


@dataclass
class WorkerProcess(Spawned):
    """A real ``coupon-worker worker`` in a subprocess, its log in a file.

    ``stop()`` is a warm shutdown through the main process, ``kill()`` SIGKILLs the whole
    group (main process and pool children at once)."""

    extra: dict[str, Any] = field(default_factory=dict)
    heartbeat_dir: Path | None = None

    def beating(self) -> bool:
        """Whether this worker's consumer loop runs: a fresh heartbeat with its pid.

        The heartbeat is written by a timer on the consumer's event loop, started after the
        task consumers: state the worker shows, not a line it happens to log.
        """
        if self.heartbeat_dir is None:
            return False
        report = check_health(self.heartbeat_dir, pid=self.process.pid)
        return report.healthy

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.log()}")
            if self.beating():
                return
            time.sleep(0.1)
        raise AssertionError(f"worker not consuming after {timeout_s:g} s:\n{self.log()}")


def coupon_worker_command() -> str:
    found = BIN_DIR / "coupon-worker"
    if found.exists():
        return str(found)
    which = shutil.which("coupon-worker")
    assert which, "coupon-worker is not installed in this environment"
    return which


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report ends with the log tail of every worker it started."""
    report = yield
    workers: list[WorkerProcess] = getattr(item, "started_workers", [])
    if report.failed and report.when == "call":
        for worker in workers:
            report.sections.append((f"worker {worker.name} (log tail)", worker.log_tail(20_000)))
    return report


@pytest.fixture
def start_worker(request: pytest.FixtureRequest,
                 tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []
    request.node.started_workers = started

    def start(settings: Settings, *args: str, concurrency: int = 2, pool: str = "prefork",
              env: dict[str, str | None] | None = None, node_name: str | None = "",
              wait_ready: bool = True) -> WorkerProcess:
        """``node_name``: "" for a name of this test's own, None for the command's default;
        ``env``: variables to add, or to remove (None)."""
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        environment = settings_env(settings)
        for variable, value in (env or {}).items():
            if value is None:
                environment.pop(variable, None)
            else:
                environment[variable] = value
        naming = [] if node_name is None else ["-n", node_name or f"{name}@%h"]
        spawned = spawn(name, [coupon_worker_command(), "worker", "-c", str(concurrency),
                               "-P", pool, *naming, *args], environment, tmp_path,
                        cwd=REPO_ROOT)
        worker = WorkerProcess(spawned.name, spawned.process, spawned.log_path,
                               heartbeat_dir=Path(settings.heartbeat_dir))
        started.append(worker)
        if wait_ready:
            worker.wait_ready()
        return worker

    yield start
    # The test is over: nothing is owed a warm shutdown, and a warm one costs seconds each.
    for worker in started:
        worker.kill()


def wait_until(predicate: Callable[[], Any], *, timeout_s: float = 30.0,
               interval_s: float = 0.1, message: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message} (last: {last!r})")


# -- the command line, in process ----------------------------------------------------------


def run_cli(settings: Settings, *args: str, stdin: bytes | str | None = None) -> Any:
    """``coupon-worker *args`` run in this process on exactly these settings: click's
    ``Result`` (``exit_code``, ``stdout``, ``stderr``, ``output``).

    The same command as the installed script, without a Python start-up of its own (a
    subprocess costs about a second of CPU)."""
    from click.testing import CliRunner
    from rich.console import Console

    from worker.entrypoints import cli as cli_module

    env: dict[str, str | None] = {name: None for name in _env_names().values()}
    env.update((name, value) for name, value in settings_env(settings).items()
               if name.startswith(("COUPONS_", "CAPILLARY_")))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    console = cli_module.output.console
    # Wide enough that a table cell is never folded across lines in these checks.
    cli_module.output.console = Console(width=400)
    try:
        return CliRunner().invoke(cli_module.main, list(args), input=stdin, env=env,
                                  catch_exceptions=False)
    finally:
        # The command configures logging for a process of its own; give pytest's back.
        cli_module.output.console = console
        root.handlers[:], root.level = handlers, level


@pytest.fixture
def cli(settings: Settings, clean_ledger: Engine,
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``coupon-worker`` commands run in this process, on this test's settings and ledger (the
    settings stay in the environment for the rest of the test)."""
    for name, value in settings_env(settings).items():
        if name.startswith(("COUPONS_", "CAPILLARY_")):
            monkeypatch.setenv(name, value)

    def invoke(*args: str, stdin: bytes | None = None) -> Any:
        return run_cli(settings, *args, stdin=stdin)

    return invoke
