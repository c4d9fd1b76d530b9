"""The chaos run's names, profiles and workers' environment, its timeline and its error."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.markup import escape

from coupon_devtools.demo.defaults import DemoError

CHAOS_DATABASE: Final = "coupon_worker_chaos"
CHAOS_VHOST: Final = "coupon-worker-chaos"
SERIES: Final = (544770, 553379)
FIRST_CUSTOMER_ID: Final = 577_000_001
LATE_CUSTOMER_ID: Final = 577_000_000

READ_TIMEOUT_S: Final = 2.0
SETTLE_WINDOW_S: Final = 5.0
SLOW_ORIGINAL_S: Final = 4.0
"""Longer than the read timeout (the client gives up), and it lands well within the window
counted from when the worker recorded the unknown outcome: exactly once is promised."""
LATE_ORIGINAL_S: Final = 10.0
"""Lands after read timeout + settle window, once the worker re-sent, and before the re-send's
verification reads back again: a duplicate the worker must detect, not prevent."""
STALL_S: Final = 1.5
"""The victim's answer is held this long after issuing (under the read timeout): the window in
which its worker is killed."""
CHAOS_ENVIRONMENT: Final[Mapping[str, str]] = {
    "COUPONS_HTTP_TIMEOUT_SECONDS": f"{READ_TIMEOUT_S:g}",
    "COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "COUPONS_SETTLE_WINDOW_SECONDS": f"{SETTLE_WINDOW_S:g}",
    # The claim deadline and heartbeat are the defaults (120 s, a lease of three 10 s
    # heartbeats): a killed worker's claims come back as they would in production, and the
    # report says how long after the kill the last of them was issued.
    "COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS": "5",
    "COUPONS_SWEEP_INTERVAL_SECONDS": "0.5",
    "COUPONS_REQUEUE_AFTER_SECONDS": "15",
    "COUPONS_CIRCUIT_OPEN_SECONDS": "2",
    "COUPONS_RETRY_BASE_SECONDS": "0.5",
    # A read-back that fails (the API down, an unreadable page) spends an attempt, and the
    # entity is dead as unknown_outcome once they are spent and it is older than the settle
    # window plus this cap (13 s), by design (fail closed). That floor must span the run's
    # outages (an API down 6 s, RabbitMQ and PostgreSQL restarts, all slower on a loaded
    # machine): with a 4 s cap and no floor, eight attempts took about 12 s, and one unlucky
    # entity died during an outage with its coupon issued.
    "COUPONS_RETRY_MAX_SECONDS": "8",
    "COUPONS_RECONCILE_DELAY_SECONDS": "0.5",
    "COUPONS_WORKER_CONCURRENCY": "2",
    # N workers on one host cannot share a metrics port; Flower is not started.
    "COUPONS_METRICS_PORT": "0",
    "COUPONS_TASK_EVENTS": "false",
    # INFO: the worker announces " ready." at INFO, and its logs are what a failure is read in.
    "COUPONS_LOG_LEVEL": "INFO",
}
WORKER_COMMAND: Final = ("worker",)
READY_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.5
PROGRESS_EVERY_S: Final = 10.0


class ChaosError(DemoError):
    """The run cannot go on (a service is missing, a process would not start)."""


@dataclass(frozen=True)
class Profile:
    """What a run publishes, and when each disruption strikes (seconds after publishing
    starts)."""

    events: int
    publish_s: float
    kill_at_s: float
    rabbit_at_s: float
    rabbit_down_s: float
    postgres_at_s: float
    api_at_s: float
    api_down_s: float
    drop_at_s: float
    late_original: bool
    settle_timeout_s: float


FULL: Final = Profile(events=3000, publish_s=100, kill_at_s=8, rabbit_at_s=20, rabbit_down_s=5,
                      postgres_at_s=40, api_at_s=55, api_down_s=20, drop_at_s=85,
                      late_original=True, settle_timeout_s=300)
SHORT: Final = Profile(events=300, publish_s=30, kill_at_s=3, rabbit_at_s=7, rabbit_down_s=2,
                       postgres_at_s=14, api_at_s=18, api_down_s=6, drop_at_s=27,
                       late_original=False, settle_timeout_s=120)


class Timeline:
    """``t+  12.3s  what happened``, printed as it happens, from any thread."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, text: str, style: str = "") -> None:
        line = f"t+{self.now():6.1f}s  {escape(text)}"
        with self._lock:
            self.console.print(f"[{style}]{line}[/]" if style else line)


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def first_line(text: str, chars: int = 140) -> str:
    """The first line of a message, cut to ``chars`` for the timeline."""
    line = (text.strip().splitlines() or ["?"])[0]
    return line if len(line) <= chars else line[: chars - 1] + "\u2026"
