"""A PostgreSQL cluster and a RabbitMQ node of a test session's own, on ports of their own.

The tests that stop and start PostgreSQL or RabbitMQ (restarts, the broker reconnect, the
short chaos run) do it to these, never to the machine's services, so they run beside every
other test. The cluster is a Debian one (``pg_createcluster``, ``pg_ctlcluster``, removed with
``pg_dropcluster``), started by hand only. The node is ``rabbitmq-server`` with a name, ports,
data and logs of its own in a folder; it shares the machine's Erlang cookie, so that
``rabbitmqctl -n <node>`` (or ``RABBITMQ_NODENAME=<node> rabbitmqctl``) reaches it as it
reaches the machine's node.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coupon_devtools.harness.processes import Spawned, free_port, spawn
from coupon_devtools.harness.rabbitmqctl import NODE_DOWN_EXIT_CODE, rabbitmqctl

PG_VERSIONS = Path("/usr/lib/postgresql")
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
MACHINE_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
START_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 120.0
POLL_S = 0.2
# rabbitmqctl's exit codes for a node that is booting (64) or not registered with epmd yet (69).
NOT_UP_YET = (NODE_DOWN_EXIT_CODE, 69)


class PrivateServiceError(RuntimeError):
    """A private cluster or node could not be created or started."""


def _call(*argv: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True,  # noqa: S603 - argv is ours
                          timeout=timeout_s, check=False)


def _run(*argv: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    done = _call(*argv, timeout_s=timeout_s)
    if done.returncode != 0:
        raise PrivateServiceError(f"{' '.join(argv[:2])} failed: "
                                  f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done


# -- PostgreSQL ----------------------------------------------------------------------------


def pg_ready(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the PostgreSQL at ``host:port`` accepts connections."""
    return _call("pg_isready", "-h", host, "-p", str(port), "-q", timeout_s=10).returncode == 0


def cluster_on_port(port: int) -> tuple[str, str] | None:
    """The local Debian cluster (version, name) listening on ``port``, if there is one."""
    listed = _call("pg_lsclusters", "--no-header", timeout_s=30)
    for line in listed.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == str(port):
            return parts[0], parts[1]
    return None


@dataclass(frozen=True)
class PrivatePostgres:
    """A cluster of this session's own: ``postgres`` with trust on 127.0.0.1:``port``."""

    version: str
    name: str
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls, tag: str) -> PrivatePostgres:
        """Create and start cluster ``cw_<tag>`` on a free port of the newest installed
        PostgreSQL."""
        versions = sorted((p.name for p in PG_VERSIONS.iterdir() if p.name.isdigit()),
                          key=int) if PG_VERSIONS.is_dir() else []
        if not versions or shutil.which("pg_createcluster") is None:
            raise PrivateServiceError("a private PostgreSQL cluster needs Debian's "
                                      "postgresql-common (pg_createcluster)")
        cluster = cls(versions[-1], f"cw_{tag}", free_port())
        _run("pg_createcluster", "--start-conf", "manual", "-p", str(cluster.port),
             cluster.version, cluster.name, "--", "--auth=trust", "--no-sync")
        try:
            cluster.ctl("start")
            cluster.wait_ready()
        except BaseException:
            cluster.remove()
            raise
        return cluster

    def ctl(self, action: str) -> None:
        """``pg_ctlcluster <version> <name> <action>`` (start, stop, restart)."""
        _run("pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action)

    def ready(self) -> bool:
        return pg_ready(self.port)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise PrivateServiceError(f"cluster {self.name} not ready after {timeout_s:g} s")
            time.sleep(POLL_S)

    def remove(self) -> None:
        """Stop the cluster and delete it, data, configuration and log."""
        _call("pg_dropcluster", "--stop", self.version, self.name)


# -- RabbitMQ ------------------------------------------------------------------------------


def start_node(folder: Path, node: str, port: int, dist_port: int, *,
               log_name: str = "rabbitmq-server") -> Spawned:
    """Start ``rabbitmq-server`` as ``node``, AMQP on 127.0.0.1:``port``, Erlang distribution on
    ``dist_port``, its data, logs and configuration in ``folder``; it boots in the background.

    Starting it again with the same arguments brings the same node back, with its data (with
    another ``log_name``, the first log is kept).
    """
    if not RABBITMQ_SERVER.is_file() or not MACHINE_COOKIE.is_file():
        raise PrivateServiceError("a private RabbitMQ node needs Debian's rabbitmq-server "
                                  f"({RABBITMQ_SERVER}, {MACHINE_COOKIE})")
    folder.mkdir(parents=True, exist_ok=True)
    cookie = folder / ".erlang.cookie"
    if not cookie.exists():
        shutil.copyfile(MACHINE_COOKIE, cookie)
        cookie.chmod(0o400)
    (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{port}\n")
    (folder / "enabled_plugins").write_text("[].\n")
    (folder / "rabbitmq-env.conf").write_text("")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(folder),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        # One scheduler that sleeps when idle: Erlang's schedulers spin while they wait by
        # default, which a test node beside a busy suite cannot afford.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
            "-kernel inet_dist_use_interface {127,0,0,1} +S 1:1 +sbwt none "
            "+sbwtdcpu none +sbwtdio none"),
    }
    return spawn(log_name, [str(RABBITMQ_SERVER)], env, folder)


def wait_node_started(node: str, server: Spawned, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until ``node`` has booted (``await_startup`` refuses until it is registered);
    :class:`PrivateServiceError` if its server exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        server.check_running()
        done = _call("rabbitmqctl", "-q", "-n", node, "await_startup", timeout_s=timeout_s)
        if done.returncode == 0:
            return
        if done.returncode not in NOT_UP_YET or time.monotonic() > deadline:
            raise PrivateServiceError(f"RabbitMQ node {node} did not start: "
                                      f"{(done.stderr or done.stdout).strip()[-500:]}\n"
                                      f"{server.log_tail()}")
        time.sleep(POLL_S)


@dataclass(frozen=True)
class PrivateRabbit:
    """A RabbitMQ node of this session's own, the ``guest`` user on 127.0.0.1:``port``."""

    node: str
    port: int
    folder: Path
    server: Spawned

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def ctl(self, *args: str, allowed_error: str | None = None) -> str:
        """``rabbitmqctl -n <node> ...``."""
        return rabbitmqctl(*args, node=self.node, allowed_error=allowed_error,
                           timeout_s=COMMAND_TIMEOUT_S)

    @classmethod
    def start(cls, folder: Path, tag: str) -> PrivateRabbit:
        """Start node ``cw_<tag>@localhost`` with its data and logs in ``folder``; it boots in
        the background (see :meth:`wait_started`)."""
        node, port = f"cw_{tag}@localhost", free_port()
        return cls(node, port, folder, start_node(folder, node, port, free_port()))

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the node has booted (``await_startup`` refuses until it is registered)."""
        wait_node_started(self.node, self.server, timeout_s)

    def stop(self) -> None:
        """Stop the node (the whole Erlang VM), SIGKILL it if it lingers, delete its data."""
        _call("rabbitmqctl", "-q", "-n", self.node, "stop")
        self.server.stop(grace_s=15)
        shutil.rmtree(self.folder / "mnesia", ignore_errors=True)
