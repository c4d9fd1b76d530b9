"""One chaos run: backends, sandbox, fleet, publisher and script, and their cleanup."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from coupon_devtools.demo.backends import Backends, local_broker, local_database
from coupon_devtools.demo.defaults import STOP_GRACE_S
from coupon_devtools.demo.services import Service, demo_env, migrate, start_sandbox
from coupon_devtools.harness.databases import drop_database
from coupon_devtools.harness.processes import free_port, stop_groups
from coupon_devtools.harness.rabbitmqctl import delete_vhost

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from coupon_devtools.sandbox import SandboxAdmin
    from worker.config import Settings
from coupon_devtools.chaos.defaults import (
    CHAOS_DATABASE,
    CHAOS_ENVIRONMENT,
    CHAOS_VHOST,
    FIRST_CUSTOMER_ID,
    LATE_CUSTOMER_ID,
    LATE_ORIGINAL_S,
    POLL_S,
    PROGRESS_EVERY_S,
    READ_TIMEOUT_S,
    SERIES,
    SETTLE_WINDOW_S,
    SLOW_ORIGINAL_S,
    STALL_S,
    ChaosError,
    Profile,
    Timeline,
    shown,
)
from coupon_devtools.chaos.disruptions import (
    Context,
    Script,
    api_down,
    drop_connections,
    kill_mid_call,
    restart_postgres,
    restart_rabbitmq,
    restore_services,
)
from coupon_devtools.chaos.faults import BACKGROUND_FAULTS, FaultBook
from coupon_devtools.chaos.fleet import Fleet
from coupon_devtools.chaos.ground_truth import (
    LedgerState,
    compare,
    consumers,
    ledger_state,
    read_ledger,
)
from coupon_devtools.chaos.publishing import Delivery, Publisher, make_event, plan_deliveries
from coupon_devtools.chaos.recovery import Recovery, recovery
from coupon_devtools.chaos.report import Failover, Report


@dataclass(frozen=True)
class ChaosOptions:
    profile: Profile
    workers: int
    seed: int
    workdir: Path
    keep: bool
    namespace: str = ""
    cluster: bool = False
    #: The Celery pool the fleet runs (``coupon-worker worker -P``).
    pool: str = "prefork"


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
        from coupon_devtools.sandbox.tls import CA_FILE_NAME

        self.logs.mkdir(parents=True, exist_ok=True)
        for old in [*self.logs.glob("*.log"), *self.heartbeats.glob("*.json")]:
            old.unlink()
        self.backends = backends = self.choose_backends()
        self.console.print(f"  PostgreSQL  {escape(backends.database.label)}")
        self.console.print(f"  broker      {escape(backends.broker.label)}")
        # Over HTTPS, as Capillary is: a TLS stream broken after the call is a fault of its own.
        sandbox_url = f"https://127.0.0.1:{free_port()}"
        tls_dir = self.workdir / "tls"
        ca_file = tls_dir / CA_FILE_NAME
        ca_file.unlink(missing_ok=True)  # an earlier run's CA trusts nothing of this one's
        env = demo_env(backends, sandbox_url, 0)
        env.update(CHAOS_ENVIRONMENT)
        env.update(self.extra_env())
        env["REQUESTS_CA_BUNDLE"] = str(ca_file)
        # `coupon-worker health` judges these workers only, not others of this host.
        env["COUPONS_HEARTBEAT_DIR"] = str(self.heartbeats)
        migrate(env, self.logs)
        sandbox = start_sandbox(env, self.logs, self.services, "--port",
                                sandbox_url.rsplit(":", 1)[1], "--seed", str(self.options.seed),
                                "--tls-dir", str(tls_dir))
        self.console.print(f"  sandbox     {sandbox_url} (pid {sandbox.process.pid}, seed "
                           f"{self.options.seed}; its CA in {ca_file})")
        self.engine = create_engine(backends.database.url, pool_size=2, pool_pre_ping=True,
                                    connect_args={"connect_timeout": 3})
        self.admin = SandboxAdmin(sandbox_url, ca_file=str(ca_file))
        return env, self.admin

    def choose_backends(self) -> Backends:
        """The database and broker of this run (the local ones, which it restarts)."""
        return choose_local_backends(self.options.namespace)

    def extra_env(self) -> dict[str, str]:
        """Settings of this kind of run, on top of ``CHAOS_ENVIRONMENT``."""
        return {}

    def rabbit_node(self) -> str | None:
        """The RabbitMQ node ``rabbitmqctl`` asks about queues (None: its default)."""
        return None

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
        self.console.print(f"  workers     {options.workers} x `coupon-worker worker -P "
                           f"{options.pool}` "
                           f"(read timeout {READ_TIMEOUT_S:g} s, settle window "
                           f"{SETTLE_WINDOW_S:g} s, claims as by default: a 30 s lease "
                           f"renewed every 10 s, up to 120 s), logs in {shown(self.logs)}")
        fleet = Fleet(options.workers, env, self.logs, self.services, self.timeline,
                      pool=options.pool)
        fleet.start()
        settings = Settings.model_validate(env)
        self.ctx = ctx = self.make_context(fleet, faults, victim)
        self.timeline.start = time.monotonic()
        self.timeline.note(f"{options.workers} workers ready (pids "
                           f"{', '.join(str(s.service.process.pid) for s in fleet.slots)}); "
                           "publishing starts")
        self.publisher = Publisher(settings, deliveries, profile.publish_s, self.timeline)
        self.script = Script(ctx, self.steps())
        self.publisher.start()
        self.script.start()
        settled_s = self.watch(fleet, len(events) + (late is not None))
        return self.check(fleet, settings, events, late, admin, settled_s)

    def make_context(self, fleet: Fleet, faults: FaultBook, victim: dict[str, Any]) -> Context:
        assert self.engine is not None and self.backends is not None
        return Context(self.profile, fleet, faults, self.engine,
                       self.backends.broker.url.rsplit("/", 1)[1], victim, self.timeline)

    def steps(self) -> list[tuple[float, str, Callable[[Context], None]]]:
        """The disruptions, each at its time: (seconds after publishing starts, name, act)."""
        profile = self.profile
        return [
            (profile.kill_at_s, "SIGKILL mid-call", kill_mid_call),
            (profile.rabbit_at_s, "RabbitMQ restart", restart_rabbitmq),
            (profile.postgres_at_s, "PostgreSQL restart", restart_postgres),
            (profile.api_at_s, "API outage", api_down),
            (profile.drop_at_s, "dropping broker connections", drop_connections),
        ]

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
            failover=self.failover_figures(), worker_kill=self.worker_kill_figures(),
        )
        report.print(self.console)
        return 0 if report.passed else 1

    def failover_figures(self) -> Failover | None:
        """What a cluster run measured of the failover (None: no cluster)."""
        return None

    def worker_kill_figures(self) -> Recovery | None:
        """When the last entity the worker SIGKILLed mid-call held was issued (None: no
        worker was killed): its heartbeat lease runs out, a read-back finds what landed."""
        ctx = self.ctx
        if ctx is None or ctx.worker_killed_at is None or self.engine is None:
            return None
        return recovery(self.engine, "killed worker's claims", ctx.worker_killed_at,
                        ctx.worker_claims)

    def _alive(self, fleet: Fleet, queues: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        """Workers running; of those, how many beat as ``coupon-worker health`` judges (their
        consumer's event loop runs); and consumers per queue as RabbitMQ counts them. A worker
        gets a few seconds to reconnect after the last disruption."""
        from worker.domain.errors import BrokerUnavailable
        from worker.health import check_health

        deadline = time.monotonic() + 30
        while True:
            pids = fleet.pids()
            alive = len(pids)
            report = check_health(self.heartbeats)
            healthy = sum(1 for w in report.workers if w.healthy and w.pid in pids)
            try:
                counts = consumers(self.ctx.vhost if self.ctx else "", queues,
                                   node=self.rabbit_node())
            except BrokerUnavailable:
                counts = dict.fromkeys(queues, 0)
            if (min(alive, healthy, *counts.values()) >= fleet.size
                    or time.monotonic() > deadline):
                return alive, healthy, counts
            time.sleep(1)

    # -- cleaning up

    def _database_port(self) -> int:
        if self.backends is None:
            return 5432
        from sqlalchemy.engine import make_url

        return make_url(self.backends.database.url).port or 5432

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
        self.restore()
        if self.engine is not None:
            self.engine.dispose()
        if self.admin is not None:
            self.admin.close()
        if self.backends is None or self.options.keep:
            return
        from sqlalchemy.engine import make_url

        from worker.domain.errors import BrokerUnavailable

        url = make_url(self.backends.database.url)
        with contextlib.suppress(Exception):
            drop_database(url, str(url.database))
        with contextlib.suppress(BrokerUnavailable):
            self.release_broker()

    def restore(self) -> None:
        """Whatever happened, leave RabbitMQ and PostgreSQL running and answering."""
        restore_services(self.ctx, self._database_port())

    def release_broker(self) -> None:
        """Delete the run's vhost (unless --keep)."""
        assert self.backends is not None
        delete_vhost(self.backends.broker.url.rsplit("/", 1)[1])
