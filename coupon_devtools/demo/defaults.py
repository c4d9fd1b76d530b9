"""The demo's names and defaults: its database and vhost, the scenario's series, the
workers' environment (short delays, so that faults settle in seconds), and its error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

Backend = Literal["auto", "local", "embedded"]
Via = Literal["bus", "task"]

DEMO_DATABASE: Final = "coupon_worker_demo"
DEMO_VHOST: Final = "coupon-worker-demo"
DEMO_QUEUE_PREFIX: Final = "demo"
LOCAL_POSTGRES_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_RABBIT: Final = ("127.0.0.1", 5672)
# THROWAWAY: the sandbox's own credentials, public in this repository; never a real API's.
SANDBOX_USER, SANDBOX_PASSWORD = "store.server", "server123"
STATE_FILE: Final = "demo-state.json"

SERIES_GOLD: Final = 544770
SERIES_DELIVERY: Final = 553379
SERIES_EXPIRED: Final = 700712
FIRST_CUSTOMER_ID: Final = 566_881_001

STALL_S: Final = 4.0
"""Longer than the worker's read timeout (below): the sandbox issues, the worker times out."""
DEMO_ENVIRONMENT: Final[Mapping[str, str]] = {
    "CAPILLARY_USERNAME": SANDBOX_USER,
    "CAPILLARY_PASSWORD": SANDBOX_PASSWORD,
    # Short delays so a few hundred events with faults settle in seconds, not minutes.
    "COUPONS_RETRY_BASE_SECONDS": "0.5",
    "COUPONS_RETRY_MAX_SECONDS": "3",
    "COUPONS_RECONCILE_DELAY_SECONDS": "0.5",
    "COUPONS_HTTP_TIMEOUT_SECONDS": "2",
    "COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS": "5",
    "COUPONS_LEASE_SECONDS": "15",
    # Above connect + read timeout, and above the stalls below: an unknown outcome whose
    # read-back finds nothing is sent again after seconds, not the production two minutes.
    "COUPONS_SETTLE_WINDOW_SECONDS": "6",
    # A stalled ledger must fail a statement inside the short lease's hard time limit (10 s).
    "COUPONS_DB_CONNECT_TIMEOUT_SECONDS": "2",
    "COUPONS_DB_STATEMENT_TIMEOUT_SECONDS": "3",
    "COUPONS_DB_LOCK_TIMEOUT_SECONDS": "1",
    "COUPONS_DB_KEEPALIVE_IDLE_SECONDS": "2",
    "COUPONS_DB_KEEPALIVE_INTERVAL_SECONDS": "1",
    "COUPONS_DB_KEEPALIVE_COUNT": "3",
    "COUPONS_SWEEP_INTERVAL_SECONDS": "0.25",
    "COUPONS_LOG_LEVEL": "WARNING",
    # A developer's .env must not change what the demo shows.
    "COUPONS_ENV_FILE": "",
    "PYTHONUNBUFFERED": "1",
}
CALL_LABELS: Final[Mapping[str, str]] = {"bulk": "bulk issue", "readback": "read-back",
                                         "token": "token"}
DEAD_REASONS: Final[Mapping[str, str]] = {
    "712": "series expired",
    "701": "customer not found",
    "707": "invalid series",
}

READY_TIMEOUT_S: Final = 60.0
MIGRATE_TIMEOUT_S: Final = 120.0
STOP_GRACE_S: Final = 10.0
POLL_INTERVAL_S: Final = 0.25
PROBE_TIMEOUT_S: Final = 3  # seconds to connect to a local PostgreSQL that may not be there
FILE_BROKER_COMFORT: Final = 500


class DemoError(Exception):
    """The demo cannot go on; the message says why and where to look."""


def first_line(exc: BaseException) -> str:
    """The first line of an error (a database driver's own when SQLAlchemy wraps one)."""
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]


def display(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
