"""``coupon-worker chaos``: exactly once while everything around the workers fails.

A run, in order:

1. a database and a RabbitMQ vhost of its own (dropped and recreated), the sandbox on a free
   port striking at low rates (a 5xx with a JSON body after issuing, a slow original that lands
   after the client gave up, a reset after issuing, an unreadable read-back), and N workers
   started with the default command ``coupon-worker worker``, restarted when they die, as a
   supervisor would;
2. events published at a steady pace while a script SIGKILLs one worker mid-call, restarts
   RabbitMQ, restarts PostgreSQL, takes the API down and drops every broker connection; a
   timeline says what happened when;
3. once the ledger is at rest, the sandbox's ground truth: every (event, series) issued exactly
   once, compared with our ledger, and every worker alive and consuming.

It restarts the machine's own RabbitMQ (``rabbitmqctl``) and PostgreSQL (``pg_ctlcluster``),
so it needs both on this host and disturbs whatever else uses them for a few seconds. Process
handling, backends and the sandbox start are the demo's (:mod:`coupon_devtools.demo`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
from rich.console import Console
from rich.markup import escape

from coupon_devtools.demo.backends import Backends, local_broker, local_database
from coupon_devtools.demo.defaults import STOP_GRACE_S, DemoError
from coupon_devtools.demo.services import Service, demo_env, migrate, spawn, start_sandbox
from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.processes import free_port, signal_group, stop_groups
from coupon_devtools.harness.rabbitmqctl import delete_vhost
from worker.domain import ISSUE_REF_HEX_CHARS, ISSUE_REF_PREFIX, TERMINAL_STATES, issue_ref

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from coupon_devtools.sandbox import SandboxAdmin
    from worker.config import Settings

CHAOS_DATABASE: Final = "coupon_worker_chaos"
CHAOS_VHOST: Final = "coupon-worker-chaos"
SERIES: Final = (544770, 553379)
FIRST_CUSTOMER_ID: Final = 577_000_001
LATE_CUSTOMER_ID: Final = 577_000_000

READ_TIMEOUT_S: Final = 2.0
SETTLE_WINDOW_S: Final = 5.0
SLOW_ORIGINAL_S: Final = 4.0
"""Longer than the read timeout (the client gives up), and it lands well within the window
counted from when the worker recorded the unknown outcome: exactly once is promised."""
LATE_ORIGINAL_S: Final = 10.0
"""Lands after read timeout + settle window, once the worker re-sent, and before the re-send's
verification reads back again: a duplicate the worker must detect, not prevent."""
STALL_S: Final = 1.5
"""The victim's answer is held this long after issuing (under the read timeout): the window in
which its worker is killed."""
CHAOS_ENVIRONMENT: Final[Mapping[str, str]] = {
    "COUPONS_HTTP_TIMEOUT_SECONDS": f"{READ_TIMEOUT_S:g}",
    "COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "COUPONS_SETTLE_WINDOW_SECONDS": f"{SETTLE_WINDOW_S:g}",
    # Room for a read-back and an issue in one task under load (the soft time limit is the
    # lease less 10 s), yet short enough that a killed worker's claim comes back in seconds.
    "COUPONS_LEASE_SECONDS": "20",
    "COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS": "5",
    "COUPONS_SWEEP_INTERVAL_SECONDS": "0.5",
    "COUPONS_REQUEUE_AFTER_SECONDS": "15",
    "COUPONS_CIRCUIT_OPEN_SECONDS": "2",
    "COUPONS_RETRY_BASE_SECONDS": "0.5",
    "COUPONS_RETRY_MAX_SECONDS": "4",
    "COUPONS_RECONCILE_DELAY_SECONDS": "0.5",
    "COUPONS_WORKER_CONCURRENCY": "2",
    # N workers on one host cannot share a metrics port; Flower is not started.
    "COUPONS_METRICS_PORT": "0",
    "COUPONS_TASK_EVENTS": "false",
    # INFO: the worker announces " ready." at INFO, and its logs are what a failure is read in.
    "COUPONS_LOG_LEVEL": "INFO",
}
WORKER_COMMAND: Final = ("worker",)
READY_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.5
PROGRESS_EVERY_S: Final = 10.0


class ChaosError(DemoError):
    """The run cannot go on (a service is missing, a process would not start)."""


@dataclass(frozen=True)
class Profile:
    """What a run publishes, and when each disruption strikes (seconds after publishing
    starts)."""

    events: int
    publish_s: float
    kill_at_s: float
    rabbit_at_s: float
    rabbit_down_s: float
    postgres_at_s: float
    api_at_s: float
    api_down_s: float
    drop_at_s: float
    late_original: bool
    settle_timeout_s: float


FULL: Final = Profile(events=3000, publish_s=100, kill_at_s=8, rabbit_at_s=20, rabbit_down_s=5,
                      postgres_at_s=40, api_at_s=55, api_down_s=20, drop_at_s=85,
                      late_original=True, settle_timeout_s=300)
SHORT: Final = Profile(events=300, publish_s=30, kill_at_s=3, rabbit_at_s=7, rabbit_down_s=2,
                       postgres_at_s=14, api_at_s=18, api_down_s=6, drop_at_s=27,
                       late_original=False, settle_timeout_s=120)


class Timeline:
    """``t+  12.3s  what happened``, printed as it happens, from any thread."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, text: str, style: str = "") -> None:
        line = f"t+{self.now():6.1f}s  {escape(text)}"
        with self._lock:
            self.console.print(f"[{style}]{line}[/]" if style else line)


# -- the events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    via: str  # "bus" or "task"
    event: dict[str, Any]


def make_event(customer_id: int) -> dict[str, Any]:
    return {
        "eventId": f"chaos-tier-upgrade-{customer_id}", "eventType": "TierUpgraded",
        "occurredAt": "2026-11-25T10:00:00Z", "customer": {"id": str(customer_id)},
        "seriesIds": list(SERIES),
        "metadata": {"sourceType": "Journeys", "sourceId": "chaos", "sourceActivity": "Tier "
                     "upgrade", "notes": "Gold tier welcome", "reason": "Tier upgrade to Gold"},
    }


def plan_deliveries(events: Sequence[dict[str, Any]]) -> list[Delivery]:
    """Each event once, one in five as a Celery task; one in twenty again, the other way in,
    a few messages later (a producer that retried)."""
    deliveries: list[Delivery] = []
    again: dict[int, list[Delivery]] = {}
    for i, event in enumerate(events):
        via = "task" if i % 5 == 2 else "bus"
        deliveries.append(Delivery(via, event))
        if i % 20 == 7:
            again.setdefault(i + 3, []).append(Delivery("bus" if via == "task" else "task",
                                                        event))
        deliveries.extend(again.pop(i, []))
    deliveries.extend(d for later in again.values() for d in later)
    return deliveries


class Publisher(threading.Thread):
    """Publishes the deliveries at a steady pace through the project's producer; when the
    broker fails, reconnects and publishes the unconfirmed message again."""

    def __init__(self, settings: Settings, deliveries: Sequence[Delivery], spread_s: float,
                 timeline: Timeline) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.settings = settings
        self.deliveries = deliveries
        self.spread_s = spread_s
        self.timeline = timeline
        self.republished = 0
        self.published = 0
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._publish_all()
        except Exception as exc:  # noqa: BLE001 - the main loop reports it and stops the run
            self.error = exc
        self.finished_at = self.timeline.now()

    def _publish_all(self) -> None:
        from worker.broker.publisher import EventProducer
        from worker.errors import WorkerError

        started = time.monotonic()
        pace = self.spread_s / max(len(self.deliveries), 1)
        failing_since: float | None = None
        while self.published < len(self.deliveries) and not self.stop.is_set():
            try:
                with EventProducer.open(self.settings) as producer:
                    while self.published < len(self.deliveries) and not self.stop.is_set():
                        due = started + self.published * pace
                        self.stop.wait(max(due - time.monotonic(), 0.0))
                        delivery = self.deliveries[self.published]
                        producer.publish_event(delivery.event, via=delivery.via)  # type: ignore[arg-type]
                        self.published += 1
                        if failing_since is not None:
                            self.timeline.note(f"publisher: broker back, publishing again "
                                               f"after {time.monotonic() - failing_since:.1f} s")
                            failing_since = None
            except WorkerError as exc:
                # The message may or may not have been stored: publish it again (the worker
                # takes a second delivery of an event in without a second call).
                self.republished += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.timeline.note(f"publisher: {_first_line(str(exc))}; retrying")
                self.stop.wait(0.5)
        self.timeline.note(f"publisher: all {len(self.deliveries)} messages published "
                           f"({self.republished} published again after a broker error)")


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _first_line(text: str, chars: int = 140) -> str:
    line = (text.strip().splitlines() or ["?"])[0]
    return line if len(line) <= chars else line[: chars - 1] + "\u2026"


# -- the fleet -----------------------------------------------------------------------------


@dataclass
class Slot:
    number: int
    service: Service
    incarnation: int = 0
    ready: bool = False


class Fleet:
    """N workers started with the default command, each restarted when it dies."""

    def __init__(self, size: int, env: Mapping[str, str], logs: Path,
                 services: list[Service], timeline: Timeline) -> None:
        self.size = size
        self.env = env
        self.logs = logs
        self.services = services
        self.timeline = timeline
        self.slots: list[Slot] = []
        self.killed: list[str] = []  # restarts after our own SIGKILL
        self.exited: list[str] = []  # restarts after a worker died on its own
        self._expected_deaths: set[int] = set()
        self._lock = threading.Lock()

    def _spawn(self, number: int, incarnation: int) -> Service:
        name = f"worker{number}" + (f".{incarnation}" if incarnation else "")
        return spawn(name, WORKER_COMMAND, self.env, self.logs, self.services)

    def start(self) -> None:
        with self._lock:
            self.slots = [Slot(n, self._spawn(n, 0)) for n in range(1, self.size + 1)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(slot.ready for slot in self.slots):
            self.supervise(quiet=True)
            for slot in self.slots:
                if slot.incarnation:
                    raise ChaosError(f"worker {slot.number} exited while starting; see "
                                     f"{_shown(slot.service.log_path)}:\n"
                                     f"{slot.service.log_tail()}")
            if time.monotonic() > deadline:
                raise ChaosError(f"workers not ready after {READY_TIMEOUT_S:g} s; see "
                                 f"{_shown(self.logs)}")
            time.sleep(0.2)

    def supervise(self, *, quiet: bool = False) -> None:
        """Restart dead workers with the same command; note when restarted ones are ready."""
        with self._lock:
            for slot in self.slots:
                process = slot.service.process
                if process.poll() is None:
                    if not slot.ready and _log_head_has(slot.service.log_path, " ready."):
                        slot.ready = True
                        if slot.incarnation and not quiet:
                            self.timeline.note(f"worker {slot.number} (pid {process.pid}) "
                                               "ready again")
                    continue
                code = process.returncode
                ours = process.pid in self._expected_deaths
                what = (f"worker {slot.number} (pid {process.pid}) died from our SIGKILL" if ours
                        else f"worker {slot.number} (pid {process.pid}) exited on its own with "
                             f"code {code}; its log: {_shown(slot.service.log_path)}")
                (self.killed if ours else self.exited).append(what)
                slot.incarnation += 1
                slot.service = self._spawn(slot.number, slot.incarnation)
                slot.ready = False
                self.timeline.note(f"{what}; restarted with `coupon-worker worker` "
                                   f"(pid {slot.service.process.pid})",
                                   "" if ours else "bold yellow")

    def slot_of(self, pid: int) -> Slot | None:
        """The worker a pool process belongs to (its process group is the worker's)."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        with self._lock:
            return next((s for s in self.slots if s.service.process.pid == group), None)

    def kill(self, slot: Slot) -> int:
        """SIGKILL a worker's whole process group: main process and pool at once."""
        with self._lock:
            pid = slot.service.process.pid
            self._expected_deaths.add(pid)
            signal_group(pid, signal.SIGKILL)
            return pid

    def pids(self) -> set[int]:
        """The main pids of the workers running now."""
        with self._lock:
            return {slot.service.process.pid for slot in self.slots
                    if slot.service.process.poll() is None}


def _log_head_has(path: Path, needle: str, limit: int = 200_000) -> bool:
    try:
        with path.open("rb") as log:
            return needle.encode() in log.read(limit)
    except OSError:
        return False


# -- the sandbox's faults ------------------------------------------------------------------


class FaultBook:
    """The sandbox's fault rules, counted by label across every replacement.

    The sandbox applies the first matching rule, so an outage rule must come first: putting
    one in (or taking it out) clears the rules and registers them again, with the uses left.
    """

    FIELDS: Final = ("kind", "times", "series", "customer", "path", "delaySeconds", "status",
                     "retryAfterSeconds", "probability")

    def __init__(self, admin: SandboxAdmin) -> None:
        self.admin = admin
        self.labels: dict[int, str] = {}
        self.struck: Counter[str] = Counter()
        self._lead: int | None = None
        self._lock = threading.Lock()

    def add(self, label: str, **rule: Any) -> None:
        with self._lock:
            self.labels[self.admin.add_fault(**rule)] = label

    def lead_with(self, label: str | None, **rule: Any) -> None:
        """Make ``rule`` the first rule (or, with no label, remove the leading one)."""
        with self._lock:
            current = self.admin.faults()
            self.admin.clear_faults()
            for old in current:
                self.struck[self.labels.get(old["id"], old["kind"])] += int(old["applied"])
            kept = [(self.labels.get(old["id"], old["kind"]), old) for old in current
                    if old["times"] != 0 and old["id"] != self._lead]
            self.labels, self._lead = {}, None
            if label is not None:
                self._lead = self.admin.add_fault(**rule)
                self.labels[self._lead] = label
            for old_label, old in kept:
                self.labels[self.admin.add_fault(**{k: old[k] for k in self.FIELDS})] = old_label

    def totals(self) -> Counter[str]:
        with self._lock:
            totals = Counter(self.struck)
            for rule in self.admin.faults():
                totals[self.labels.get(rule["id"], rule["kind"])] += int(rule["applied"])
            return totals


BACKGROUND_FAULTS: Final[Sequence[tuple[str, dict[str, Any]]]] = (
    ("5xx with a JSON body after issuing",
     {"kind": "error_json_after", "status": 500, "probability": 0.01}),
    (f"slow original ({SLOW_ORIGINAL_S:g} s, lands after the client gave up)",
     {"kind": "slow_original", "delaySeconds": SLOW_ORIGINAL_S, "probability": 0.005}),
    ("reset after issuing", {"kind": "reset_after", "probability": 0.01}),
    ("unreadable read-back (HTML)",
     {"kind": "readback_unreadable", "path": "readback", "probability": 0.05}),
)


# -- the disruptions -----------------------------------------------------------------------


@dataclass
class Context:
    """What the disruptions act on."""

    profile: Profile
    fleet: Fleet
    faults: FaultBook
    engine: Engine
    vhost: str
    victim: dict[str, Any]
    timeline: Timeline
    rabbit_stopped: bool = False
    last_fault_end: float = 0.0


def kill_mid_call(ctx: Context) -> None:
    """SIGKILL the worker whose pool process waits for the victim's answer, which the sandbox
    has issued and holds back for a moment; failing that (the victim came and went), a worker
    with any call in flight."""
    customer = ctx.victim["customer"]["id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        owner = _in_flight_owner(ctx.engine, ctx.victim["eventId"])
        if owner is not None and _issued_to(ctx.faults.admin, customer):
            slot = ctx.fleet.slot_of(owner)
            if slot is not None:
                pid = ctx.fleet.kill(slot)
                ctx.timeline.note(
                    f"SIGKILL worker {slot.number} (pid {pid}, pool and all) mid-call: its pool "
                    f"process {owner} waits for the answer to event {ctx.victim['eventId']}, "
                    "which the sandbox has already issued")
                return
        time.sleep(0.05)
    while time.monotonic() < deadline + 10:
        owner = _in_flight_owner(ctx.engine, None)
        slot = ctx.fleet.slot_of(owner) if owner is not None else None
        if slot is not None:
            pid = ctx.fleet.kill(slot)
            ctx.timeline.note(f"SIGKILL worker {slot.number} (pid {pid}, pool and all) with a "
                              "call in flight (the chosen victim was never caught mid-call)")
            return
        time.sleep(0.05)
    raise ChaosError("no worker was ever seen with a call in flight")


def _in_flight_owner(engine: Engine, event_id: str | None) -> int | None:
    """The pid of a pool process holding a claim (of ``event_id``, or any), if the ledger
    answers."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from worker.ledger import models as m

    query = select(m.Entity.claimed_by).where(m.Entity.state == "in_flight",
                                              m.Entity.claimed_by.is_not(None))
    if event_id is not None:
        query = query.where(m.Entity.event_id == event_id)
    try:
        with engine.connect() as conn:
            owner = conn.execute(query.limit(1)).scalar()
    except SQLAlchemyError:
        return None
    return int(str(owner).rsplit(":", 1)[1]) if owner else None


def _issued_to(admin: SandboxAdmin, customer: str) -> bool:
    from coupon_devtools.sandbox import SandboxAdminError

    try:
        return bool(admin.ledger(customer=customer))
    except SandboxAdminError:
        return False


def restart_rabbitmq(ctx: Context) -> None:
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl

    ctx.rabbit_stopped = True
    rabbitmqctl("stop_app")
    stopped = time.monotonic()
    ctx.timeline.note("RabbitMQ stopped (rabbitmqctl stop_app): every connection gone, "
                      "messages kept on disk")
    time.sleep(ctx.profile.rabbit_down_s)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    ctx.rabbit_stopped = False
    ctx.timeline.note(f"RabbitMQ started again (start_app, await_startup) after "
                      f"{time.monotonic() - stopped:.1f} s down")


def _pg_cluster() -> tuple[str, str]:
    """The local cluster to restart: the Debian layout's first version, cluster ``main``."""
    root = Path("/etc/postgresql")
    versions = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not versions:
        raise ChaosError("no local PostgreSQL cluster under /etc/postgresql to restart")
    return versions[0], "main"


def pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"],  # noqa: S607
                          check=False, timeout=10).returncode == 0


def restart_postgres(ctx: Context) -> None:
    version, cluster = _pg_cluster()
    started = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version,  # noqa: S603,S607
                    cluster, "restart"], check=True, capture_output=True, timeout=120)
    while not pg_ready():
        if time.monotonic() - started > 120:
            raise ChaosError("PostgreSQL did not answer within 120 s of its restart")
        time.sleep(0.2)
    ctx.timeline.note(f"PostgreSQL {version}/{cluster} restarted (fast shutdown: every "
                      f"connection dropped), answering again after "
                      f"{time.monotonic() - started:.1f} s")


def api_down(ctx: Context) -> None:
    half = ctx.profile.api_down_s / 2
    ctx.faults.lead_with("API down: 503 before doing anything", kind="error_before",
                         status=503, path="any", times=-1)
    ctx.timeline.note(f"API down for {ctx.profile.api_down_s:g} s: first every call answers 503 "
                      "before doing anything (error_before, every path)")
    time.sleep(half)
    ctx.faults.lead_with("API down: connection reset before doing anything",
                         kind="reset_before", path="any", times=-1)
    ctx.timeline.note("API still down: now every connection is reset before anything is done "
                      "(reset_before, every path)")
    time.sleep(ctx.profile.api_down_s - half)
    ctx.faults.lead_with(None)
    ctx.timeline.note("API back (outage rules removed; the low-rate faults stay)")


def drop_connections(ctx: Context) -> None:
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl

    listed = rabbitmqctl("list_connections", "vhost", "--no-table-headers")
    ours = sum(1 for line in listed.splitlines() if line.strip() == ctx.vhost)
    rabbitmqctl("close_all_connections", "--vhost", ctx.vhost, "--limit", "100000",
                "coupon-worker chaos")
    ctx.timeline.note(f"closed every broker connection of vhost {ctx.vhost} ({ours}: the "
                      "workers' and the publisher's)")


class Script(threading.Thread):
    """Runs the disruptions at their times, one after the other."""

    def __init__(self, ctx: Context,
                 steps: Sequence[tuple[float, str, Callable[[Context], None]]]) -> None:
        super().__init__(name="chaos-script", daemon=True)
        self.ctx = ctx
        self.steps = steps
        self.failures: list[str] = []
        self.finished = False
        self.stop = threading.Event()

    def run(self) -> None:
        for at_s, name, action in self.steps:
            if self.stop.wait(max(at_s - self.ctx.timeline.now(), 0.0)):
                break
            try:
                action(self.ctx)
            except Exception as exc:  # noqa: BLE001 - reported; the run goes on to the check
                self.failures.append(f"{name}: {exc}")
                self.ctx.timeline.note(f"{name} failed: {_first_line(str(exc))}", "bold red")
            self.ctx.last_fault_end = self.ctx.timeline.now()
        self.finished = True


def restore_services(ctx: Context | None) -> None:
    """Whatever happened, leave RabbitMQ and PostgreSQL running and answering."""
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
    from worker.errors import BrokerUnavailable

    if ctx is not None and ctx.rabbit_stopped:
        with contextlib.suppress(BrokerUnavailable):
            rabbitmqctl("start_app")
    with contextlib.suppress(BrokerUnavailable):
        rabbitmqctl("await_startup")
    deadline = time.monotonic() + 60
    while not pg_ready() and time.monotonic() < deadline:
        time.sleep(0.2)


# -- watching and the ground truth ---------------------------------------------------------


@dataclass(frozen=True)
class LedgerState:
    events: int
    entities: Mapping[str, int]
    verifying: int

    @property
    def busy(self) -> int:
        return sum(n for state, n in self.entities.items() if state not in TERMINAL_STATES)

    def at_rest(self, events: int) -> bool:
        return self.events >= events and self.busy == 0 and self.verifying == 0


def ledger_state(engine: Engine) -> LedgerState | None:
    """Where the ledger stands, or None while PostgreSQL does not answer."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from worker.ledger import models as m

    try:
        with engine.connect() as conn:
            events = conn.execute(select(func.count()).select_from(m.Event)).scalar_one()
            states = dict(conn.execute(select(m.Entity.state, func.count())
                                       .group_by(m.Entity.state)).tuples().all())
            verifying = conn.execute(select(func.count()).select_from(m.Entity).where(
                m.Entity.state == "issued", m.Entity.verify_after.is_not(None))).scalar_one()
    except SQLAlchemyError:
        return None
    return LedgerState(int(events), {str(k): int(v) for k, v in states.items()}, int(verifying))


@dataclass(frozen=True)
class Recorded:
    """One entity as our ledger has it."""

    state: str
    codes: tuple[str, ...] = ()
    reason: str | None = None


@dataclass
class Comparison:
    """The sandbox's ground truth against the expected entities and our ledger."""

    expected: int = 0
    issued: int = 0  # entities with at least one coupon
    missing: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    detected: int = 0  # issued twice, and the ledger says duplicate_issued
    strays: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    dead: Counter[str] = field(default_factory=Counter)

    @property
    def exactly_once(self) -> bool:
        return not (self.missing or self.twice or self.strays)


_REF = re.compile(rf"\[{re.escape(ISSUE_REF_PREFIX)}([0-9a-f]{{{ISSUE_REF_HEX_CHARS}}})")


def compare(expected: Mapping[str, tuple[str, Sequence[int]]],
            issued: Iterable[Mapping[str, Any]],
            ledger: Mapping[tuple[str, int], Recorded]) -> Comparison:
    """Check that the sandbox issued every (event, series) of ``expected`` (event id ->
    customer id, series) exactly once, to the right customer, and that our ledger says the same.

    A sandbox coupon is attributed to an event by the reference in its notes (see
    :func:`worker.domain.issue_ref`); coupons of events not in ``expected`` are ignored.
    """
    by_ref = {issue_ref(event_id): event_id for event_id in expected}
    found: dict[tuple[str, int], list[str]] = {}
    result = Comparison()
    for coupon in issued:
        notes = str((coupon.get("metadata") or {}).get("notes") or "")
        match = _REF.search(notes)
        event_id = by_ref.get(f"{ISSUE_REF_PREFIX}{match.group(1)}") if match else None
        if event_id is None:
            continue
        customer, allowed = expected[event_id]
        key = (event_id, int(coupon["seriesId"]))
        if str(coupon["customerId"]) != customer or key[1] not in allowed:
            result.strays.append(f"coupon {coupon['code']} carries event {event_id}'s reference "
                                 f"but went to customer {coupon['customerId']}, series {key[1]}")
            continue
        found.setdefault(key, []).append(str(coupon["code"]))
    for event_id, (_customer, series_ids) in sorted(expected.items()):
        for series in series_ids:
            key = (event_id, series)
            codes = found.get(key, [])
            ours = ledger.get(key, Recorded("absent"))
            result.expected += 1
            if ours.state == "dead":
                result.dead[ours.reason or "?"] += 1
            _judge(result, f"event {event_id} series {series}", codes, ours)
    return result


def _judge(result: Comparison, what: str, codes: Sequence[str], ours: Recorded) -> None:
    if codes:
        result.issued += 1
    if not codes:
        result.missing.append(f"{what}: never issued; the ledger says {ours.state}"
                              + (f" ({ours.reason})" if ours.reason else ""))
        if ours.codes:
            result.disagreements.append(f"{what}: the ledger records {', '.join(ours.codes)}, "
                                        "which the sandbox never issued")
    elif len(codes) > 1:
        detected = ours.state == "duplicate_issued" and set(codes) <= set(ours.codes)
        result.detected += detected
        result.twice.append(f"{what}: issued {len(codes)} times ({', '.join(codes)}); the "
                            f"ledger says {ours.state}" + (" (detected)" if detected else ""))
        if not detected:
            result.disagreements.append(f"{what}: the sandbox issued {', '.join(codes)}; the "
                                        f"ledger says {ours.state} with "
                                        f"{', '.join(ours.codes) or 'no coupon'}")
    elif ours.state != "issued" or ours.codes != tuple(codes):
        result.disagreements.append(f"{what}: the sandbox issued {codes[0]}; the ledger says "
                                    f"{ours.state} with {', '.join(ours.codes) or 'no coupon'}")


def read_ledger(engine: Engine) -> dict[tuple[str, int], Recorded]:
    from sqlalchemy import select

    from worker.ledger import models as m

    codes: dict[tuple[str, int], list[str]] = {}
    with engine.connect() as conn:
        for event_id, series, code in conn.execute(select(
                m.IssuedCoupon.event_id, m.IssuedCoupon.series_id, m.IssuedCoupon.code)
                .order_by(m.IssuedCoupon.id)):
            codes.setdefault((str(event_id), int(series)), []).append(str(code))
        rows = conn.execute(select(m.Entity.event_id, m.Entity.series_id, m.Entity.state,
                                   m.Entity.last_error_code)).all()
    return {(str(e), int(s)): Recorded(str(state), tuple(codes.get((str(e), int(s)), ())),
                                       str(code) if state == "dead" else None)
            for e, s, state, code in rows}


def consumers(vhost: str, queues: Sequence[str]) -> dict[str, int]:
    """How many consumers each of ``queues`` has in ``vhost`` (a live worker has one each)."""
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl

    listed = rabbitmqctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers")
    counts = {}
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in queues:
            counts[parts[0]] = int(parts[1])
    return {queue: counts.get(queue, 0) for queue in queues}


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosOptions:
    profile: Profile
    workers: int
    seed: int
    workdir: Path
    keep: bool
    namespace: str = ""


def choose_local_backends(namespace: str) -> Backends:
    """The local PostgreSQL and RabbitMQ, with a database and a vhost of this run's own: the
    ones the run restarts, so nothing else will do."""
    from sqlalchemy.engine import make_url

    suffix = f"_{namespace}" if namespace else ""
    database, problem = local_database(CHAOS_DATABASE + suffix)
    if database is None:
        raise ChaosError(f"chaos needs the local PostgreSQL: {problem}")
    broker, problem = local_broker(CHAOS_VHOST + suffix.replace("_", "-"), "chaos")
    if broker is None:
        raise ChaosError(f"chaos needs the local RabbitMQ: {problem}")
    if broker.queues:
        raise ChaosError(f"chaos needs rabbitmqctl (to restart RabbitMQ): {broker.label}")
    if make_url(database.url).host not in (None, "127.0.0.1", "localhost", "::1"):
        raise ChaosError("chaos restarts the local PostgreSQL, but COUPONS_DATABASE_URL points "
                         "at another host")
    return Backends(database, broker)


class ChaosRun:
    """One run: set up, disrupt, check, and always clean up (see :meth:`close`)."""

    def __init__(self, options: ChaosOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.profile = options.profile
        self.workdir = options.workdir.resolve()
        self.logs = self.workdir / "logs"
        self.heartbeats = self.workdir / "heartbeats"
        self.timeline = Timeline(console)
        self.services: list[Service] = []
        self.backends: Backends | None = None
        self.ctx: Context | None = None
        self.publisher: Publisher | None = None
        self.script: Script | None = None
        self.engine: Engine | None = None
        self.admin: SandboxAdmin | None = None

    # -- setting up

    def setup(self) -> tuple[dict[str, str], SandboxAdmin]:
        from sqlalchemy import create_engine

        from coupon_devtools.sandbox import SandboxAdmin

        self.logs.mkdir(parents=True, exist_ok=True)
        for old in [*self.logs.glob("*.log"), *self.heartbeats.glob("*.json")]:
            old.unlink()
        self.backends = backends = choose_local_backends(self.options.namespace)
        self.console.print(f"  PostgreSQL  {escape(backends.database.label)}")
        self.console.print(f"  broker      {escape(backends.broker.label)}")
        sandbox_url = f"http://127.0.0.1:{free_port()}"
        env = demo_env(backends, sandbox_url, 0)
        env.update(CHAOS_ENVIRONMENT)
        # `coupon-worker health` judges these workers only, not others of this host.
        env["COUPONS_HEARTBEAT_DIR"] = str(self.heartbeats)
        migrate(env, self.logs)
        sandbox = start_sandbox(env, self.logs, self.services, "--port",
                                sandbox_url.rsplit(":", 1)[1], "--seed", str(self.options.seed))
        self.console.print(f"  sandbox     {sandbox_url} (pid {sandbox.process.pid}, seed "
                           f"{self.options.seed})")
        self.engine = create_engine(backends.database.url, pool_size=2, pool_pre_ping=True,
                                    connect_args={"connect_timeout": 3})
        self.admin = SandboxAdmin(sandbox_url)
        return env, self.admin

    def plan(self, admin: SandboxAdmin) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                 dict[str, Any] | None, FaultBook]:
        """The events, and the sandbox's rules: the victim's and the late original's first
        (they name one customer each), then the low-rate ones."""
        profile = self.profile
        events = [make_event(FIRST_CUSTOMER_ID + i) for i in range(profile.events)]
        # Published just before the kill, so that its answer is held back by then.
        victim = events[min(int(profile.events * max(profile.kill_at_s - 0.5, 0)
                                / profile.publish_s), profile.events - 1)]
        late = make_event(LATE_CUSTOMER_ID) if profile.late_original else None
        faults = FaultBook(admin)
        faults.add("victim's answer held back after issuing", kind="stall_after",
                   customer=victim["customer"]["id"], delaySeconds=STALL_S)
        if late is not None:
            faults.add(f"late original ({LATE_ORIGINAL_S:g} s, beyond the window)",
                       kind="slow_original", customer=late["customer"]["id"],
                       delaySeconds=LATE_ORIGINAL_S)
        for label, rule in BACKGROUND_FAULTS:
            faults.add(label, times=-1, **rule)
        return events, victim, late, faults

    # -- running

    def run(self) -> int:
        from worker.config import Settings

        env, admin = self.setup()
        assert self.engine is not None and self.backends is not None
        profile, options = self.profile, self.options
        events, victim, late, faults = self.plan(admin)
        deliveries = plan_deliveries(events)
        if late is not None:
            deliveries.insert(min(len(deliveries) - 1, 20), Delivery("bus", late))
        twice = len(deliveries) - len(events) - (late is not None)
        self.console.print(f"  events      {len(events)} tier-upgrade events x {len(SERIES)} "
                           f"series over {profile.publish_s:g} s ({twice} sent twice, 1 in 5 as "
                           "Celery tasks)" + ("; plus 1 whose original lands beyond the settle "
                                              "window" if late else ""))
        self.console.print("  faults      " + "; ".join(
            f"{label} at {rule['probability']:.1%}" for label, rule in BACKGROUND_FAULTS))
        self.console.print(f"  workers     {options.workers} x `coupon-worker worker` "
                           f"(read timeout {READ_TIMEOUT_S:g} s, settle window "
                           f"{SETTLE_WINDOW_S:g} s, lease "
                           f"{CHAOS_ENVIRONMENT['COUPONS_LEASE_SECONDS']} s), logs in "
                           f"{_shown(self.logs)}")
        fleet = Fleet(options.workers, env, self.logs, self.services, self.timeline)
        fleet.start()
        settings = Settings.model_validate(env)
        self.ctx = ctx = Context(profile, fleet, faults, self.engine,
                                 self.backends.broker.url.rsplit("/", 1)[1], victim,
                                 self.timeline)
        self.timeline.start = time.monotonic()
        self.timeline.note(f"{options.workers} workers ready (pids "
                           f"{', '.join(str(s.service.process.pid) for s in fleet.slots)}); "
                           "publishing starts")
        self.publisher = Publisher(settings, deliveries, profile.publish_s, self.timeline)
        self.script = Script(ctx, [
            (profile.kill_at_s, "SIGKILL mid-call", kill_mid_call),
            (profile.rabbit_at_s, "RabbitMQ restart", restart_rabbitmq),
            (profile.postgres_at_s, "PostgreSQL restart", restart_postgres),
            (profile.api_at_s, "API outage", api_down),
            (profile.drop_at_s, "dropping broker connections", drop_connections),
        ])
        self.publisher.start()
        self.script.start()
        settled_s = self.watch(fleet, len(events) + (late is not None))
        return self.check(fleet, settings, events, late, admin, settled_s)

    def watch(self, fleet: Fleet, n_events: int) -> float | None:
        """Supervise the workers and show progress until the ledger is at rest after the last
        disruption; returns the seconds from the last disruption to rest (None: it never
        was)."""
        assert self.engine is not None and self.publisher and self.script and self.ctx
        last_progress = 0.0
        quiet_since: float | None = None
        while True:
            fleet.supervise()
            now = self.timeline.now()
            if self.publisher.error is not None:
                raise ChaosError(f"the publisher failed: {self.publisher.error!r}")
            if quiet_since is None and self.script.finished \
                    and self.publisher.finished_at is not None:
                quiet_since = max(self.publisher.finished_at, self.ctx.last_fault_end)
            if quiet_since is None and now - last_progress < PROGRESS_EVERY_S:
                time.sleep(POLL_S)
                continue
            state = ledger_state(self.engine)
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                self._progress(state)
            if quiet_since is not None and state is not None and state.at_rest(n_events):
                # Any slow original still on its way lands within its delay: wait it out,
                # then make sure nothing moved meanwhile.
                time.sleep(SLOW_ORIGINAL_S + 1)
                again = ledger_state(self.engine)
                if again is not None and again.at_rest(n_events):
                    settled = now - quiet_since
                    self.timeline.note(f"ledger at rest since t+{now:.1f}s (still so "
                                       f"{SLOW_ORIGINAL_S + 1:g} s later), {settled:.1f} s after "
                                       "the last disruption and the last publish", "bold")
                    return settled
            if quiet_since is not None and now - quiet_since > self.profile.settle_timeout_s:
                self.timeline.note(f"not at rest {self.profile.settle_timeout_s:g} s after the "
                                   "last disruption and publish; checking what there is",
                                   "bold red")
                return None
            time.sleep(POLL_S)

    def _progress(self, state: LedgerState | None) -> None:
        assert self.publisher is not None
        if state is None:
            self.timeline.note("progress: the ledger does not answer", "dim")
            return
        issued = state.entities.get("issued", 0)
        self.timeline.note(
            f"progress: {self.publisher.published} messages published, {state.events} events "
            f"in the ledger, entities issued {issued}, busy {state.busy}, dead "
            f"{state.entities.get('dead', 0)}", "dim")

    # -- checking

    def check(self, fleet: Fleet, settings: Settings, events: Sequence[dict[str, Any]],
              late: dict[str, Any] | None, admin: SandboxAdmin, settled_s: float | None) -> int:
        assert self.engine is not None and self.ctx is not None and self.publisher is not None
        queues = (settings.events_queue, settings.tasks_queue, settings.retry_queue)
        alive, healthy, consuming = self._alive(fleet, queues)
        issued = admin.ledger()
        ledger = read_ledger(self.engine)
        main = compare({e["eventId"]: (e["customer"]["id"], SERIES) for e in events}, issued,
                       ledger)
        late_result = compare({late["eventId"]: (late["customer"]["id"], SERIES)}, issued,
                              ledger) if late else None
        calls = {str(k): int(v) for k, v in admin.stats().get("calls", {}).items()}
        report = Report(
            events=len(events), messages=len(plan_deliveries(events)) + (late is not None),
            republished=self.publisher.republished, result=main, late=late_result,
            struck=self.ctx.faults.totals(), calls=calls, killed=fleet.killed,
            exited=fleet.exited, alive=alive, healthy=healthy, workers=fleet.size,
            consuming=consuming,
            settled_s=settled_s, elapsed_s=self.timeline.now(),
            script_failures=self.script.failures if self.script else [],
        )
        report.print(self.console)
        return 0 if report.passed else 1

    def _alive(self, fleet: Fleet, queues: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        """Workers running; of those, how many beat as ``coupon-worker health`` judges (their
        consumer's event loop runs); and consumers per queue as RabbitMQ counts them. A worker
        gets a few seconds to reconnect after the last disruption."""
        from worker.errors import BrokerUnavailable
        from worker.health import check_health

        deadline = time.monotonic() + 30
        while True:
            pids = fleet.pids()
            alive = len(pids)
            report = check_health(self.heartbeats)
            healthy = sum(1 for w in report.workers if w.healthy and w.pid in pids)
            try:
                counts = consumers(self.ctx.vhost if self.ctx else "", queues)
            except BrokerUnavailable:
                counts = dict.fromkeys(queues, 0)
            if (min(alive, healthy, *counts.values()) >= fleet.size
                    or time.monotonic() > deadline):
                return alive, healthy, counts
            time.sleep(1)

    # -- cleaning up

    def close(self) -> None:
        """Stop what the run started, leave RabbitMQ and PostgreSQL up, drop the database and
        the vhost (unless --keep)."""
        for thread in (self.publisher, self.script):
            if thread is not None:
                thread.stop.set()
        if self.script is not None and self.script.is_alive():
            self.script.join(timeout=120)  # a restart half-done must finish first
        stop_groups([s.pid for s in self.services], [s.process for s in self.services],
                    grace_s=STOP_GRACE_S)
        restore_services(self.ctx)
        if self.engine is not None:
            self.engine.dispose()
        if self.admin is not None:
            self.admin.close()
        if self.backends is None or self.options.keep:
            return
        from sqlalchemy.engine import make_url

        from worker.errors import BrokerUnavailable

        url = make_url(self.backends.database.url)
        with contextlib.suppress(Exception):
            drop_database(url, str(url.database))
        with contextlib.suppress(BrokerUnavailable):
            delete_vhost(self.backends.broker.url.rsplit("/", 1)[1])


@dataclass(frozen=True)
class Report:
    """The run's figures and verdict."""

    events: int
    messages: int
    republished: int
    result: Comparison
    late: Comparison | None
    struck: Mapping[str, int]
    calls: Mapping[str, int]
    killed: Sequence[str]
    exited: Sequence[str]
    alive: int
    healthy: int
    workers: int
    consuming: Mapping[str, int]
    settled_s: float | None
    elapsed_s: float
    script_failures: Sequence[str]

    @property
    def all_alive(self) -> bool:
        return min(self.alive, self.healthy, *self.consuming.values()) >= self.workers

    @property
    def late_ok(self) -> bool:
        """The late original is allowed to issue twice, as long as the ledger flagged it."""
        late = self.late
        return late is None or (not late.missing and not late.strays
                                and late.detected == len(late.twice))

    @property
    def passed(self) -> bool:
        result = self.result
        return (result.exactly_once and not result.disagreements and self.all_alive
                and self.settled_s is not None and self.late_ok and not self.script_failures)

    def print(self, console: Console) -> None:
        from rich.table import Table

        r = self.result
        table = Table(title="chaos", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_column()
        table.add_row("events", str(self.events),
                      f"{self.messages} messages ({self.republished} published again after "
                      "a broker error)")
        table.add_row("entities", str(r.expected), "one per event and series")
        table.add_row("issued", str(r.issued), "entities the sandbox issued a coupon for")
        table.add_row("missing", _red_unless_zero(len(r.missing)), "never issued")
        table.add_row("issued twice", _red_unless_zero(len(r.twice) + len(r.strays)),
                      "two coupons for one entity, or one to the wrong customer")
        table.add_row("duplicates detected", str(r.detected), "flagged duplicate_issued")
        table.add_row("dead", str(sum(r.dead.values())),
                      escape(", ".join(f"{n} x {reason}" for reason, n in r.dead.items()))
                      or "-")
        table.add_row("ledger vs sandbox", _red_unless_zero(len(r.disagreements)),
                      "disagreements" if r.disagreements else "agree, coupon by coupon")
        table.add_row("faults struck", str(sum(self.struck.values())),
                      escape("\n".join(f"{n} x {label}" for label, n in
                                       sorted(self.struck.items(), key=lambda kv: -kv[1]))))
        table.add_row("Capillary calls", str(sum(self.calls.values())),
                      ", ".join(f"{n} {path}" for path, n in self.calls.items() if n))
        table.add_row("workers restarted", str(len(self.killed) + len(self.exited)),
                      f"{len(self.killed)} after our SIGKILL, {len(self.exited)} exited on "
                      "their own" if not self.exited else escape("\n".join(self.exited)))
        table.add_row("workers alive", f"{self.alive}/{self.workers}",
                      f"{self.healthy} healthy (fresh heartbeat); RabbitMQ consumers: "
                      + ", ".join(f"{q} {n}" for q, n in self.consuming.items()))
        table.add_row("time to settle",
                      "never" if self.settled_s is None else f"{self.settled_s:.1f} s",
                      "from the last disruption and publish to a ledger at rest")
        table.add_row("elapsed", f"{self.elapsed_s:.1f} s", "since publishing started")
        console.print(table)
        if self.late is not None:
            late = self.late
            verdict = ("[green]detected[/]" if self.late_ok and late.twice else
                       "[yellow]it landed within the window after all[/]" if self.late_ok
                       else "[bold red]NOT detected[/]")
            console.print(f"late original beyond the settle window ({LATE_ORIGINAL_S:g} s > "
                          f"{READ_TIMEOUT_S:g} s timeout + {SETTLE_WINDOW_S:g} s window, not "
                          f"counted above): {verdict}")
            for line in [*late.twice, *late.missing, *late.strays]:
                console.print(f"  {escape(line)}")
        problems = [*r.missing, *r.twice, *r.strays, *r.disagreements, *self.script_failures]
        if self.passed:
            console.print(f"[bold green]chaos: PASSED[/] - 0 missing, 0 issued twice, "
                          f"{self.alive}/{self.workers} workers alive, at rest "
                          f"{self.settled_s:.1f} s after the last disruption and publish")
            return
        console.print(f"[bold red]chaos: FAILED[/] - {len(r.missing)} missing, "
                      f"{len(r.twice) + len(r.strays)} issued twice, {self.alive}/"
                      f"{self.workers} workers alive"
                      + ("" if self.all_alive else " (or not consuming)")
                      + ("" if self.settled_s is not None else ", never at rest")
                      + (f", {len(r.disagreements)} ledger disagreements"
                         if r.disagreements else ""))
        for problem in problems[:20]:
            console.print(f"  {escape(problem)}")
        if len(problems) > 20:
            console.print(f"  ... and {len(problems) - 20} more")


def _red_unless_zero(n: int) -> str:
    return str(n) if n == 0 else f"[bold red]{n}[/]"


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_chaos(options: ChaosOptions, console: Console) -> int:
    """Run chaos; the exit code is 0 only if exactly once held and every worker is alive."""
    from coupon_devtools.sandbox import SandboxAdminError
    from worker.errors import WorkerError

    console.print(f"[bold]coupon-worker chaos[/]: {options.profile.events} events through "
                  f"{options.workers} workers while their world falls apart")
    run = ChaosRun(options, console)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run.run()
    except (DemoError, WorkerError, SandboxAdminError, subprocess.SubprocessError) as exc:
        console.print(f"[bold red]chaos failed:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("\ninterrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopping the workers and the sandbox"
                      + ("; database and vhost kept (--keep)" if options.keep else
                         "; dropping the database and the vhost"))
        run.close()


def chaos_command() -> click.Command:
    """The ``chaos`` command, for ``main.add_command(chaos_command())`` in the CLI."""

    @click.command("chaos")
    @click.option("--events", type=click.IntRange(10, 1_000_000), default=None,
                  help=f"Events to publish [default: {FULL.events}, --short {SHORT.events}].")
    @click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True,
                  help="Workers started with `coupon-worker worker`.")
    @click.option("--short", is_flag=True,
                  help="The CI profile: fewer events, shorter outages, no late original.")
    @click.option("--seed", type=int, default=1, show_default=True,
                  help="The sandbox's seed (its codes and which calls the low-rate faults "
                       "strike, as far as the calls' order repeats).")
    @click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path(".chaos"), show_default=True, help="Where the logs go.")
    @click.option("--keep", is_flag=True,
                  help="Keep the database and the vhost to look into afterwards.")
    @click.option("--namespace", default="", hidden=True,
                  help="Suffix for the database and vhost names (parallel test sessions).")
    def chaos(events: int | None, workers: int, short: bool, seed: int, workdir: Path,
              keep: bool, namespace: str) -> None:
        """Exactly once while a worker is SIGKILLed mid-call, RabbitMQ and PostgreSQL restart,
        the API goes down and every broker connection drops.

        Restarts this machine's RabbitMQ and PostgreSQL: do not run it where others rely on
        them. Exits 0 only if nothing is missing, nothing was issued twice and every worker
        is alive at the end.
        """
        if namespace and not re.fullmatch(r"[a-z0-9]{1,20}", namespace):
            raise click.BadParameter("lower-case letters and digits only", param_hint="namespace")
        profile = SHORT if short else FULL
        if events is not None:
            profile = replace(profile, events=events)
        console = Console(highlight=False, soft_wrap=True)
        sys.exit(run_chaos(ChaosOptions(profile, workers, seed, workdir, keep, namespace),
                           console))

    return chaos

