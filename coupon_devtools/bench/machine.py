"""The machine a run stands on, and what its processes use: CPU and memory read from
``/proc``."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final


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


def started_at(pid: int) -> float | None:
    """When the kernel started a process, in epoch seconds, to a clock tick (None if gone).

    ``/proc/<pid>/stat`` counts ticks since boot; boot is now minus ``/proc/uptime``, which
    has the tick's resolution (``btime`` in ``/proc/stat`` is whole seconds)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        ticks = int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime_s + ticks / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, path: str, key: str) -> int:
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
    return Memory(sum(status_kb(p, "status", "VmRSS:") for p in pids),
                  sum(status_kb(p, "smaps_rollup", "Pss:") for p in pids), len(pids))


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
