"""``coupon-worker bench``: throughput at the API's limit, measured honestly.

The bench drives the real pipeline: RabbitMQ, PostgreSQL, ``coupon-worker worker`` processes
and the sandbox Capillary server (a subprocess, with the latency and 429 limit each scenario
asks for). It builds everything it uses and removes it afterwards: a database of its own
(``coupon_worker_bench``, dropped and migrated at start), a RabbitMQ vhost of its own
(``coupon-worker-bench``), and every process it started.

Scenarios (``--scenario``):

- ``quick`` (default): ours against the baseline at the options given, beside the sandbox's
  own ceiling and the database round trips per event;
- ``overhead``: the same comparison with a verdict on the target (ours >= 0.9x the baseline's
  throughput at the same concurrency, 50 ms API latency);
- ``scale``: at 100 ms latency, throughput with 1, 2, 4, 8 and 16 concurrent tasks against the
  ideal ``concurrency / latency`` (target: >= 80 % of it, up to the rate limit);
- ``quota``: three worker processes under a 1,200 calls/minute limit, the sandbox refusing
  beyond 1,200 calls in any 60 s too (target: >= 95 % of the limit sustained, zero 429s);
- ``memory``: worker RSS with 10,000 then 100,000 events waiting on the bus, and with
  100,000 retries waiting in the ledger (inserted with SQL, due in a day), each sampled while
  one worker works (and, for the backlogs, while its bridge forwards them);
- ``all``: every one of the above.

How each figure is measured, and why that way:

- *The baseline* is :mod:`coupon_devtools.bench.baseline`: a bare Celery task that POSTs the same
  bulk-issue body with ``requests`` and nothing else, on the same broker, with the same pool,
  concurrency, late acks and prefetch of one. Both sides get their messages the same way: one
  broker-confirmed publish per message, built before the clock starts (ours as plain JSON on
  the events bus, the real way in; or as ``coupons.issue`` tasks with ``--via task``).
- *Throughput* (events/s): a backlog of N events is published onto idle, warmed-up workers
  (every pool process has run a few events first); throughput is N divided by the time from the
  first publish to the last completion. *Completion* for ours is the ledger's record of the
  outcome: ``events.updated_at``, the timestamp the worker writes in the transaction that records
  the coupons (taken as that transaction starts, so its commit, a few ms, is not counted). The
  baseline records nothing, so its completion is the sandbox's call-log time of its answer,
  which leaves out sending the answer, reading it and acknowledging the message. Each side thus
  leaves a few milliseconds out at its end: noise beside a backlog's duration, but worth
  remembering when reading the latency percentiles.
- *Latency* (p50/p95/p99, publish to completion): measured on a second batch, published at a
  steady pace of half the slower system's throughput, the same pace for both, so it is the
  latency of an event under a load both can carry rather than the time an event waited behind a
  backlog (the backlog run's percentiles are printed too; they mostly restate the throughput).
  For ours the same batch is split into stages from the ledger's own timestamps: publish to
  intake (broker, bridge, pool), intake and claim (the first transaction, the rate limiter),
  the API call, and the answer up to the recording transaction.
- *API calls/s* and *429s*: from the sandbox's call log over the same window.
- *RSS*: the sum of VmRSS over the worker's main process and its pool children, from
  ``/proc`` (PSS beside it, since prefork children share pages), after warm-up and at the end.
- *CPU per event*: utime + stime from ``/proc`` over the backlog, per process and summed by
  component: the workers' main and pool processes, the sandbox, PostgreSQL (its own processes
  and the bench database's backends, not other databases'), RabbitMQ (its whole VM, shared with
  anything else using it), the bench itself; plus the whole machine's busy share from
  ``/proc/stat``. The machine's load before the run is printed too: other work skews every
  figure.
- *Database round trips per event*: one real ``services.issue_event`` at a time, in this
  process, on a ``Deps`` from :func:`worker.bootstrap.build_deps` against the bench database and
  the sandbox, with every connection traced by libpq (``PQtrace``): a round trip is a
  ``ReadyForQuery`` from the server, a transaction is a return to the idle state after work,
  a statement is an ``Execute`` (or a simple query other than BEGIN/COMMIT/ROLLBACK), and a
  ping is the pool's pre-ping. This counts what really goes over the wire, BEGIN and COMMIT
  included, which SQLAlchemy's events or ``pg_stat_database`` (flushed lazily by each backend)
  would not show exactly.
- *The sandbox's ceiling*: calls/s at zero latency from 64 concurrent aiohttp clients in this
  process, so a reader can see the stand-in server is not the bottleneck.

The pool is ``prefork``, the only one the worker runs: it is the Celery pool that enforces the
hard time limit an attempt's lease relies on.

Nothing here asserts a figure: targets are printed with a verdict, never enforced. ``--short``
shrinks every scenario to a few seconds for CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal, Protocol, get_args

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from coupon_devtools.harness.databases import drop_database, recreate_migrated
from coupon_devtools.harness.processes import Spawned, cli_command, spawn
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost
from worker.config import Settings

Pool = Literal["prefork"]
Via = Literal["bus", "task"]
ScenarioName = Literal["quick", "overhead", "scale", "quota", "memory", "all"]

BENCH_DATABASE: Final = "coupon_worker_bench"
BENCH_VHOST: Final = "coupon-worker-bench"
LOCAL_POSTGRES_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
SANDBOX_USER: Final = "store.server"
SANDBOX_PASSWORD: Final = "server123"  # noqa: S105 - the sandbox's public demo credentials
SERIES: Final = (544770, 553379)

DEFAULT_EVENTS: Final = 2000
DEFAULT_LATENCY_MS: Final = 50.0
DEFAULT_CONCURRENCY: Final = 8
DEFAULT_POOL: Final[Pool] = "prefork"
DEFAULT_WORKDIR: Final = ".bench"

OVERHEAD_TARGET: Final = 0.9
SCALE_TARGET: Final = 0.8
SCALE_LATENCY_MS: Final = 100.0
SCALE_CONCURRENCIES: Final = (1, 2, 4, 8, 16)
SCALE_STEP_S: Final = 10.0
QUOTA_LIMIT_PER_MINUTE: Final = 1200
QUOTA_WORKERS: Final = 3
QUOTA_TARGET: Final = 0.95
QUOTA_DURATION_S: Final = 90.0
QUOTA_WINDOW_S: Final = 60.0
MEMORY_BACKLOGS: Final = (10_000, 100_000)
MEMORY_RETRIES: Final = 100_000
MEMORY_SAMPLE_S: Final = 30.0
CEILING_CLIENTS: Final = 64
CEILING_DURATION_S: Final = 3.0
ROUND_TRIP_EVENTS: Final = 50
STAGES: Final = ("publish to intake", "intake and claim", "API call",
                  "answer to outcome recorded")
"""Where our events' time goes: broker, bridge and pool dispatch up to the task's intake; the
ingest and claim transaction (and the rate limiter); the HTTP call; reading the answer up to
the timestamp of the transaction that records it."""
PACED_LOAD: Final = 0.5
"""The paced latency batch is published at this share of the baseline's throughput."""

READY_TIMEOUT_S: Final = 90.0
STALL_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1
STOP_TIMEOUT_S: Final = 20.0
CONSOLE_WIDTH: Final = 120
"""Tables printed to a file or a pipe are this wide, so they can be quoted as they are."""


class BenchError(Exception):
    """The bench cannot go on; the message says why and where to look."""


def _say_nothing(_message: str) -> None:
    return None


# -- the machine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the figures were measured on."""

    cpus: int
    cpu_model: str
    memory_gb: float
    python: str
    system: str
    date: str
    celery: str
    postgres: str = "?"
    rabbitmq: str = "?"
    background_busy_pct: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gb() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def describe_machine() -> Machine:
    """The machine, with how busy it already is (other work skews every figure)."""
    import celery

    busy0, total0 = _machine_ticks()
    time.sleep(1.0)
    busy1, total1 = _machine_ticks()
    background = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    load = os.getloadavg()
    return Machine(
        cpus=os.cpu_count() or 1, cpu_model=_cpu_model(), memory_gb=_memory_gb(),
        python=platform.python_version(), system=f"{platform.system()} {platform.release()}",
        date=datetime.now(UTC).isoformat(timespec="seconds"), celery=celery.__version__,
        background_busy_pct=round(background, 1),
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
    )


# -- processes, CPU and memory from /proc --------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, str, float] | None:
    """(parent pid, command name, CPU seconds used) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.find("(") + 1:raw.rfind(")")]
    fields = raw[raw.rfind(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / ticks


def process_table() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, command name, CPU seconds)."""
    table: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def process_tree(roots: Sequence[int], table: Mapping[int, tuple[int, str, float]] | None = None
                 ) -> set[int]:
    """The roots and all their descendants that are alive."""
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _comm, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _status_kb(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class Memory:
    """Resident memory of a process tree, in kB: RSS summed, and PSS (shared pages split)."""

    rss_kb: int
    pss_kb: int
    processes: int

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024

    @property
    def pss_mb(self) -> float:
        return self.pss_kb / 1024


def memory_of(roots: Sequence[int]) -> Memory:
    pids = process_tree(roots)
    return Memory(sum(_status_kb(p, "status", "VmRSS:") for p in pids),
                  sum(_status_kb(p, "smaps_rollup", "Pss:") for p in pids), len(pids))


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


CPU_GROUPS: Final = ("workers", "worker main", "worker pool", "sandbox", "postgres",
                     "rabbitmq", "bench")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of every process that counts, by pid, at one moment."""

    per_pid: Mapping[int, tuple[str, float]]
    machine_busy: int
    machine_total: int

    def seconds(self, group: str) -> float:
        return sum(cpu for g, cpu in self.per_pid.values() if g == group)


def _counted_postgres(pid: int, database: str | None) -> bool:
    """PostgreSQL's own processes, and the backends of ``database``, not other databases'."""
    if database is None:
        return True
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
    except (OSError, UnicodeDecodeError):
        return False
    # A client backend reads "postgres: <cluster>: <user> <database> <host>(<port>) <state>".
    for i, word in enumerate(words):
        if "(" in word and word.endswith(")") and i >= 1:
            return words[i - 1] == database
    return True


def cpu_snapshot(worker_roots: Sequence[int], sandbox_pid: int | None,
                 database: str | None = None) -> CpuSnapshot:
    """Worker trees, the sandbox, PostgreSQL (server and ``database``'s backends), RabbitMQ
    and this process."""
    table = process_table()
    workers = process_tree(worker_roots, table)
    mains = set(worker_roots)
    per_pid: dict[int, tuple[str, float]] = {}
    for pid, (_ppid, comm, cpu) in table.items():
        if pid in workers:
            per_pid[pid] = ("worker main" if pid in mains else "worker pool", cpu)
        elif pid == sandbox_pid:
            per_pid[pid] = ("sandbox", cpu)
        elif comm == "postgres" and _counted_postgres(pid, database):
            per_pid[pid] = ("postgres", cpu)
        elif comm.startswith(("beam", "erl")):
            per_pid[pid] = ("rabbitmq", cpu)
        elif pid == os.getpid():
            per_pid[pid] = ("bench", cpu)
    busy, total = _machine_ticks()
    return CpuSnapshot(per_pid, busy, total)


def cpu_per_event(before: CpuSnapshot, after: CpuSnapshot, events: int
                  ) -> tuple[dict[str, float], float]:
    """CPU milliseconds per event by component, and the machine's busy share in %.

    Counted per process: a process that started in between counts from zero, and one that
    exited in between is lost (never negative), e.g. a short-lived database connection.
    """
    used = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, cpu) in after.per_pid.items():
        previous = before.per_pid.get(pid)
        used[group] += max(cpu - (previous[1] if previous else 0.0), 0.0)
    used["workers"] = used["worker main"] + used["worker pool"]
    per_event = {name: round(value * 1000 / max(events, 1), 2) for name, value in used.items()}
    total = after.machine_total - before.machine_total
    busy = after.machine_busy - before.machine_busy
    return per_event, round(100.0 * busy / total, 1) if total > 0 else 0.0


# -- RabbitMQ ------------------------------------------------------------------------------


def _vhost_step(step: Callable[[], None]) -> None:
    """Run a vhost change, a missing or refusing RabbitMQ becoming a :class:`BenchError`."""
    from worker.errors import BrokerUnavailable

    try:
        step()
    except BrokerUnavailable as exc:
        raise BenchError(str(exc)) from exc


# -- events and batches --------------------------------------------------------------------


def _customer_id(run_no: int, index: int) -> str:
    return f"9{run_no:04d}{index:07d}"


def make_event(run_no: int, index: int, series: Sequence[int], at: datetime) -> dict[str, Any]:
    """One bench event: a customer of its own, so no per-customer limit ever applies."""
    return {
        "eventId": f"bench-{run_no}-{index}",
        "eventType": "BenchIssue",
        "occurredAt": at.isoformat(),
        "customer": {"id": _customer_id(run_no, index)},
        "seriesIds": list(series),
        "metadata": {"sourceType": "Bench", "sourceId": f"run-{run_no}",
                     "notes": "coupon-worker bench", "reason": "throughput"},
    }


@dataclass
class Batch:
    """Events published together, with the wall-clock time each was published at."""

    run_no: int
    events: list[dict[str, Any]]
    published_at: list[float] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"bench-{self.run_no}-"

    def __len__(self) -> int:
        return len(self.events)

    def index_of_customer(self, customer_id: str) -> int | None:
        head = f"9{self.run_no:04d}"
        if not customer_id.startswith(head) or len(customer_id) != len(head) + 7:
            return None
        return int(customer_id[len(head):])


@dataclass(frozen=True)
class Percentiles:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        if not seconds:
            return cls(math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(seconds)

        def at(q: float) -> float:
            rank = q * (len(ordered) - 1)
            low, high = math.floor(rank), math.ceil(rank)
            value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
            return round(value * 1000, 1)

        return cls(at(0.50), at(0.95), at(0.99), round(ordered[-1] * 1000, 1))


# -- the stack: database, broker, sandbox --------------------------------------------------


@dataclass(frozen=True)
class QueueState:
    messages: int
    consumers: int


class Stack:
    """What one bench run stands on: its database, vhost and sandbox, and every process."""

    def __init__(self, workdir: Path, *, log_level: str, keep: bool, namespace: str = "",
                 say: Callable[[str], None] = _say_nothing) -> None:
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


# -- the two systems under test ------------------------------------------------------------


class System(Protocol):
    """Something that turns published events into bulk-issue calls."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def roots(self) -> list[int]: ...

    def processes(self) -> list[Spawned]: ...

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]: ...

    def target_queue(self) -> Any: ...

    def done(self, batch: Batch) -> int: ...

    def completion_times(self, batch: Batch) -> dict[int, float]: ...

    def stages(self, batch: Batch) -> dict[str, Percentiles]: ...


@dataclass
class WorkerShape:
    """How many worker processes, each with how many pool slots of which kind."""

    workers: int
    concurrency: int
    pool: Pool


class _Processes:
    """The worker processes a system runs, started by ``start`` and stopped here."""

    stack: Stack
    _processes: list[Spawned]

    def stop(self) -> None:
        self.stack.stop_processes(self._processes)
        self._processes = []

    def roots(self) -> list[int]:
        return [p.pid for p in self._processes]

    def processes(self) -> list[Spawned]:
        return list(self._processes)


class Ours(_Processes):
    """``coupon-worker worker`` processes, fed on the events bus (or as tasks)."""

    name = "coupon-worker"

    def __init__(self, stack: Stack, shape: WorkerShape, *, via: Via = "bus",
                 rate_limit_per_minute: int | None = None, rate_limit_burst: int | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.stack = stack
        self.shape = shape
        self.via = via
        self.rate_limit_per_minute = rate_limit_per_minute
        self.rate_limit_burst = rate_limit_burst
        self.extra_env = dict(extra_env or {})
        self._processes: list[Spawned] = []
        self._app: Any = None

    def env(self) -> dict[str, str]:
        env = self.stack.base_env()
        if self.rate_limit_per_minute:
            env["COUPONS_RATE_LIMIT_PER_MINUTE"] = str(self.rate_limit_per_minute)
        if self.rate_limit_burst:
            env["COUPONS_RATE_LIMIT_BURST"] = str(self.rate_limit_burst)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        shape = self.shape
        tag = uuid.uuid4().hex[:6]

        def argv(i: int) -> list[str]:
            return [*cli_command(), "worker", "-c", str(shape.concurrency), "-P", shape.pool,
                    "-n", f"bench{i}-{tag}@%h"]

        self._processes = self.stack.start_processes(
            "ours", argv, shape.workers, self.env(),
            {"coupons.tasks": shape.workers, "coupons.events": shape.workers})

    def target_queue(self) -> Any:
        from worker.broker import topology

        settings = self.stack.settings
        assert settings is not None
        if self.via == "bus":
            return topology.events_queue(settings)
        return topology.tasks_queue(settings)

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]:
        if self.via == "bus":
            return [(json.dumps(e).encode("utf-8"), {}) for e in batch.events]
        from worker.broker.publisher import event_argsrepr
        from worker.celery_app import TASK_ISSUE, create_app

        if self._app is None:
            self._app = create_app(self.stack.settings)
        return [
            _task_message(self._app, TASK_ISSUE, {"event": e, "source": "task"},
                          kwargsrepr=event_argsrepr(e["eventId"], e["customer"]["id"],
                                                    e["seriesIds"]))
            for e in batch.events
        ]

    def done(self, batch: Batch) -> int:
        with self.stack.engine.connect() as conn:
            count = conn.execute(
                text("SELECT count(*) FROM events WHERE event_id LIKE :p "
                     "AND state <> 'processing'"), {"p": batch.prefix + "%"}).scalar()
        return int(count or 0)

    def completion_times(self, batch: Batch) -> dict[int, float]:
        with self.stack.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT event_id, EXTRACT(EPOCH FROM updated_at) FROM events "
                     "WHERE event_id LIKE :p AND state = 'completed'"),
                {"p": batch.prefix + "%"}).all()
        return {int(r[0].rsplit("-", 1)[1]): float(r[1]) for r in rows}

    def stages(self, batch: Batch) -> dict[str, Percentiles]:
        """Where an event's time goes, from the ledger's own timestamps."""
        with self.stack.engine.connect() as conn:
            rows = conn.execute(text(
                """
                SELECT e.event_id, EXTRACT(EPOCH FROM e.received_at),
                       EXTRACT(EPOCH FROM a.started_at), a.latency_ms / 1000.0,
                       EXTRACT(EPOCH FROM e.updated_at)
                  FROM events e JOIN api_calls a
                    ON a.event_id = e.event_id AND a.operation = 'bulk_issue'
                 WHERE e.event_id LIKE :p AND e.state = 'completed'
                """), {"p": batch.prefix + "%"}).all()
        parts: dict[str, list[float]] = {name: [] for name in STAGES}
        for row in rows:
            published = batch.published_at[int(row[0].rsplit("-", 1)[1])]
            received, started, call_s, recorded = (float(v) for v in row[1:])
            for name, value in zip(STAGES, (received - published, started - received, call_s,
                                            recorded - started - call_s), strict=True):
                parts[name].append(value)
        return {name: Percentiles.of(values) for name, values in parts.items()}


class Baseline(_Processes):
    """``celery -A coupon_devtools.bench.baseline worker``: the bare task, fed Celery messages."""

    name = "baseline"

    def __init__(self, stack: Stack, shape: WorkerShape) -> None:
        self.stack = stack
        self.shape = shape
        self._processes: list[Spawned] = []
        self._app: Any = None
        self._calls_seen = 0

    def start(self) -> None:
        from coupon_devtools.bench.baseline import BASELINE_QUEUE

        shape = self.shape
        tag = uuid.uuid4().hex[:6]

        def argv(i: int) -> list[str]:
            return [sys.executable, "-m", "celery", "-A", "coupon_devtools.bench.baseline",
                    "worker",
                    "-Q", BASELINE_QUEUE, "-c", str(shape.concurrency), "-P", shape.pool,
                    "-n", f"baseline{i}-{tag}@%h", "--without-gossip", "--without-mingle",
                    f"--loglevel={self.stack.log_level}"]

        self._processes = self.stack.start_processes(
            "baseline", argv, shape.workers, self.stack.base_env(),
            {BASELINE_QUEUE: shape.workers})

    def target_queue(self) -> Any:
        from coupon_devtools.bench.baseline import baseline_queue

        return baseline_queue()

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]:
        from coupon_devtools.bench.baseline import TASK_BASELINE_ISSUE, create_app

        if self._app is None:
            self._app = create_app(self.stack.base_env())
        return [_task_message(self._app, TASK_BASELINE_ISSUE, {"event": e},
                              kwargsrepr=f"event={e['eventId']}") for e in batch.events]

    def done(self, batch: Batch) -> int:
        stats = self.stack.admin.stats()
        return int(stats["calls"]["bulk"]) - self._calls_seen

    def mark(self) -> None:
        """Count only calls from now on (the sandbox's counters are cumulative)."""
        self._calls_seen = int(self.stack.admin.stats()["calls"]["bulk"])

    def completion_times(self, batch: Batch) -> dict[int, float]:
        since = min(batch.published_at) if batch.published_at else None
        times: dict[int, float] = {}
        for call in self.stack.admin.calls(since):
            if call["path"] != "bulk" or call["status"] != 200:
                continue
            index = batch.index_of_customer(str(call["customerId"]))
            if index is not None:
                times[index] = float(call["t"])
        return times

    def stages(self, batch: Batch) -> dict[str, Percentiles]:
        return {}


def _task_message(app: Any, task: str, kwargs: dict[str, Any], *, kwargsrepr: str
                  ) -> tuple[bytes, dict[str, Any]]:
    """A Celery protocol-2 message, serialized up front: (JSON body, publish options)."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs, argsrepr="()",
                                  kwargsrepr=kwargsrepr, ignore_result=True)
    options = {"headers": message.headers, **message.properties}
    return json.dumps(message.body).encode("utf-8"), options


def publish(stack: Stack, system: System, batch: Batch, *, pace_per_s: float | None = None
            ) -> None:
    """Publish a batch, one broker-confirmed message at a time; stamps ``published_at``."""
    from worker.broker.publisher import PUBLISH_RETRY_POLICY

    messages = system.prepare(batch)
    queue = system.target_queue()
    batch.published_at = []
    with stack.connection() as conn:
        producer = conn.Producer()
        start = time.monotonic()
        for i, (body, options) in enumerate(messages):
            if pace_per_s:
                delay = start + i / pace_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            batch.published_at.append(time.time())
            producer.publish(
                body, exchange=queue.exchange, routing_key=queue.routing_key,
                declare=[queue], content_type="application/json", content_encoding="utf-8",
                delivery_mode=2, retry=True, retry_policy=PUBLISH_RETRY_POLICY, **options,
            )


def publish_fast(stack: Stack, queue: Any, bodies: Iterator[bytes]) -> int:
    """Fill a queue quickly (no publisher confirms): for backlogs that are not measured."""
    count = 0
    with stack.connection(confirm=False) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue] if count == 0 else [],
                             content_type="application/json", content_encoding="utf-8",
                             delivery_mode=2)
            count += 1
    return count


def wait_done(system: System, batch: Batch, *, timeout_s: float | None = None) -> None:
    """Wait until every event of the batch completed; fails when progress stalls."""
    last, last_change = -1, time.monotonic()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
        done = system.done(batch)
        if done >= len(batch):
            return
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        dead = [p for p in system.processes() if not p.alive()]
        stalled = now - last_change > STALL_TIMEOUT_S
        if dead or stalled or (deadline is not None and now > deadline):
            running = system.processes()
            culprit = dead[0] if dead else running[0] if running else None
            tail = f"\n{culprit.name} log ({culprit.log_path}):\n{culprit.log_tail()}" \
                if culprit else ""
            why = "a worker died" if dead else "no progress" if stalled else "timed out"
            raise BenchError(f"{system.name}: {why} with {done}/{len(batch)} events done{tail}")
        time.sleep(POLL_S)


# -- one measured run ----------------------------------------------------------------------


@dataclass
class RunResult:
    """What one system did with one backlog (and one paced batch)."""

    system: str
    events: int
    completed: int
    duration_s: float
    events_per_s: float
    calls: int
    calls_per_s: float
    status_429: int
    backlog_latency: Percentiles
    rss_before: Memory
    rss_after: Memory
    cpu_ms_per_event: dict[str, float]
    machine_busy_pct: float
    paced_events: int = 0
    paced_rate_per_s: float | None = None
    paced_latency: Percentiles | None = None
    paced_stages: dict[str, Percentiles] = field(default_factory=dict)
    db_sessions_opened: int | None = None


def _bulk_calls_between(stack: Stack, start: float, end: float) -> list[dict[str, Any]]:
    return [c for c in stack.admin.calls(start)
            if c["path"] == "bulk" and start <= float(c["t"]) <= end]


def warm_up(stack: Stack, system: System, shape: WorkerShape) -> None:
    """A few events per pool slot, so every process has connected before the clock starts."""
    run_no = stack.next_run()
    now = datetime.now(UTC)
    batch = Batch(run_no, [make_event(run_no, i, SERIES[:1], now)
                           for i in range(max(4, 2 * shape.workers * shape.concurrency))])
    if isinstance(system, Baseline):
        system.mark()
    publish(stack, system, batch)
    wait_done(system, batch)


def measure_backlog(stack: Stack, system: System, n_events: int, series: Sequence[int]
                    ) -> tuple[Batch, dict[int, float], CpuSnapshot, CpuSnapshot]:
    run_no = stack.next_run()
    now = datetime.now(UTC)
    batch = Batch(run_no, [make_event(run_no, i, series, now) for i in range(n_events)])
    if isinstance(system, Baseline):
        system.mark()
    before = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
    publish(stack, system, batch)
    wait_done(system, batch)
    after = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
    return batch, system.completion_times(batch), before, after


@contextlib.contextmanager
def running(stack: Stack, system: System, shape: WorkerShape) -> Iterator[Memory]:
    """The system started and warmed up; yields its memory after warm-up; stops it after."""
    stack.say(f"{system.name}: starting {shape.workers} worker(s), {shape.pool} x "
              f"{shape.concurrency}")
    system.start()
    try:
        warm_up(stack, system, shape)
        yield memory_of(system.roots())
    finally:
        system.stop()


def measure_throughput(stack: Stack, system: System, *, n_events: int, series: Sequence[int],
                       rss_before: Memory) -> RunResult:
    """A backlog of ``n_events`` published at once onto the running system."""
    stack.say(f"{system.name}: {n_events} events as a backlog")
    sessions = stack.db_sessions()
    batch, times, cpu0, cpu1 = measure_backlog(stack, system, n_events, series)
    result = _backlog_result(stack, system.name, batch, times, cpu0, cpu1, rss_before)
    result.db_sessions_opened = stack.db_sessions() - sessions
    result.rss_after = memory_of(system.roots())
    return result


def measure_paced(stack: Stack, system: System, result: RunResult, *, n_events: int,
                  rate_per_s: float, series: Sequence[int]) -> None:
    """Events published at a steady rate: their latency goes into ``result``."""
    stack.say(f"{system.name}: {n_events} events paced at {rate_per_s:g}/s")
    run_no = stack.next_run()
    paced = Batch(run_no, [make_event(run_no, i, series, datetime.now(UTC))
                           for i in range(n_events)])
    if isinstance(system, Baseline):
        system.mark()
    publish(stack, system, paced, pace_per_s=rate_per_s)
    wait_done(system, paced)
    times = system.completion_times(paced)
    result.paced_events = len(paced)
    result.paced_rate_per_s = rate_per_s
    result.paced_latency = Percentiles.of([t - paced.published_at[i] for i, t in times.items()])
    result.paced_stages = system.stages(paced)
    result.rss_after = memory_of(system.roots())


def run_system(stack: Stack, system: System, shape: WorkerShape, *, n_events: int,
               series: Sequence[int]) -> RunResult:
    """Start the system, warm it up, measure one backlog, stop it."""
    with running(stack, system, shape) as rss_before:
        return measure_throughput(stack, system, n_events=n_events, series=series,
                                  rss_before=rss_before)


def _backlog_result(stack: Stack, name: str, batch: Batch, times: Mapping[int, float],
                    cpu0: CpuSnapshot, cpu1: CpuSnapshot, rss_before: Memory) -> RunResult:
    start = min(batch.published_at)
    end = max(times.values()) if times else time.time()
    duration = max(end - start, 1e-6)
    calls = _bulk_calls_between(stack, start, end + 1.0)
    per_event, busy = cpu_per_event(cpu0, cpu1, len(batch))
    return RunResult(
        system=name, events=len(batch), completed=len(times),
        duration_s=round(duration, 2), events_per_s=round(len(times) / duration, 1),
        calls=len(calls), calls_per_s=round(len(calls) / duration, 1),
        status_429=sum(1 for c in calls if c["status"] == 429),
        backlog_latency=Percentiles.of([t - batch.published_at[i] for i, t in times.items()]),
        rss_before=rss_before, rss_after=rss_before, cpu_ms_per_event=per_event,
        machine_busy_pct=busy,
    )


# -- scenarios -----------------------------------------------------------------------------


@dataclass
class BenchOptions:
    events: int = DEFAULT_EVENTS
    latency_ms: float | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    pool: Pool = DEFAULT_POOL
    workers: int = 1
    rate_limit_per_minute: int | None = None
    rate_limit_burst: int | None = None
    sandbox_limit_per_minute: int | None = None
    scenario: ScenarioName = "quick"
    short: bool = False
    as_json: bool = False
    via: Via = "bus"
    series_per_event: int = 1
    duration_s: float | None = None
    log_level: str = "INFO"
    workdir: Path = Path(DEFAULT_WORKDIR)
    keep: bool = False
    namespace: str = ""

    @property
    def series(self) -> tuple[int, ...]:
        return SERIES[:max(1, min(self.series_per_event, len(SERIES)))]

    def latency_for(self, scenario_default_ms: float) -> float:
        return self.latency_ms if self.latency_ms is not None else scenario_default_ms

    @property
    def n_events(self) -> int:
        return min(self.events, 40) if self.short else self.events

    @property
    def paced_events(self) -> int:
        return 20 if self.short else max(20, min(1000, self.events // 4))


@dataclass
class Comparison:
    latency_ms: float
    shape: dict[str, Any]
    via: str
    ours: RunResult
    baseline: RunResult
    throughput_ratio: float
    latency_ratio_p50: float | None
    latency_ratio_p99: float | None
    target: float | None = None
    met: bool | None = None


def run_comparison(stack: Stack, options: BenchOptions, *, target: float | None) -> Comparison:
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    shape = WorkerShape(options.workers, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    base_system = Baseline(stack, shape)
    ours_system = Ours(stack, shape, via=options.via,
                       rate_limit_per_minute=options.rate_limit_per_minute,
                       rate_limit_burst=options.rate_limit_burst)
    with running(stack, base_system, shape) as rss_before:
        baseline = measure_throughput(stack, base_system, n_events=options.n_events,
                                      series=options.series, rss_before=rss_before)
    with running(stack, ours_system, shape) as rss_before:
        ours = measure_throughput(stack, ours_system, n_events=options.n_events,
                                  series=options.series, rss_before=rss_before)
        # Both are paced at the same rate, which both can sustain: latency, not queueing.
        rate = max(1.0, round(PACED_LOAD * min(ours.events_per_s, baseline.events_per_s), 1))
        measure_paced(stack, ours_system, ours, n_events=options.paced_events,
                      rate_per_s=rate, series=options.series)
    with running(stack, base_system, shape):
        measure_paced(stack, base_system, baseline, n_events=options.paced_events,
                      rate_per_s=rate, series=options.series)
    ratio = round(ours.events_per_s / baseline.events_per_s, 3) if baseline.events_per_s else 0.0

    def latency_ratio(pick: Callable[[Percentiles], float]) -> float | None:
        if ours.paced_latency is None or baseline.paced_latency is None:
            return None
        base = pick(baseline.paced_latency)
        return round(pick(ours.paced_latency) / base, 2) if base else None

    return Comparison(
        latency_ms=latency_ms, shape=asdict(shape), via=options.via, ours=ours,
        baseline=baseline, throughput_ratio=ratio,
        latency_ratio_p50=latency_ratio(lambda p: p.p50_ms),
        latency_ratio_p99=latency_ratio(lambda p: p.p99_ms),
        target=target, met=(ratio >= target) if target is not None else None,
    )


@dataclass
class ScaleStep:
    concurrency: int
    latency_ms: float
    ideal_per_s: float
    target_per_s: float
    result: RunResult
    share_of_ideal: float
    met: bool


def run_scale(stack: Stack, options: BenchOptions) -> list[ScaleStep]:
    latency_ms = options.latency_for(SCALE_LATENCY_MS)
    latency_s = latency_ms / 1000.0
    steps = (1, 4) if options.short else SCALE_CONCURRENCIES
    step_s = 1.5 if options.short else SCALE_STEP_S
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    results = []
    for concurrency in steps:
        ideal = concurrency / latency_s if latency_s > 0 else math.inf
        if options.rate_limit_per_minute:
            ideal = min(ideal, options.rate_limit_per_minute / 60.0)
        n_events = max(20, int(ideal * step_s)) if math.isfinite(ideal) else options.n_events
        shape = WorkerShape(options.workers, concurrency, options.pool)
        system = Ours(stack, shape, via=options.via,
                      rate_limit_per_minute=options.rate_limit_per_minute,
                      rate_limit_burst=options.rate_limit_burst)
        result = run_system(stack, system, shape, n_events=n_events, series=options.series)
        share = result.events_per_s / ideal if ideal else 0.0
        results.append(ScaleStep(concurrency, latency_ms, round(ideal, 1),
                                 round(SCALE_TARGET * ideal, 1), result, round(share, 3),
                                 share >= SCALE_TARGET))
    return results


@dataclass
class QuotaResult:
    limit_per_minute: int
    burst: int | None
    sandbox_limit_per_minute: int
    workers: int
    concurrency: int
    latency_ms: float
    window_s: float
    calls_ok: int
    calls_429: int
    calls_per_minute: float
    share_of_limit: float
    peak_60s_window: int
    first_429_after_s: float | None
    events_completed: int
    met: bool
    rss_mb: float
    cpu_ms_per_call: dict[str, float]
    machine_busy_pct: float


def _peak_window(times: Sequence[float], window_s: float) -> int:
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_quota(stack: Stack, options: BenchOptions) -> QuotaResult:
    limit = options.rate_limit_per_minute or QUOTA_LIMIT_PER_MINUTE
    sandbox_limit = options.sandbox_limit_per_minute or limit
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    duration = options.duration_s or (8.0 if options.short else QUOTA_DURATION_S)
    workers = QUOTA_WORKERS
    shape = WorkerShape(workers, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms, limit_per_minute=sandbox_limit)
    system = Ours(stack, shape, via=options.via, rate_limit_per_minute=limit,
                  rate_limit_burst=options.rate_limit_burst)
    stack.say(f"quota: {workers} workers under {limit}/min for {duration:g} s")
    system.start()
    try:
        # Warm up under the limit too: it drains the initial burst, as a running fleet would.
        warm_up(stack, system, WorkerShape(workers, min(options.concurrency, 2), options.pool))
        run_no = stack.next_run()
        n_events = int(limit / 60.0 * (duration + 15)) + 20
        now = datetime.now(UTC)
        batch = Batch(run_no, [make_event(run_no, i, options.series, now)
                               for i in range(n_events)])
        cpu0 = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
        publish(stack, system, batch)
        first = min(batch.published_at)
        time.sleep(max(0.0, first + duration + 1.0 - time.time()))
        cpu1 = cpu_snapshot(system.roots(), stack.sandbox_pid, stack.database)
        rss = memory_of(system.roots())
        completed = system.done(batch)
    finally:
        system.stop()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    calls = [c for c in stack.admin.calls(first) if c["path"] == "bulk"]
    start = min((float(c["t"]) for c in calls), default=first)
    ok = [float(c["t"]) for c in calls
          if c["status"] == 200 and start <= float(c["t"]) < start + duration]
    refused = sum(1 for c in calls if c["status"] == 429)
    per_minute = len(ok) / duration * 60.0
    per_call, busy = cpu_per_event(cpu0, cpu1, max(len(ok), 1))
    share = per_minute / sandbox_limit
    return QuotaResult(
        limit_per_minute=limit, burst=options.rate_limit_burst,
        sandbox_limit_per_minute=sandbox_limit, workers=workers,
        concurrency=options.concurrency, latency_ms=latency_ms, window_s=duration,
        calls_ok=len(ok), calls_429=refused,
        calls_per_minute=round(per_minute, 1), share_of_limit=round(share, 4),
        peak_60s_window=_peak_window([float(c["t"]) for c in calls if c["status"] == 200],
                                     QUOTA_WINDOW_S),
        first_429_after_s=next((round(float(c["t"]) - start, 1) for c in calls
                                if c["status"] == 429), None),
        events_completed=completed, met=share >= QUOTA_TARGET and refused == 0,
        rss_mb=round(rss.rss_mb, 1), cpu_ms_per_call=per_call, machine_busy_pct=busy,
    )


@dataclass
class MemoryCase:
    label: str
    waiting: int
    rss_ready_mb: float
    rss_steady_mb: float
    rss_max_mb: float
    pss_steady_mb: float
    main_rss_steady_mb: float
    processes: int
    processed_while_sampling: int
    forwarded_while_sampling: int


@dataclass
class MemoryResult:
    concurrency: int
    pool: str
    latency_ms: float
    sample_s: float
    cases: list[MemoryCase]
    backlog_ratio: float
    retries_ratio: float


def _sample_memory(system: Ours, seconds: float) -> tuple[Memory, Memory, float]:
    """(at ready, steady = median of the last half, max RSS in MB) over ``seconds``."""
    ready = memory_of(system.roots())
    samples: list[Memory] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        samples.append(memory_of(system.roots()))
        if any(not p.alive() for p in system.processes()):
            raise BenchError("a worker died while its memory was sampled:\n"
                             + system.processes()[0].log_tail())
    tail = sorted(samples[len(samples) // 2:], key=lambda m: m.rss_kb) or [ready]
    steady = tail[len(tail) // 2]
    return ready, steady, max(m.rss_mb for m in [ready, *samples])


def _issued_count(stack: Stack) -> int:
    with stack.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM entities WHERE state = 'issued'")).scalar() or 0)


def _insert_waiting_retries(stack: Stack, count: int) -> None:
    """``count`` events with one entity each in retry_wait, due in a day (plain SQL)."""
    due = datetime.now(UTC) + timedelta(days=1)
    with stack.engine.begin() as conn:
        conn.execute(text(
            """
            INSERT INTO events (event_id, event_type, customer_key, customer, series_ids,
                                metadata, payload, fingerprint, issue_ref, source, state)
            SELECT 'retry-' || g, 'BenchIssue', 'id:8' || g, jsonb_build_object('id', '8' || g),
                   ARRAY[544770], '{}'::jsonb, '{}'::jsonb, md5(g::text), 'ref-' || g, 'bench',
                   'processing'
              FROM generate_series(1, :n) AS g
            """), {"n": count})
        conn.execute(text(
            """
            INSERT INTO entities (event_id, series_id, customer_key, state, attempts,
                                  last_verdict, last_error_code, next_attempt_at,
                                  first_attempt_at)
            SELECT 'retry-' || g, 544770, 'id:8' || g, 'retry_wait', 1, 'retryable', '503',
                   :due, now()
              FROM generate_series(1, :n) AS g
            """), {"n": count, "due": due})
    with stack.engine.connect() as conn:
        conn.execute(text("ANALYZE entities"))
        conn.commit()


def run_memory(stack: Stack, options: BenchOptions) -> MemoryResult:
    backlogs = (200, 2000) if options.short else MEMORY_BACKLOGS
    retries = 2000 if options.short else MEMORY_RETRIES
    sample_s = options.duration_s or (4.0 if options.short else MEMORY_SAMPLE_S)
    latency_ms = options.latency_for(DEFAULT_LATENCY_MS)
    shape = WorkerShape(1, options.concurrency, options.pool)
    stack.configure_sandbox(latency_ms=latency_ms,
                            limit_per_minute=options.sandbox_limit_per_minute)
    cases: list[MemoryCase] = []
    for waiting in backlogs:
        stack.truncate_ledger()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
        system = Ours(stack, shape, via="bus")
        run_no = stack.next_run()
        now = datetime.now(UTC)
        stack.say(f"memory: publishing a backlog of {waiting} events")
        publish_fast(stack, system.target_queue(),
                     (json.dumps(make_event(run_no, i, options.series, now)).encode()
                      for i in range(waiting)))
        _wait_queue_depth(stack, "coupons.events", waiting)
        cases.append(_memory_case(stack, system, f"{waiting:,} events waiting", waiting,
                                  sample_s))
    stack.truncate_ledger()
    stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    stack.say(f"memory: {retries} retries waiting in the ledger")
    _insert_waiting_retries(stack, retries)
    cases.append(_memory_case(stack, Ours(stack, shape, via="bus"),
                              f"{retries:,} retries waiting", retries, sample_s))
    stack.truncate_ledger()
    small, large, with_retries = cases
    return MemoryResult(
        concurrency=options.concurrency, pool=options.pool, latency_ms=latency_ms,
        sample_s=sample_s, cases=cases,
        backlog_ratio=round(large.rss_steady_mb / small.rss_steady_mb, 3),
        retries_ratio=round(with_retries.rss_steady_mb / small.rss_ready_mb, 3),
    )


def _wait_queue_depth(stack: Stack, queue: str, depth: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        state = stack.queue_state(queue)
        if state is not None and state.messages >= depth:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{queue} holds {state.messages if state else 0} of {depth} "
                             "messages after 120 s")
        time.sleep(0.2)


def _memory_case(stack: Stack, system: Ours, label: str, waiting: int, sample_s: float
                 ) -> MemoryCase:
    issued_before = _issued_count(stack)
    on_bus = stack.queue_state("coupons.events")
    system.start()
    try:
        ready, steady, peak = _sample_memory(system, sample_s)
        main_rss = sum(_status_kb(pid, "status", "VmRSS:") for pid in system.roots()) / 1024
        processed = _issued_count(stack) - issued_before
        still_on_bus = stack.queue_state("coupons.events")
    finally:
        system.stop()
        stack.purge("coupons.events", "coupons.tasks", "coupons.retry")
    forwarded = (on_bus.messages if on_bus else 0) - (still_on_bus.messages if still_on_bus else 0)
    return MemoryCase(label, waiting, round(ready.rss_mb, 1), round(steady.rss_mb, 1),
                      round(peak, 1), round(steady.pss_mb, 1), round(main_rss, 1),
                      steady.processes, processed, forwarded)


# -- the sandbox's own ceiling -------------------------------------------------------------


@dataclass
class Ceiling:
    clients: int
    duration_s: float
    calls: int
    calls_per_s: float
    statuses: dict[str, int]
    sandbox_cpu_pct: float


def run_ceiling(stack: Stack, options: BenchOptions) -> Ceiling:
    """Bulk-issue calls/s the sandbox serves at zero latency to many concurrent clients."""
    duration = 1.0 if options.short else CEILING_DURATION_S
    stack.configure_sandbox(latency_ms=0, limit_per_minute=None)
    stack.say(f"sandbox ceiling: {CEILING_CLIENTS} clients for {duration:g} s")
    cpu0 = cpu_snapshot([], stack.sandbox_pid)
    t0 = time.monotonic()
    statuses = asyncio.run(_hammer(stack.sandbox_url, CEILING_CLIENTS, duration))
    elapsed = time.monotonic() - t0
    cpu1 = cpu_snapshot([], stack.sandbox_pid)
    calls = sum(statuses.values())
    sandbox_cpu = cpu1.seconds("sandbox") - cpu0.seconds("sandbox")
    stack.admin.reset()
    return Ceiling(CEILING_CLIENTS, round(elapsed, 2), calls, round(calls / elapsed, 1),
                   {str(k): v for k, v in sorted(statuses.items())},
                   round(100.0 * sandbox_cpu / elapsed, 1))


async def _hammer(base_url: str, clients: int, duration_s: float) -> dict[int, int]:
    import aiohttp
    from pydantic import SecretStr

    from worker.capillary.auth import basic_auth_header
    from worker.capillary.client import BULK_ISSUE_PATH

    url = base_url + BULK_ISSUE_PATH
    headers = {"Authorization": basic_auth_header(SANDBOX_USER, SecretStr(SANDBOX_PASSWORD))}
    counter = itertools.count()
    statuses: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while loop.time() < deadline:
                body = {"seriesIds": [SERIES[0]],
                        "customer": {"id": _customer_id(9999, next(counter) % 10_000_000)},
                        "metadata": {"notes": "ceiling"}}
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


# -- database round trips per event --------------------------------------------------------


@dataclass
class RoundTrips:
    label: str
    events: int
    round_trips: float
    statements: float
    transactions: float
    pings: float


@dataclass
class _TraceCount:
    round_trips: int = 0
    statements: int = 0
    transactions: int = 0
    pings: int = 0

    def __sub__(self, other: _TraceCount) -> _TraceCount:
        return _TraceCount(self.round_trips - other.round_trips,
                           self.statements - other.statements,
                           self.transactions - other.transactions, self.pings - other.pings)


def count_trace(lines: Sequence[str]) -> _TraceCount:
    """Round trips, statements, transactions and pings in one connection's libpq trace."""
    counted = _TraceCount()
    last_query = ""
    worked = False
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        direction, message = parts[0], parts[2]
        detail = parts[3].strip() if len(parts) > 3 else ""
        if direction == "F" and message == "Query":
            last_query = detail.strip('"').strip().upper()
            if last_query == ";":
                continue
            if last_query not in ("BEGIN", "COMMIT", "ROLLBACK"):
                counted.statements += 1
                worked = True
        elif direction == "F" and message == "Execute":
            counted.statements += 1
            worked = True
            last_query = ""
        elif direction == "B" and message == "ReadyForQuery":
            counted.round_trips += 1
            if last_query == ";":
                counted.pings += 1
            elif detail == "I" and (worked or last_query in ("COMMIT", "ROLLBACK")):
                counted.transactions += 1
                worked = False
            last_query = ""
    return counted


def run_round_trips(stack: Stack, options: BenchOptions) -> list[RoundTrips]:
    """Wire-level database round trips per issued event, one event at a time, in-process."""
    import logging

    stack.configure_sandbox(latency_ms=0, limit_per_minute=None)
    n_events = 5 if options.short else ROUND_TRIP_EVENTS
    # The pipeline runs in this process here: its per-event lines would bury the tables.
    pipeline_log = logging.getLogger("worker.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.WARNING)
    try:
        return [_round_trips(stack, options, n_events, None),
                _round_trips(stack, options, n_events, 1_000_000)]
    finally:
        pipeline_log.setLevel(level)


def _round_trips(stack: Stack, options: BenchOptions, n_events: int,
                 rate_limit_per_minute: int | None) -> RoundTrips:
    from worker.bootstrap import build_deps
    from worker.broker.fake import FakePublisher
    from worker.events import parse_event_data
    from worker.ledger.unit_of_work import make_engine
    from worker.services import issue_event

    assert stack.settings is not None
    settings = stack.settings.model_copy(update={"rate_limit_per_minute": rate_limit_per_minute})
    trace_dir = Path(tempfile.mkdtemp(prefix="trace-", dir=stack.workdir))
    engine = make_engine(settings.database_url, application_name="coupon-worker-bench")
    traces: list[tuple[Path, Any]] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection: Any, _record: Any) -> None:
        from psycopg import pq

        path = trace_dir / f"conn-{len(traces)}.trace"
        handle = path.open("w")
        traces.append((path, handle))
        dbapi_connection.pgconn.trace(handle.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    def snapshot() -> _TraceCount:
        total = _TraceCount()
        for path, _handle in traces:
            counted = count_trace(path.read_text(errors="replace").splitlines())
            total = _TraceCount(total.round_trips + counted.round_trips,
                                total.statements + counted.statements,
                                total.transactions + counted.transactions,
                                total.pings + counted.pings)
        return total

    deps = build_deps(settings, FakePublisher(), engine=engine)
    run_no = stack.next_run()
    try:
        def issue(i: int) -> None:
            report = issue_event(
                parse_event_data(make_event(run_no, i, options.series, datetime.now(UTC))),
                source="bus", deps=deps)
            if report.issued != len(options.series):
                raise BenchError(f"round-trip run: event {i} did not issue: {report}")

        for i in range(3):  # first use: connections, the limiter's bucket row, the circuit
            issue(i)
        time.sleep(0.05)
        before = snapshot()
        for i in range(3, 3 + n_events):
            issue(i)
        time.sleep(0.05)
        counted = snapshot() - before
    finally:
        engine.dispose()
        for _path, handle in traces:
            handle.close()
        shutil.rmtree(trace_dir, ignore_errors=True)
    label = "no rate limit" if rate_limit_per_minute is None else "with the global rate limit"
    return RoundTrips(label, n_events, round(counted.round_trips / n_events, 2),
                      round(counted.statements / n_events, 2),
                      round(counted.transactions / n_events, 2),
                      round(counted.pings / n_events, 2))


# -- the whole run -------------------------------------------------------------------------


@dataclass
class BenchReport:
    machine: Machine
    options: dict[str, Any]
    sandbox_ceiling: Ceiling | None = None
    round_trips: list[RoundTrips] = field(default_factory=list)
    comparison: Comparison | None = None
    scale: list[ScaleStep] = field(default_factory=list)
    quota: QuotaResult | None = None
    memory: MemoryResult | None = None


def _versions(stack: Stack) -> tuple[str, str]:
    postgres = rabbit = "?"
    with contextlib.suppress(Exception), stack.engine.connect() as conn:
        postgres = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
    with contextlib.suppress(Exception), stack.connection() as conn:
        conn.connect()
        props = conn.connection.server_properties
        rabbit = str(props.get("version", "?"))
    return postgres, rabbit


def run_bench(options: BenchOptions, say: Callable[[str], None]) -> BenchReport:
    machine = describe_machine()
    scenarios = ("quick", "scale", "quota", "memory") if options.scenario == "all" \
        else (options.scenario,)
    report_options = {k: (str(v) if isinstance(v, Path) else v)
                      for k, v in asdict(options).items()
                      if k not in ("as_json", "keep", "namespace", "workdir")}
    stack = Stack(options.workdir, log_level=options.log_level, keep=options.keep,
                  namespace=options.namespace, say=say)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        stack.open()
        postgres, rabbit = _versions(stack)
        machine = Machine(**{**asdict(machine), "postgres": postgres, "rabbitmq": rabbit})
        report = BenchReport(machine, report_options)
        report.sandbox_ceiling = run_ceiling(stack, options)
        if any(s in ("quick", "overhead") for s in scenarios):
            report.round_trips = run_round_trips(stack, options)
            target = OVERHEAD_TARGET if options.scenario in ("overhead", "all") else None
            report.comparison = run_comparison(stack, options, target=target)
        if "scale" in scenarios:
            report.scale = run_scale(stack, options)
        if "quota" in scenarios:
            report.quota = run_quota(stack, options)
        if "memory" in scenarios:
            report.memory = run_memory(stack, options)
        return report
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- rendering -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _ratio(ours: float | None, base: float | None) -> str:
    if ours is None or base is None or not base or math.isnan(ours) or math.isnan(base):
        return "-"
    return f"{ours / base:.2f}x"


def _verdict(met: bool | None) -> str:
    if met is None:
        return ""
    return "[green]met[/]" if met else "[red]missed[/]"


def render_machine(console: Console, report: BenchReport) -> None:
    m = report.machine
    table = Table(title="Machine", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("CPU", f"{m.cpus} x {m.cpu_model}")
    table.add_row("memory", f"{m.memory_gb:g} GB")
    table.add_row("software", f"Python {m.python}, Celery {m.celery}, PostgreSQL {m.postgres}, "
                              f"RabbitMQ {m.rabbitmq}, {m.system}")
    table.add_row("date", m.date)
    table.add_row("load before the run", f"{m.background_busy_pct:g} % CPU busy, load average "
                                         f"{' '.join(f'{v:g}' for v in m.load_average)}")
    o = report.options
    table.add_row("options", f"scenario {o['scenario']}, {o['events']} events, "
                             f"pool {o['pool']}, concurrency {o['concurrency']}, "
                             f"workers {o['workers']}, via {o['via']}, "
                             f"log level {o['log_level']}" + (", short" if o["short"] else ""))
    console.print(table)


def render_comparison(console: Console, c: Comparison) -> None:
    o, b = c.ours, c.baseline
    table = Table(title=f"Throughput and latency: coupon-worker vs baseline "
                        f"({c.shape['pool']} x {c.shape['concurrency']}, "
                        f"{c.shape['workers']} worker(s), API latency {c.latency_ms:g} ms, "
                        f"ours via {c.via})", title_justify="left")
    table.add_column("figure")
    table.add_column("coupon-worker", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio ours / baseline", justify="right")
    table.add_row("events", f"{o.events:,}", f"{b.events:,}", "")
    table.add_row("events/s (backlog)", _fmt(o.events_per_s), _fmt(b.events_per_s),
                  _ratio(o.events_per_s, b.events_per_s))
    table.add_row("API calls/s", _fmt(o.calls_per_s), _fmt(b.calls_per_s),
                  _ratio(o.calls_per_s, b.calls_per_s))
    if o.paced_latency and b.paced_latency:
        rate = f"{o.paced_rate_per_s:g}/s"
        for name in ("p50", "p95", "p99"):
            ours_v = getattr(o.paced_latency, f"{name}_ms")
            base_v = getattr(b.paced_latency, f"{name}_ms")
            table.add_row(f"latency {name}, paced at {rate} (ms)", _fmt(ours_v),
                          _fmt(base_v), _ratio(ours_v, base_v))
    table.add_row("latency p50 / p99 in the backlog (ms)",
                  f"{_fmt(o.backlog_latency.p50_ms, 0)} / {_fmt(o.backlog_latency.p99_ms, 0)}",
                  f"{_fmt(b.backlog_latency.p50_ms, 0)} / {_fmt(b.backlog_latency.p99_ms, 0)}",
                  "")
    table.add_row("429s", str(o.status_429), str(b.status_429), "")
    table.add_row("worker RSS before -> after (MB)",
                  f"{o.rss_before.rss_mb:,.0f} -> {o.rss_after.rss_mb:,.0f}",
                  f"{b.rss_before.rss_mb:,.0f} -> {b.rss_after.rss_mb:,.0f}",
                  _ratio(o.rss_after.rss_mb, b.rss_after.rss_mb))
    table.add_row("worker PSS after (MB)", f"{o.rss_after.pss_mb:,.0f}",
                  f"{b.rss_after.pss_mb:,.0f}", _ratio(o.rss_after.pss_mb, b.rss_after.pss_mb))
    for name in o.cpu_ms_per_event:
        table.add_row(f"CPU ms/event: {name}", _fmt(o.cpu_ms_per_event[name], 2),
                      _fmt(b.cpu_ms_per_event.get(name), 2),
                      _ratio(o.cpu_ms_per_event[name], b.cpu_ms_per_event.get(name)))
    table.add_row("machine CPU busy (%)", _fmt(o.machine_busy_pct), _fmt(b.machine_busy_pct), "")
    table.add_row("DB connections opened during the backlog",
                  str(o.db_sessions_opened if o.db_sessions_opened is not None else "-"),
                  str(b.db_sessions_opened if b.db_sessions_opened is not None else "-"), "")
    console.print(table)
    if o.paced_stages:
        stages = Table(title=f"Where an event's time goes in coupon-worker (paced at "
                             f"{o.paced_rate_per_s:g}/s, from the ledger's timestamps)",
                       title_justify="left")
        for column in ("stage", "p50 (ms)", "p95 (ms)"):
            stages.add_column(column, justify="right" if column != "stage" else "left")
        for name, value in o.paced_stages.items():
            stages.add_row(name, _fmt(value.p50_ms), _fmt(value.p95_ms))
        console.print(stages)
    if c.target is not None:
        console.print(f"overhead target: throughput ratio "
                      f"{_ratio(o.events_per_s, b.events_per_s)}, target >= {c.target:.2f}x: "
                      f"{_verdict(c.met)}")


def render_scale(console: Console, steps: Sequence[ScaleStep], latency_ms: float) -> None:
    table = Table(title=f"Scale: throughput by concurrency (pool slots) at {latency_ms:g} ms "
                        f"API latency (ideal = slots / latency)", title_justify="left")
    for column in ("slots", "ideal events/s", f"target {SCALE_TARGET:.0%}", "measured events/s",
                   "share of ideal", "verdict", "ms per event beyond the API",
                   "worker CPU ms/event", "machine busy %", "RSS MB"):
        table.add_column(column, justify="right")
    for s in steps:
        r = s.result
        # Each slot spends concurrency / throughput per event; the API took latency of it.
        beyond = (s.concurrency / r.events_per_s * 1000 - latency_ms) if r.events_per_s else None
        table.add_row(str(s.concurrency), _fmt(s.ideal_per_s), _fmt(s.target_per_s),
                      _fmt(r.events_per_s), f"{s.share_of_ideal:.0%}", _verdict(s.met),
                      _fmt(beyond), _fmt(r.cpu_ms_per_event["workers"], 2),
                      _fmt(r.machine_busy_pct), _fmt(r.rss_after.rss_mb, 0))
    console.print(table)


def render_quota(console: Console, q: QuotaResult) -> None:
    burst = f"burst {q.burst}" if q.burst else "the default burst"
    table = Table(title=f"Quota: {q.workers} worker processes sharing "
                        f"{q.limit_per_minute:,} calls/minute ({burst}); the sandbox refuses "
                        f"beyond {q.sandbox_limit_per_minute:,} in any 60 s",
                  title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("measured window", f"{q.window_s:g} s")
    table.add_row("calls answered 200", f"{q.calls_ok:,}")
    table.add_row("sustained calls/minute", _fmt(q.calls_per_minute))
    table.add_row("share of the API's limit", f"{q.share_of_limit:.1%}")
    table.add_row("429s", str(q.calls_429) + (
        f" (the first {q.first_429_after_s:g} s after the first call)"
        if q.first_429_after_s is not None else ""))
    table.add_row("peak calls in any 60 s", f"{q.peak_60s_window:,}")
    table.add_row("target", f">= {QUOTA_TARGET:.0%} with zero 429s: {_verdict(q.met)}")
    table.add_row("events completed", f"{q.events_completed:,}")
    table.add_row("RSS of the 3 workers (MB)", _fmt(q.rss_mb, 0))
    table.add_row("CPU ms per call (workers / postgres)",
                  f"{_fmt(q.cpu_ms_per_call['workers'], 2)} / "
                  f"{_fmt(q.cpu_ms_per_call['postgres'], 2)}")
    table.add_row("machine CPU busy (%)", _fmt(q.machine_busy_pct))
    console.print(table)


def render_memory(console: Console, m: MemoryResult) -> None:
    table = Table(title=f"Memory: one worker ({m.pool} x {m.concurrency}), sampled "
                        f"{m.sample_s:g} s while working at {m.latency_ms:g} ms latency",
                  title_justify="left")
    for column in ("case", "RSS at ready (MB)", "steady RSS (MB)", "max RSS (MB)",
                   "steady PSS (MB)", "main process RSS (MB)", "processes",
                   "issued while sampled",
                   "bus messages bridged"):
        table.add_column(column, justify="right")
    for case in m.cases:
        table.add_row(case.label, _fmt(case.rss_ready_mb), _fmt(case.rss_steady_mb),
                      _fmt(case.rss_max_mb), _fmt(case.pss_steady_mb),
                      _fmt(case.main_rss_steady_mb), str(case.processes),
                      f"{case.processed_while_sampling:,}", f"{case.forwarded_while_sampling:,}")
    console.print(table)
    small, large, retries = m.cases
    console.print(f"ratio of steady RSS, {large.label} / {small.label}: "
                  f"{m.backlog_ratio:.2f}x; {retries.label} / an idle worker (RSS at ready "
                  f"with {small.label}): {m.retries_ratio:.2f}x")


def render_ceiling(console: Console, c: Ceiling) -> None:
    table = Table(title="The sandbox's own ceiling (zero latency, no limit)",
                  title_justify="left")
    for column in ("concurrent clients", "calls", "calls/s", "statuses", "sandbox CPU %"):
        table.add_column(column, justify="right")
    table.add_row(str(c.clients), f"{c.calls:,}", _fmt(c.calls_per_s),
                  ", ".join(f"{k}: {v}" for k, v in c.statuses.items()),
                  _fmt(c.sandbox_cpu_pct))
    console.print(table)


def render_round_trips(console: Console, rows: Sequence[RoundTrips]) -> None:
    table = Table(title="Database work per issued event (wire-level, libpq trace)",
                  title_justify="left")
    for column in ("configuration", "events", "round trips", "statements", "transactions",
                   "pre-pings"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.label, str(r.events), _fmt(r.round_trips, 2), _fmt(r.statements, 2),
                      _fmt(r.transactions, 2), _fmt(r.pings, 2))
    console.print(table)


def render(console: Console, report: BenchReport) -> None:
    render_machine(console, report)
    if report.sandbox_ceiling is not None:
        render_ceiling(console, report.sandbox_ceiling)
    if report.round_trips:
        render_round_trips(console, report.round_trips)
    if report.comparison is not None:
        render_comparison(console, report.comparison)
    if report.scale:
        render_scale(console, report.scale, report.scale[0].latency_ms)
    if report.quota is not None:
        render_quota(console, report.quota)
    if report.memory is not None:
        render_memory(console, report.memory)


def report_json(report: BenchReport) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(asdict(report)), indent=2, default=str)


# -- the command ---------------------------------------------------------------------------


def bench_command() -> click.Command:
    """The ``bench`` command, for ``main.add_command(bench_command())``."""

    @click.command("bench")
    @click.option("--scenario", type=click.Choice(get_args(ScenarioName)), default="quick",
                  show_default=True, help="What to measure (see the module's docstring).")
    @click.option("--events", type=click.IntRange(min=10), default=DEFAULT_EVENTS,
                  show_default=True, help="Events in each measured backlog.")
    @click.option("--latency-ms", type=click.FloatRange(min=0), default=None,
                  help=f"Sandbox latency per call [default: {DEFAULT_LATENCY_MS:g}; "
                       f"{SCALE_LATENCY_MS:g} for scale].")
    @click.option("--concurrency", type=click.IntRange(min=1), default=DEFAULT_CONCURRENCY,
                  show_default=True, help="Pool slots per worker process.")
    @click.option("--pool", type=click.Choice(get_args(Pool)), default=DEFAULT_POOL,
                  show_default=True, help="Celery pool of ours and the baseline alike (prefork "
                  "only: the pool that enforces the hard time limit).")
    @click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Worker processes (quota always uses 3).")
    @click.option("--rate-limit-per-minute", type=click.IntRange(min=1), default=None,
                  help="COUPONS_RATE_LIMIT_PER_MINUTE for our workers [quota: 1200].")
    @click.option("--rate-limit-burst", type=click.IntRange(min=1), default=None,
                  help="COUPONS_RATE_LIMIT_BURST for our workers [the worker's default].")
    @click.option("--sandbox-limit-per-minute", type=click.IntRange(min=1), default=None,
                  help="The sandbox's own 429 limit [quota: the rate limit].")
    @click.option("--via", type=click.Choice(get_args(Via)), default="bus", show_default=True,
                  help="How our events arrive: the plain-JSON bus, or coupons.issue tasks.")
    @click.option("--series-per-event", type=click.IntRange(1, len(SERIES)), default=1,
                  show_default=True, help="Coupon series per event (one bulk call each way).")
    @click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=None,
                  help=f"quota: measured seconds [{QUOTA_DURATION_S:g}]; memory: sampled "
                       f"seconds [{MEMORY_SAMPLE_S:g}].")
    @click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
                  default="INFO", show_default=True, help="Log level of every worker.")
    @click.option("--short", is_flag=True,
                  help="CI smoke mode: tiny batches, a few seconds; figures mean little.")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(DEFAULT_WORKDIR), show_default=True,
                  help="Where process logs go.")
    @click.option("--keep", is_flag=True, help="Keep the bench database and vhost afterwards.")
    @click.option("--namespace", default="", help="Suffix for the bench database and vhost "
                  "names, so that runs (e.g. tests) can go side by side.")
    def bench(scenario: ScenarioName, events: int, latency_ms: float | None, concurrency: int,
              pool: Pool, workers: int, rate_limit_per_minute: int | None,
              rate_limit_burst: int | None,
              sandbox_limit_per_minute: int | None, via: Via, series_per_event: int,
              duration_s: float | None, log_level: str, short: bool, as_json: bool,
              workdir: Path, keep: bool, namespace: str) -> None:
        """Measure the real pipeline against a bare Celery baseline: throughput, latency,
        memory, the shared rate limit, and the database work per event."""
        options = BenchOptions(
            events=events, latency_ms=latency_ms, concurrency=concurrency, pool=pool,
            workers=workers, rate_limit_per_minute=rate_limit_per_minute,
            rate_limit_burst=rate_limit_burst,
            sandbox_limit_per_minute=sandbox_limit_per_minute, scenario=scenario, short=short,
            as_json=as_json, via=via, series_per_event=series_per_event,
            duration_s=duration_s, log_level=log_level, workdir=workdir, keep=keep,
            namespace=namespace,
        )
        console = Console(width=None if sys.stdout.isatty() else CONSOLE_WIDTH)
        progress = Console(stderr=True)

        def say(message: str) -> None:
            progress.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/] {message}",
                           highlight=False)

        try:
            report = run_bench(options, say)
        except BenchError as exc:
            progress.print(f"[bold red]bench failed:[/] {exc}", highlight=False)
            sys.exit(1)
        except KeyboardInterrupt:
            progress.print("[bold red]bench interrupted[/]; everything it started is stopped")
            sys.exit(130)
        if as_json:
            click.echo(report_json(report))
        else:
            render(console, report)

    return bench

