"""A PgBouncer of a test session's own, in transaction pooling mode, in front of PostgreSQL.

Debian's ``pgbouncer`` (1.18, the version whose transaction mode knows nothing of prepared
statements) on a free port, its configuration and user list in a folder of its own, its log in
``pgbouncer.log`` there. The pool is kept small (``default_pool_size``) so that its clients
really share server connections: a statement that leaves anything on a server connection
(a prepared statement, a session setting) is found by the next client that gets it.

PgBouncer refuses to run as root: as root it is started with ``-u postgres`` (the server's
own account, which Debian's PostgreSQL creates); it logs to its standard error, captured in
the folder by the harness, so that account needs no access to the folder.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from coupon_devtools.harness.processes import Spawned, free_port, spawn

START_TIMEOUT_S = 15.0
POLL_S = 0.05
#: Server connections per (database, user) pair: fewer than a test's client connections.
DEFAULT_POOL_SIZE = 2
#: What PgBouncer logs once it listens, and when its port was taken meanwhile.
READY = "process up"
PORT_TAKEN = "Address already in use"
PORT_ATTEMPTS = 3
#: The account PgBouncer drops to when started as root.
UNPRIVILEGED_USER = "postgres"


class PgBouncerError(RuntimeError):
    """PgBouncer is not installed, or did not start."""


def pgbouncer_command() -> str:
    """The ``pgbouncer`` executable (Debian installs it in /usr/sbin)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        raise PgBouncerError("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer on 127.0.0.1:``port`` in front of ``upstream_host:upstream_port``."""

    port: int
    upstream_host: str
    upstream_port: int
    folder: Path
    process: Spawned

    @classmethod
    def start(cls, folder: Path, database_url: str, *,
              pool_size: int = DEFAULT_POOL_SIZE, ignore_startup_parameters: str = "",
              timeout_s: float = START_TIMEOUT_S) -> PgBouncer:
        """Start one in transaction pooling mode in front of the server of ``database_url``
        (any of its databases, with the URL's user, trusted as PostgreSQL trusts it).

        ``ignore_startup_parameters``: PgBouncer's setting of that name, e.g. ``options``
        (accepted from clients, and dropped).
        """
        command = pgbouncer_command()
        folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(PORT_ATTEMPTS):
            bouncer = cls._spawn(command, folder, database_url, pool_size,
                                 ignore_startup_parameters)
            try:
                bouncer.wait_ready(timeout_s)
            except PgBouncerError:
                # Another process took the free port before PgBouncer bound it: a new one.
                if PORT_TAKEN in bouncer.log() and not bouncer.process.alive():
                    continue
                bouncer.stop()
                raise
            return bouncer
        raise PgBouncerError(f"no free port for pgbouncer after {PORT_ATTEMPTS} attempts")

    @classmethod
    def _spawn(cls, command: str, folder: Path, database_url: str, pool_size: int,
               ignore_startup_parameters: str) -> PgBouncer:
        url = make_url(database_url)
        host, upstream_port = url.host or "127.0.0.1", url.port or 5432
        user = url.username or "postgres"
        port = free_port()
        config = folder / "pgbouncer.ini"
        users = folder / "userlist.txt"
        users.write_text(f'"{user}" ""\n')
        config.write_text("\n".join([
            "[databases]",
            f"* = host={host} port={upstream_port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {users}",
            "pool_mode = transaction",
            f"default_pool_size = {pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 200",
            # A client waits for a server connection rather than failing at once.
            "query_wait_timeout = 30",
            "server_reset_query =",
            f"ignore_startup_parameters = {ignore_startup_parameters}",
            "pidfile =",
            "logfile =",
            "",
        ]))
        argv = [command]
        if os.geteuid() == 0:
            # It reads its configuration and user list before it drops to that account.
            argv += ["-u", UNPRIVILEGED_USER]
        argv.append(str(config))
        process = spawn("pgbouncer", argv, {"PATH": os.environ.get("PATH", "/usr/bin")}, folder)
        return cls(port, host, upstream_port, folder, process)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until it says it is up (listening on its port: a connection to the port could
        reach another process that took it); :class:`PgBouncerError` if it exits first."""
        deadline = time.monotonic() + timeout_s
        while READY not in self.log():
            if not self.process.alive():
                raise PgBouncerError(f"pgbouncer exited:\n{self.process.log_tail()}")
            if time.monotonic() > deadline:
                raise PgBouncerError(f"pgbouncer not up after {timeout_s:g} s:\n"
                                     f"{self.process.log_tail()}")
            time.sleep(POLL_S)

    def url(self, database_url: str) -> str:
        """``database_url`` (on the upstream server) as reached through this PgBouncer."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        return self.process.log()

    def stop(self) -> None:
        """SIGTERM (PgBouncer's immediate shutdown), SIGKILL if it lingers."""
        self.process.stop(grace_s=5)

