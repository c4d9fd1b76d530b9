"""A RabbitMQ cluster of three nodes on this host, for the failover tests and the chaos run.

Each node is a ``rabbitmq-server`` of its own (:func:`coupon_devtools.harness.private.start_node`):
its own ``RABBITMQ_NODENAME`` (``cw_<tag>_<n>@localhost``), AMQP and Erlang distribution ports,
data and log folders, no plugins (no management listener to spare ports and CPU), and the
machine's Erlang cookie, so that the nodes trust each other and ``rabbitmqctl -n <node>``
reaches each. The second and third nodes join the first with ``rabbitmqctl join_cluster``.

A node can be SIGKILLed (its whole Erlang VM, as a crashed host would vanish) and started
again on the same name, ports and data, which brings it back into the cluster.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from coupon_devtools.harness.private import (
    COMMAND_TIMEOUT_S,
    START_TIMEOUT_S,
    PrivateServiceError,
    start_node,
    wait_node_started,
)
from coupon_devtools.harness.processes import Spawned, free_port, stop_groups
from coupon_devtools.harness.rabbitmqctl import rabbitmqctl
from worker.domain.errors import BrokerUnavailable

CLUSTER_SIZE = 3
LEADER_TIMEOUT_S = 60.0
POLL_S = 0.2
STOP_GRACE_S = 15.0


@dataclass
class ClusterNode:
    """One node of the cluster: its name, ports and folder stay the same across restarts."""

    node: str
    port: int
    dist_port: int
    folder: Path
    server: Spawned
    starts: int = 1

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def running(self) -> bool:
        return self.server.alive()


@dataclass
class RabbitCluster:
    """Three joined RabbitMQ nodes on 127.0.0.1; :meth:`stop` removes them."""

    nodes: list[ClusterNode] = field(default_factory=list)

    @classmethod
    def start(cls, folder: Path, tag: str, size: int = CLUSTER_SIZE) -> RabbitCluster:
        """Start ``size`` nodes, wait until they have booted, join them into one cluster."""
        cluster = cls()
        try:
            for n in range(1, size + 1):
                name = f"cw_{tag}_{n}@localhost"
                port, dist_port = free_port(), free_port()
                node_folder = folder / f"node{n}"
                cluster.nodes.append(ClusterNode(name, port, dist_port, node_folder,
                                                 start_node(node_folder, name, port, dist_port)))
            # The nodes boot side by side (seconds of Erlang start-up each).
            with ThreadPoolExecutor(len(cluster.nodes)) as pool:
                list(pool.map(lambda n: wait_node_started(n.node, n.server, START_TIMEOUT_S),
                              cluster.nodes))
            first = cluster.nodes[0].node
            for other in cluster.nodes[1:]:
                cluster.ctl("stop_app", node=other.node)
                cluster.ctl("reset", node=other.node)
                cluster.ctl("join_cluster", first, node=other.node)
                cluster.ctl("start_app", node=other.node)
            cluster.wait_members(len(cluster.nodes))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # -- addressing

    def urls(self, vhost: str, nodes: Sequence[ClusterNode] | None = None) -> str:
        """The broker URL list for ``vhost`` (kombu's failover form, ``;``-separated)."""
        return ";".join(n.url(vhost) for n in (nodes or self.nodes))

    def rotated(self, vhost: str, first: int) -> str:
        """The URL list starting at node ``first`` (0-based): one per worker spreads them."""
        k = first % len(self.nodes)
        return self.urls(vhost, [*self.nodes[k:], *self.nodes[:k]])

    def by_name(self, node: str) -> ClusterNode:
        found = next((n for n in self.nodes if n.node == node), None)
        if found is None:
            raise PrivateServiceError(f"{node} is no node of this cluster")
        return found

    def ctl(self, *args: str, node: str | None = None,
            allowed_error: str | None = None) -> str:
        """``rabbitmqctl`` against ``node``, or against the first running node."""
        target = node or next((n.node for n in self.nodes if n.running()), None)
        if target is None:
            raise BrokerUnavailable("no node of the cluster is running")
        return rabbitmqctl(*args, node=target, allowed_error=allowed_error,
                           timeout_s=COMMAND_TIMEOUT_S)

    def create_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    # -- watching

    def running_members(self) -> set[str]:
        """The nodes the cluster says are running."""
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return {n.node for n in self.nodes} & set(status.get("running_nodes") or [])

    def wait_members(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.running_members()) < count:
            if time.monotonic() > deadline:
                raise PrivateServiceError(f"the cluster has {self.running_members()} running, "
                                          f"not {count} nodes, after {timeout_s:g} s")
            time.sleep(POLL_S)

    def leader(self, vhost: str, queue: str, timeout_s: float = LEADER_TIMEOUT_S) -> str:
        """The node leading quorum queue ``queue`` (once it has one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.ctl("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
            for line in out.splitlines():
                parts = line.split("\t")
                if len(parts) == 2 and parts[0] == queue and "@" in parts[1]:
                    return parts[1].strip()
            if time.monotonic() > deadline:
                raise PrivateServiceError(f"queue {queue} of vhost {vhost} has no leader:\n{out}")
            time.sleep(POLL_S)

    def online(self, vhost: str, queue: str) -> int:
        """How many of ``queue``'s members are online (a quorum queue has one per node)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "online", "--no-table-headers")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return members.count("@")
        return 0

    # -- disrupting

    def kill(self, node: str) -> None:
        """SIGKILL the node's whole Erlang VM: no goodbye to its peers or its clients."""
        self.by_name(node).server.kill()

    def restart(self, node: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start a killed node again on its name, ports and data; return once it has booted
        and is a running member of the cluster again."""
        found = self.by_name(node)
        if found.running():
            raise PrivateServiceError(f"{node} is still running")
        found.starts += 1
        found.server = start_node(found.folder, found.node, found.port, found.dist_port,
                                  log_name=f"rabbitmq-server.{found.starts}")
        wait_node_started(found.node, found.server, timeout_s)
        self.wait_members(len(self.nodes), timeout_s)

    def stop(self) -> None:
        """Stop every node (SIGKILL what lingers) and delete their data."""
        stop_groups([n.server.pid for n in self.nodes],
                    [n.server.process for n in self.nodes], grace_s=STOP_GRACE_S)
        for n in self.nodes:
            shutil.rmtree(n.folder / "mnesia", ignore_errors=True)
