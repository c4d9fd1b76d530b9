"""``coupon-worker chaos --cluster``: the leader of the events queue SIGKILLed mid-run.

A run on a three-node RabbitMQ cluster of its own on this host
(:mod:`coupon_devtools.harness.cluster`), quorum queues, and the workers and the publisher
given the list of the three nodes' URLs. Mid-run, the node leading the events queue is
SIGKILLed (its whole Erlang VM), kept down a few seconds and started again. The verdict adds to
the usual one (0 missing, 0 issued twice, every worker alive and consuming at the end):

- every worker consumes every queue again while the node is still down (the failover);
- the node comes back as a running member of the cluster;
- every entity claimed when the node died (Celery ends the tasks in flight on a lost
  connection, so their claims are no longer renewed and come back once their lease lapses) is
  issued within the recovery target.

The machine's own RabbitMQ and PostgreSQL are left alone: the run uses a database of its own
on the local PostgreSQL, which it does not restart.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from coupon_devtools.chaos.defaults import (
    CHAOS_DATABASE,
    CHAOS_VHOST,
    ChaosError,
    Profile,
)
from coupon_devtools.chaos.disruptions import Context
from coupon_devtools.chaos.faults import FaultBook
from coupon_devtools.chaos.fleet import Fleet
from coupon_devtools.chaos.ground_truth import consumers
from coupon_devtools.chaos.recovery import RECOVERY_TARGET_S, claimed_now, recovery
from coupon_devtools.chaos.report import Failover
from coupon_devtools.chaos.run import ChaosRun
from coupon_devtools.demo.backends import Backends, Broker, local_database
from coupon_devtools.harness.cluster import RabbitCluster

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

    from coupon_devtools.sandbox import SandboxAdmin
    from worker.config import Settings

CLUSTER: Final = Profile(events=200, publish_s=20, kill_at_s=8, rabbit_at_s=8,
                         rabbit_down_s=8, postgres_at_s=0, api_at_s=0, api_down_s=0,
                         drop_at_s=0, late_original=False, settle_timeout_s=150)
"""200 events over 20 s; the leader dies 8 s in and stays down 8 s (the other disruptions'
fields are unused)."""
FAILOVER_TIMEOUT_S: Final = 60.0
"""How long the kill waits for RabbitMQ to count every worker on every queue again (its counts
come from statistics emitted every few seconds, and rabbitmqctl is slow on a busy machine)."""
CATCH_IN_FLIGHT_S: Final = 5.0
"""How long the kill waits for a call in flight to strike during."""
HELD_ANSWER: Final = ("answer held 1.5 s after issuing (calls in flight at the kill)",
                      {"kind": "stall_after", "delaySeconds": 1.5, "probability": 0.1})


@dataclass
class ClusterContext(Context):
    """What the leader's SIGKILL acts on, and what it measured."""

    cluster: RabbitCluster | None = None
    events_queue: str = ""
    queues: tuple[str, ...] = ()
    killed_at: datetime | None = None  # the database's clock, to compare with issued_at
    killed_wall: datetime | None = None  # this host's clock, to compare with the workers' logs
    reconnected_s: tuple[float, ...] = ()
    in_flight: tuple[int, ...] = ()
    killed: str = ""
    new_leader: str | None = None
    consuming_again_s: float | None = None
    down_s: float = 0.0
    back_s: float | None = None


def _in_flight_now(engine: Engine) -> tuple[datetime, tuple[int, ...]]:
    """The database's clock and the entities claimed now."""
    claimed = claimed_now(engine)
    return claimed.at, tuple(claimed.holders)


_CONNECTED = re.compile(r"^(\S+) INFO Connected to amqp://", re.MULTILINE)


def reconnections(fleet: Fleet, since: datetime) -> tuple[float, ...]:
    """For each worker that connected again after ``since`` (its log says ``Connected to``),
    how many seconds after: the failover as the workers saw it."""
    found = []
    for slot in fleet.slots:
        stamps = [datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                  for m in _CONNECTED.finditer(slot.service.log())]
        later = [(t - since).total_seconds() for t in stamps if t >= since]
        if later:
            found.append(min(later))
    return tuple(found)


def kill_leader(ctx: Context) -> None:
    """SIGKILL the node leading the events queue, watch the workers fail over, start it
    again after the profile's downtime."""
    assert isinstance(ctx, ClusterContext) and ctx.cluster is not None
    from worker.domain.errors import BrokerUnavailable

    cluster = ctx.cluster
    leader = cluster.leader(ctx.vhost, ctx.events_queue)
    # Strike while calls are in flight (some held by the sandbox after issuing), so that the
    # tasks Celery cancels include calls that landed.
    deadline = time.monotonic() + CATCH_IN_FLIGHT_S
    ctx.killed_at, ctx.in_flight = _in_flight_now(ctx.engine)
    while not ctx.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
        ctx.killed_at, ctx.in_flight = _in_flight_now(ctx.engine)
    cluster.kill(leader)
    killed, ctx.killed_wall = time.monotonic(), datetime.now(UTC)
    ctx.killed = leader
    ctx.rabbit_stopped = True
    ctx.timeline.note(f"SIGKILL RabbitMQ node {leader}, leader of {ctx.events_queue}: its "
                      f"connections gone without a goodbye; {len(ctx.in_flight)} entities "
                      "claimed at that moment")
    survivor = next(n.node for n in cluster.nodes if n.node != leader)
    while time.monotonic() - killed < FAILOVER_TIMEOUT_S:
        try:
            counts = consumers(ctx.vhost, ctx.queues, node=survivor)
        except BrokerUnavailable:
            counts = {}
        if counts and min(counts.values()) >= ctx.fleet.size:
            ctx.consuming_again_s = time.monotonic() - killed
            break
        time.sleep(0.2)
    ctx.new_leader = cluster.leader(ctx.vhost, ctx.events_queue)
    ctx.reconnected_s = reconnections(ctx.fleet, ctx.killed_wall)
    if ctx.reconnected_s:
        ctx.timeline.note(f"{len(ctx.reconnected_s)} workers reconnected to another node, the "
                          f"slowest {max(ctx.reconnected_s) * 1000:.0f} ms after the kill "
                          "(their logs)")
    if ctx.consuming_again_s is None:
        ctx.timeline.note(f"the workers were not all consuming again {FAILOVER_TIMEOUT_S:g} s "
                          "after the kill", "bold red")
    else:
        ctx.timeline.note(f"every worker consuming every queue again {ctx.consuming_again_s:.1f}"
                          f" s after the kill; {ctx.events_queue} now led by {ctx.new_leader}")
    time.sleep(max(ctx.profile.rabbit_down_s - (time.monotonic() - killed), 0.0))
    restarted = time.monotonic()
    ctx.down_s = restarted - killed
    cluster.restart(leader)
    ctx.back_s = time.monotonic() - restarted
    ctx.rabbit_stopped = False
    ctx.timeline.note(f"RabbitMQ node {leader} started again after {ctx.down_s:.1f} s down; a "
                      f"running cluster member {ctx.back_s:.1f} s later")


class ClusterChaosRun(ChaosRun):
    """A chaos run on a cluster of its own, whose events queue's leader dies mid-run."""

    cluster: RabbitCluster | None = None
    settings: Settings | None = None

    def setup(self) -> tuple[dict[str, str], SandboxAdmin]:
        """The run's services, then what ``coupon-worker broker setup`` does in production: the
        parked queue and the delivery-limit policy on the consumed queues."""
        from worker.adapters.rabbitmq.parking import (
            apply_policy,
            declare_parking,
            queue_policy,
            vhost_of,
        )
        from worker.config import Settings

        env, admin = super().setup()
        assert self.cluster is not None
        self.settings = settings = Settings.model_validate(env)
        policy = queue_policy(settings)
        declare_parking(settings)
        apply_policy(policy, vhost_of(settings), node=self.cluster.nodes[0].node)
        self.console.print(f"  policy      {policy.name}: delivery limit "
                           f"{settings.delivery_limit}, then parked in {settings.parked_queue} "
                           "(as `coupon-worker broker setup` sets it)")
        return env, admin

    def choose_backends(self) -> Backends:
        suffix = f"_{self.options.namespace}" if self.options.namespace else ""
        database, problem = local_database(CHAOS_DATABASE + suffix)
        if database is None:
            raise ChaosError(f"chaos needs the local PostgreSQL: {problem}")
        folder = self.workdir / "rabbitmq-cluster"
        shutil.rmtree(folder, ignore_errors=True)
        self.console.print("  starting a 3-node RabbitMQ cluster (nodes of their own, joined "
                           "with join_cluster)...")
        self.cluster = cluster = RabbitCluster.start(folder, uuid.uuid4().hex[:6])
        vhost = CHAOS_VHOST + suffix.replace("_", "-")
        cluster.create_vhost(vhost)
        nodes = ", ".join(f"{n.node} :{n.port}" for n in cluster.nodes)
        return Backends(database, Broker(cluster.urls(vhost),
                                         f"3-node cluster ({nodes}), vhost {vhost}, quorum "
                                         "queues, the three URLs to every client"))

    def extra_env(self) -> dict[str, str]:
        return {"COUPONS_QUEUE_TYPE": "quorum"}

    def rabbit_node(self) -> str | None:
        running = [n.node for n in self.cluster.nodes if n.running()] if self.cluster else []
        return running[0] if running else None

    def plan(self, admin: SandboxAdmin) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                 dict[str, Any] | None, FaultBook]:
        events, victim, late, faults = super().plan(admin)
        label, rule = HELD_ANSWER
        faults.add(label, times=-1, **rule)
        return events, victim, late, faults

    def make_context(self, fleet: Fleet, faults: FaultBook,
                     victim: dict[str, Any]) -> Context:
        from worker.config import Settings

        assert self.engine is not None and self.backends is not None
        defaults = Settings.model_fields
        queues = tuple(str(defaults[name].default)
                       for name in ("events_queue", "tasks_queue", "retry_queue"))
        return ClusterContext(self.profile, fleet, faults, self.engine,
                              self.backends.broker.url.rsplit("/", 1)[1], victim,
                              self.timeline, cluster=self.cluster, events_queue=queues[0],
                              queues=queues)

    def steps(self) -> list[tuple[float, str, Callable[[Context], None]]]:
        return [(self.profile.kill_at_s, "SIGKILL of the events queue's leader", kill_leader)]

    def failover_figures(self) -> Failover | None:
        ctx = self.ctx
        if not isinstance(ctx, ClusterContext) or not ctx.killed:
            return None
        recovered, last_s = self._recovered(ctx)
        from worker.adapters.rabbitmq.parking import parked_count
        from worker.domain.errors import BrokerUnavailable

        try:
            parked = parked_count(self.settings) if self.settings is not None else None
        except BrokerUnavailable:
            parked = None
        return Failover(parked=parked, killed=ctx.killed, new_leader=ctx.new_leader,
                        reconnected_s=ctx.reconnected_s,
                        consuming_again_s=ctx.consuming_again_s, down_s=ctx.down_s,
                        back_s=ctx.back_s, in_flight=len(ctx.in_flight), recovered=recovered,
                        recovered_s=last_s, target_s=RECOVERY_TARGET_S)

    def _recovered(self, ctx: ClusterContext) -> tuple[int, float | None]:
        """How many of the entities claimed at the kill were issued, and when the last was
        (seconds after the kill; None if one never was)."""
        if ctx.killed_at is None or self.engine is None:
            return 0, 0.0
        found = recovery(self.engine, "claimed at the node's kill", ctx.killed_at,
                         ctx.in_flight)
        return found.recovered, found.recovered_s

    def restore(self) -> None:
        """The machine's services were not touched; the cluster goes in :meth:`close`."""

    def release_broker(self) -> None:
        """The vhost goes with the cluster."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.cluster is not None:
                self.cluster.stop()
