"""Consumer liveness: heartbeat files written by workers, judged by ``coupon-worker health``.

A worker process can be up while consuming nothing (its broker connection gone, its event loop
stuck), so "the process exists" or "the metrics port answers" says little. Each worker writes
a small JSON file from a timer on its consumer's event loop: the file is fresh only while that
loop runs. ``check_health`` reads the files of this host's workers and calls a worker healthy
when its process exists and its last beat is recent.

One file per node name in ``COUPONS_HEARTBEAT_DIR``, written atomically (a reader never sees
half a file). Files of processes that are gone are ignored unless asked for by name or pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# A beat may be late by a couple of intervals when the event loop is busy (a burst of
# deliveries, a slow publish confirm) without anything being wrong.
STALE_AFTER_INTERVALS = 3.0

Status = Literal["healthy", "stale", "gone"]


@dataclass(frozen=True)
class Heartbeat:
    """What a worker's consumer last said about itself."""

    node: str
    pid: int
    host: str
    interval_s: float
    beat_at: float
    """Wall-clock time (epoch seconds) of the beat: read by other processes."""
    started_at: float
    metrics_port: int | None = None
    """Where this worker serves /metrics (several workers on one host each have their own)."""


def heartbeat_path(directory: Path, node: str) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9@._-]", "_", node) + ".json")


def write_heartbeat(directory: Path, beat: Heartbeat) -> Path:
    """Replace the node's heartbeat file in one step."""
    directory.mkdir(parents=True, exist_ok=True)
    target = heartbeat_path(directory, beat.node)
    fd, scratch = tempfile.mkstemp(dir=directory, prefix=".beat-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(beat), handle)
        Path(scratch).replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(scratch).unlink()
        raise
    return target


def remove_heartbeat(directory: Path, node: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        heartbeat_path(directory, node).unlink()


def read_heartbeats(directory: Path) -> list[Heartbeat]:
    """Every readable heartbeat in ``directory`` (unreadable files are skipped)."""
    beats = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            beats.append(Heartbeat(node=str(data["node"]), pid=int(data["pid"]),
                                   host=str(data["host"]), interval_s=float(data["interval_s"]),
                                   beat_at=float(data["beat_at"]),
                                   started_at=float(data["started_at"]),
                                   metrics_port=None if data.get("metrics_port") is None
                                   else int(data["metrics_port"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return beats


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a running process of this host (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc: the signal said it exists
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@dataclass(frozen=True)
class WorkerHealth:
    node: str
    pid: int
    status: Status
    age_s: float
    max_age_s: float
    metrics_port: int | None = None

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def describe(self) -> str:
        if self.status == "gone":
            return f"{self.node} (pid {self.pid}): process gone, last beat {self.age_s:.1f} s ago"
        verdict = "consuming" if self.healthy else "consumer silent"
        metrics = "" if self.metrics_port is None else f", metrics on port {self.metrics_port}"
        return (f"{self.node} (pid {self.pid}): {verdict}, last beat {self.age_s:.1f} s ago "
                f"(limit {self.max_age_s:g} s){metrics}")


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    reason: str
    workers: tuple[WorkerHealth, ...]

    def as_dict(self) -> dict[str, object]:
        return {"healthy": self.healthy, "reason": self.reason,
                "workers": [{**asdict(w), "age_s": round(w.age_s, 3)} for w in self.workers]}


def check_health(directory: Path, *, node: str | None = None, pid: int | None = None,
                 max_age_s: float | None = None, clock: Callable[[], float] = time.time,
                 host: str | None = None,
                 exists: Callable[[int], bool] = process_exists) -> HealthReport:
    """Judge the workers of this host from their heartbeats.

    With ``node`` or ``pid``, that worker only; otherwise every worker whose process still
    runs, and there must be at least one. ``max_age_s`` defaults to a few of the worker's own
    heartbeat intervals.
    """
    here = host or socket.gethostname()
    now = clock()
    beats = [b for b in read_heartbeats(directory) if b.host == here]
    wanted = node is not None or pid is not None
    if wanted:
        beats = [b for b in beats if (node is None or b.node == node)
                 and (pid is None or b.pid == pid)]
    judged = []
    for beat in beats:
        limit = max_age_s if max_age_s is not None else STALE_AFTER_INTERVALS * beat.interval_s
        age = max(now - beat.beat_at, 0.0)
        status: Status = "healthy"
        if not exists(beat.pid):
            status = "gone"
        elif age > limit:
            status = "stale"
        judged.append(WorkerHealth(beat.node, beat.pid, status, age, limit, beat.metrics_port))
    if not wanted:
        judged = [w for w in judged if w.status != "gone"]
    if not judged:
        who = " ".join(part for part in (node and f"node {node}", pid and f"pid {pid}") if part)
        reason = (f"no heartbeat from {who}" if wanted else "no running worker on this host")
        return HealthReport(False, f"{reason} in {directory} (not started, or never consumed)",
                            ())
    bad = [w for w in judged if not w.healthy]
    if bad:
        return HealthReport(False, f"{len(bad)} of {len(judged)} worker(s) not consuming",
                            tuple(judged))
    return HealthReport(True, f"{len(judged)} worker(s) consuming", tuple(judged))
