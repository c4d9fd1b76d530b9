"""Subprocesses the tools and the tests start: spawn, wait until ready, read logs, stop.

Every child runs in a session (so a process group) of its own, its output in a log file.
Stopping signals the main process only: a Celery prefork worker stops its own pool, and a pool
process killed from outside can die holding the pool's queue lock, which hangs the worker's
exit. What is left of the group after the grace period is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 15.0
REAP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
LOG_TAIL_CHARS = 3000


class ProcessFailed(RuntimeError):
    """A child exited, or was not ready in time; the message ends with its log's tail."""


@dataclass
class Spawned:
    """One child process, in a process group of its own, its output in ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The main process's pid, also its process group's id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the main process still runs (and reap it if it does not)."""
        return self.process.poll() is None

    def log(self) -> str:
        """The whole log so far ("" if it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the log."""
        return self.log()[-chars:]

    def check_running(self) -> None:
        """Raise :class:`ProcessFailed` if the process has exited."""
        if not self.alive():
            raise ProcessFailed(f"{self.name} exited with code {self.process.returncode}; "
                                f"its log ({self.log_path.name}) ends with:\n{self.log_tail()}")

    def wait_for_log(self, needle: str, timeout_s: float) -> None:
        """Wait until ``needle`` is in the log; :class:`ProcessFailed` if the process exits
        or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while needle not in self.log():
            self.check_running()
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{needle!r} not in the log of {self.name} after "
                                    f"{timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the main process (a warm shutdown for Celery), then SIGKILL the group."""
        stop_groups([self.pid], [self.process], grace_s=grace_s)

    def kill(self) -> None:
        """SIGKILL the whole process group at once: the main process and its pool."""
        signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=REAP_TIMEOUT_S)


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str], logs: Path, *,
          cwd: Path | None = None) -> Spawned:
    """Start ``argv`` in a session of its own, its output in ``logs/<name>.log``."""
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603 - the callers build argv themselves
            list(argv), env=dict(env), cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return Spawned(name, process, log_path)


def cli_command() -> list[str]:
    """How to run ``coupon-worker``: the script next to this interpreter, else the one on the
    PATH, else ``python -m worker.entrypoints.cli``."""
    script = Path(sys.executable).parent / "coupon-worker"
    if script.exists():
        return [str(script)]
    found = shutil.which("coupon-worker")
    return [found] if found else [sys.executable, "-m", "worker.entrypoints.cli"]


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` exists (a zombie leader counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to group ``pgid``, which may be gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def command_line(pid: int) -> str:
    """The command line of ``pid`` ("" when it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def stop_groups(pgids: Sequence[int], children: Sequence[subprocess.Popen[bytes]] = (), *,
                grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the leader of each process group, SIGKILL what is left of each group after
    ``grace_s``. ``children`` are reaped on the way: a zombie leader still counts as a group."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for child in children:
            child.poll()
        if not any(group_alive(p) for p in pgids):
            return
        time.sleep(POLL_INTERVAL_S)
    for pgid in pgids:
        signal_group(pgid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=REAP_TIMEOUT_S)


#: The lowest port handed out for the suite's own servers (below it: the usual services').
LOWEST_SERVER_PORT = 20000
#: Ports this process has handed out, never twice.
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' source ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server the suite starts, below the kernel's
    ephemeral range.

    A port that ``bind(0)`` hands out is an ephemeral one: between the pick and the server's
    own bind (seconds, for a RabbitMQ node), any outgoing connection of the parallel suite
    may take it as its source port, and one CI run's cluster node failed to start with
    ``eaddrinuse``. Below that range no outgoing connection ever takes it. Drawn at random,
    since several test processes pick at once, and checked by binding it.
    """
    candidates = range(LOWEST_SERVER_PORT, _ephemeral_low())
    for _ in range(500 if len(candidates) > 1000 else 0):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
