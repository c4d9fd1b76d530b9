"""What one bench run stands on: its database, RabbitMQ vhost and sandbox, and every
process it started."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from coupon_devtools.bench.defaults import (
    BENCH_DATABASE,
    BENCH_VHOST,
    LOCAL_BROKER_URL,
    LOCAL_POSTGRES_URL,
    READY_TIMEOUT_S,
    SANDBOX_PASSWORD,
    SANDBOX_USER,
    STOP_TIMEOUT_S,
    BenchError,
    say_nothing,
)
from coupon_devtools.harness.databases import drop_database, recreate_migrated
from coupon_devtools.harness.processes import Spawned, cli_command, spawn
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost
from worker.config import Settings


def _vhost_step(step: Callable[[], None]) -> None:
    """Run a vhost change, a missing or refusing RabbitMQ becoming a :class:`BenchError`."""
    from worker.domain.errors import BrokerUnavailable

    try:
        step()
    except BrokerUnavailable as exc:
        raise BenchError(str(exc)) from exc


@dataclass(frozen=True)
class QueueState:
    messages: int
    consumers: int


class Stack:
    """What one bench run stands on: its database, vhost and sandbox, and every process."""

    def __init__(self, workdir: Path, *, log_level: str, keep: bool, namespace: str = "",
                 say: Callable[[str], None] = say_nothing) -> None:
        if namespace and not namespace.replace("-", "").replace("_", "").isalnum():
            raise BenchError(f"--namespace must be letters, digits, - or _: {namespace!r}")
        self.database = BENCH_DATABASE + (f"_{namespace.replace('-', '_')}" if namespace else "")
        self.vhost = BENCH_VHOST + (f"-{namespace.replace('_', '-')}" if namespace else "")
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.log_level = log_level
        self.keep = keep
        self.say = say
        self.database_url = ""
        self.broker_url = ""
        self.sandbox_url = ""
        self._admin_url = ""
        self._sandbox: Spawned | None = None
        self._spawned: list[Spawned] = []
        self._engine: Engine | None = None
        self._admin: Any = None
        self._run_no = itertools.count(1)
        self._process_no = itertools.count(1)
        self._vhost_made = False
        self.settings: Settings | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.database_url = self._recreate_database()
        self.broker_url = self._recreate_vhost()
        self._engine = create_engine(self.database_url, pool_size=2, max_overflow=2,
                                     connect_args={"application_name": "coupon-worker-bench"})
        self._start_sandbox()
        self.settings = Settings(
            _env_file=None, database_url=self.database_url, broker_url=self.broker_url,
            capillary_base_url=self.sandbox_url, capillary_username=SANDBOX_USER,
            capillary_password=SANDBOX_PASSWORD, events_queue="coupons.events",
            tasks_queue="coupons.tasks", retry_queue="coupons.retry", dead_queue="coupons.dead",
            metrics_port=0, rate_limit_per_minute=None, rate_limit_burst=None,
        )

    def close(self) -> None:
        for spawned in reversed(self._spawned):
            spawned.stop(grace_s=5)
        if self._sandbox is not None:
            self._sandbox.stop(grace_s=5)
        if self._admin is not None:
            self._admin.close()
        if self._engine is not None:
            self._engine.dispose()
        if not self.keep:
            with contextlib.suppress(BenchError):
                if self._vhost_made:
                    _vhost_step(lambda: delete_vhost(self.vhost))
            if self._admin_url:
                with contextlib.suppress(Exception):
                    drop_database(self._admin_url, self.database)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the stack is not open"
        return self._engine

    @property
    def admin(self) -> Any:
        """The sandbox's :class:`~coupon_devtools.sandbox.SandboxAdmin`."""
        assert self._admin is not None, "the stack is not open"
        return self._admin

    @property
    def sandbox_pid(self) -> int | None:
        return self._sandbox.pid if self._sandbox is not None else None

    def next_run(self) -> int:
        return next(self._run_no)

    def _recreate_database(self) -> str:
        configured = os.environ.get("COUPONS_DATABASE_URL") or LOCAL_POSTGRES_URL
        url = make_url(configured).set(drivername="postgresql+psycopg")
        self._admin_url = url.set(database="postgres").render_as_string(hide_password=False)
        bench_url = url.set(database=self.database).render_as_string(hide_password=False)
        self.say(f"database {self.database} on {url.host or 'localhost'}: drop, create, "
                 "migrate")
        try:
            recreate_migrated(bench_url)
        except Exception as exc:
            raise BenchError(f"cannot prepare the bench database: {type(exc).__name__}: "
                             f"{exc}") from exc
        return bench_url

    def _recreate_vhost(self) -> str:
        configured = os.environ.get("COUPONS_BROKER_URL") or LOCAL_BROKER_URL
        if not configured.startswith(("amqp://", "pyamqp://")):
            raise BenchError("the bench needs RabbitMQ (COUPONS_BROKER_URL=amqp://...)")
        head = configured.split("://", 1)[1].split("/", 1)[0]
        self.say(f"RabbitMQ vhost {self.vhost}: delete, create")
        user = head.split("@", 1)[0].split(":", 1)[0] if "@" in head else "guest"
        self._vhost_made = True
        _vhost_step(lambda: create_vhost(self.vhost, user, fresh=True))
        return f"amqp://{head}/{self.vhost}"

    def _start_sandbox(self) -> None:
        from coupon_devtools.sandbox import SandboxAdmin

        self._sandbox = spawn("sandbox", [*cli_command(), "sandbox", "--port", "0"],
                              self.base_env(), self.logs)
        deadline = time.monotonic() + 30
        marker = "sandbox listening on "
        while marker not in self._sandbox.log_tail(10_000):
            if not self._sandbox.alive() or time.monotonic() > deadline:
                raise BenchError("the sandbox did not start:\n" + self._sandbox.log_tail())
            time.sleep(0.05)
        line = next(x for x in self._sandbox.log_tail(10_000).splitlines() if marker in x)
        self.sandbox_url = line.split(marker, 1)[1].strip()
        self._admin = SandboxAdmin(self.sandbox_url, timeout_s=60)
        self._admin.wait_ready(10)
        self.say(f"sandbox at {self.sandbox_url}")

    def configure_sandbox(self, *, latency_ms: float, limit_per_minute: int | None) -> None:
        """Forget every call and coupon, then set the latency and the 429 limit."""
        self.admin.reset()
        self.admin.configure(latency_seconds=latency_ms / 1000.0,
                             rate_limit_per_minute=limit_per_minute)

    # -- environment and workers --------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("COUPONS_", "CAPILLARY_", "BENCH_"))}
        env.update({
            "COUPONS_ENV_FILE": "",
            "COUPONS_LOG_LEVEL": self.log_level,
            "COUPONS_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        })
        if self.database_url:
            env["COUPONS_DATABASE_URL"] = self.database_url
        if self.broker_url:
            env["COUPONS_BROKER_URL"] = self.broker_url
        if self.sandbox_url:
            env.update({"CAPILLARY_BASE_URL": self.sandbox_url,
                        "CAPILLARY_USERNAME": SANDBOX_USER,
                        "CAPILLARY_PASSWORD": SANDBOX_PASSWORD})
        return env

    def start_processes(self, name: str, argv_for: Callable[[int], list[str]], count: int,
                        env: Mapping[str, str], ready: Mapping[str, int]) -> list[Spawned]:
        """Start ``count`` workers and wait until the queues in ``ready`` have their consumers."""
        started = [spawn(f"{name}-{next(self._process_no)}", argv_for(i), env, self.logs)
                   for i in range(count)]
        self._spawned.extend(started)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            states = {queue: self.queue_state(queue) for queue in ready}
            if all(s is not None and s.consumers >= ready[q] for q, s in states.items()):
                return started
            dead = [p for p in started if not p.alive()]
            if dead or time.monotonic() > deadline:
                culprit = dead[0] if dead else started[0]
                raise BenchError(f"{culprit.name} did not become ready (see {culprit.log_path}):"
                                 f"\n{culprit.log_tail()}")
            time.sleep(0.2)

    def stop_processes(self, processes: Sequence[Spawned]) -> None:
        for spawned in processes:
            spawned.stop(STOP_TIMEOUT_S)
            if spawned in self._spawned:
                self._spawned.remove(spawned)

    # -- broker helpers -----------------------------------------------------------------------

    def connection(self, *, confirm: bool = True) -> Any:
        from kombu import Connection

        return Connection(self.broker_url, connect_timeout=10,
                          transport_options={"confirm_publish": confirm})

    def queue_state(self, name: str) -> QueueState | None:
        """Messages and consumers of a queue, or None when it does not exist (yet)."""
        import amqp.exceptions

        with self.connection() as conn:
            channel = conn.channel()
            try:
                ok = channel.queue_declare(queue=name, passive=True)
            except amqp.exceptions.NotFound:
                return None
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return QueueState(int(ok.message_count), int(ok.consumer_count))

    def purge(self, *names: str) -> None:
        import amqp.exceptions

        with self.connection() as conn:
            for name in names:
                channel = conn.channel()
                with contextlib.suppress(amqp.exceptions.NotFound):
                    channel.queue_purge(name)
                with contextlib.suppress(Exception):
                    channel.close()

    # -- ledger helpers -----------------------------------------------------------------------

    def db_sessions(self) -> int:
        """Connections ever opened to the bench database (``pg_stat_database.sessions``)."""
        with self.engine.connect() as conn:
            value = conn.execute(text(
                "SELECT sessions FROM pg_stat_database WHERE datname = :d"),
                {"d": self.database}).scalar()
        return int(value or 0)

    def truncate_ledger(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(
                "TRUNCATE coupons, entity_history, api_calls, operator_actions, entities, "
                "events, rejected_events, circuit_breakers, rate_limit_buckets "
                "RESTART IDENTITY CASCADE"))
