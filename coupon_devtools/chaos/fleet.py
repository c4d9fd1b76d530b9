"""The fleet of worker processes: started, watched, restarted when they die, SIGKILLed on
purpose."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coupon_devtools.chaos.defaults import (
    READY_TIMEOUT_S,
    WORKER_COMMAND,
    ChaosError,
    Timeline,
    shown,
)
from coupon_devtools.demo.services import Service, spawn
from coupon_devtools.harness.processes import signal_group


@dataclass
class Slot:
    number: int
    service: Service
    incarnation: int = 0
    ready: bool = False


class Fleet:
    """N workers started with the default command, each restarted when it dies."""

    def __init__(self, size: int, env: Mapping[str, str], logs: Path,
                 services: list[Service], timeline: Timeline, *,
                 pool: str = "prefork") -> None:
        self.size = size
        # The default command as an operator types it; another pool is named.
        self.command = WORKER_COMMAND if pool == "prefork" else (*WORKER_COMMAND, "-P", pool)
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
        return spawn(name, self.command, self.env, self.logs, self.services)

    def start(self) -> None:
        with self._lock:
            self.slots = [Slot(n, self._spawn(n, 0)) for n in range(1, self.size + 1)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(slot.ready for slot in self.slots):
            self.supervise(quiet=True)
            for slot in self.slots:
                if slot.incarnation:
                    raise ChaosError(f"worker {slot.number} exited while starting; see "
                                     f"{shown(slot.service.log_path)}:\n"
                                     f"{slot.service.log_tail()}")
            if time.monotonic() > deadline:
                raise ChaosError(f"workers not ready after {READY_TIMEOUT_S:g} s; see "
                                 f"{shown(self.logs)}")
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
                             f"code {code}; its log: {shown(slot.service.log_path)}")
                (self.killed if ours else self.exited).append(what)
                slot.incarnation += 1
                slot.service = self._spawn(slot.number, slot.incarnation)
                slot.ready = False
                self.timeline.note(f"{what}; restarted with `coupon-worker "
                                   f"{' '.join(self.command)}` "
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
