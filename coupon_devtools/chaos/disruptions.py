"""The disruptions of a run: a worker killed mid-call, RabbitMQ and PostgreSQL restarted,
the API down, connections dropped; and the script that plays them."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from coupon_devtools.sandbox import SandboxAdmin
from coupon_devtools.chaos.defaults import ChaosError, Profile, Timeline, first_line
from coupon_devtools.chaos.faults import FaultBook
from coupon_devtools.chaos.fleet import Fleet, Slot
from coupon_devtools.chaos.recovery import claimed_now
from coupon_devtools.harness.private import cluster_on_port, pg_ready


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
    #: The worker SIGKILLed mid-call: when (the database's clock) and the entities it held.
    worker_killed_at: datetime | None = None
    worker_claims: tuple[int, ...] = ()


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
                pid = _kill_noting_claims(ctx, slot)
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
            pid = _kill_noting_claims(ctx, slot)
            ctx.timeline.note(f"SIGKILL worker {slot.number} (pid {pid}, pool and all) with a "
                              "call in flight (the chosen victim was never caught mid-call)")
            return
        time.sleep(0.05)
    raise ChaosError("no worker was ever seen with a call in flight")


def _kill_noting_claims(ctx: Context, slot: Slot) -> int:
    """SIGKILL ``slot``'s worker, noting first the entities its pool processes hold (their
    pids are gone after the kill): the report says when the last of them was issued."""
    claimed = claimed_now(ctx.engine)
    ctx.worker_claims = claimed.held_by(lambda pid: ctx.fleet.slot_of(pid) is slot)
    ctx.worker_killed_at = claimed.at
    return ctx.fleet.kill(slot)


def _in_flight_owner(engine: Engine, event_id: str | None) -> int | None:
    """The pid of a pool process holding a claim (of ``event_id``, or any), if the ledger
    answers."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from worker.adapters.postgres import models as m
    from worker.adapters.rabbitmq.names import TASK_MARK

    query = select(m.Entity.claimed_by).where(m.Entity.state == "in_flight",
                                              m.Entity.claimed_by.is_not(None))
    if event_id is not None:
        query = query.where(m.Entity.event_id == event_id)
    try:
        with engine.connect() as conn:
            owner = conn.execute(query.limit(1)).scalar()
    except SQLAlchemyError:
        return None
    # ``host:pid``, then ``/task:<id>`` when a task took the claim
    # (``worker.adapters.rabbitmq.names.TASK_MARK``)
    return int(str(owner).split(TASK_MARK)[0].rsplit(":", 1)[1]) if owner else None


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


def _pg_cluster(port: int) -> tuple[str, str]:
    """The local cluster to restart: the Debian one that listens on the ledger's port."""
    found = cluster_on_port(port)
    if found is None:
        raise ChaosError(f"no local PostgreSQL cluster on port {port} to restart "
                         "(pg_lsclusters lists none)")
    return found


def restart_postgres(ctx: Context) -> None:
    port = ctx.engine.url.port or 5432
    version, cluster = _pg_cluster(port)
    started = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version,  # noqa: S603,S607
                    cluster, "restart"], check=True, capture_output=True, timeout=120)
    while not pg_ready(port):
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
                self.ctx.timeline.note(f"{name} failed: {first_line(str(exc))}", "bold red")
            self.ctx.last_fault_end = self.ctx.timeline.now()
        self.finished = True


def restore_services(ctx: Context | None, database_port: int) -> None:
    """Whatever happened, leave RabbitMQ and PostgreSQL running and answering."""
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
    from worker.domain.errors import BrokerUnavailable

    if ctx is not None and ctx.rabbit_stopped:
        with contextlib.suppress(BrokerUnavailable):
            rabbitmqctl("start_app")
    with contextlib.suppress(BrokerUnavailable):
        rabbitmqctl("await_startup")
    deadline = time.monotonic() + 60
    while not pg_ready(database_port) and time.monotonic() < deadline:
        time.sleep(0.2)
