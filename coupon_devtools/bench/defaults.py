"""The bench's names, defaults and targets, and its error."""

from __future__ import annotations

from typing import Final, Literal

Pool = Literal["prefork", "threads"]
Via = Literal["bus", "task"]
ScenarioName = Literal["quick", "overhead", "scale", "quota", "memory", "targets", "all",
                       "ledger-size"]

BENCH_DATABASE: Final = "coupon_worker_bench"
BENCH_VHOST: Final = "coupon-worker-bench"
LOCAL_POSTGRES_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
SANDBOX_USER: Final = "store.server"
SANDBOX_PASSWORD: Final = "server123"  # noqa: S105 - the sandbox's public demo credentials
SERIES: Final = (544770, 553379)

DEFAULT_EVENTS: Final = 2000
DEFAULT_LATENCY_MS: Final = 50.0
DEFAULT_CONCURRENCY: Final = 8
DEFAULT_POOL: Final[Pool] = "prefork"
DEFAULT_WORKDIR: Final = ".bench"

OVERHEAD_TARGET: Final = 0.9
SCALE_TARGET: Final = 0.8
SCALE_LATENCY_MS: Final = 100.0
SCALE_CONCURRENCIES: Final = (1, 2, 4, 8, 16)
SCALE_STEP_S: Final = 10.0
QUOTA_LIMIT_PER_MINUTE: Final = 1200
QUOTA_WORKERS: Final = 3
QUOTA_TARGET: Final = 0.95
QUOTA_DURATION_S: Final = 90.0
QUOTA_WINDOW_S: Final = 60.0
MEMORY_BACKLOGS: Final = (10_000, 100_000)
MEMORY_RETRIES: Final = 100_000
MEMORY_SAMPLE_S: Final = 30.0
CEILING_CLIENTS: Final = 64
CEILING_DURATION_S: Final = 3.0
ROUND_TRIP_EVENTS: Final = 50
STAGES: Final = ("publish to intake", "intake and claim", "API call",
                  "answer to outcome recorded")
"""Where our events' time goes: broker, bridge and pool dispatch up to the task's intake; the
ingest and claim transaction (and the rate limiter); the HTTP call; reading the answer up to
the timestamp of the transaction that records it."""
PACED_LOAD: Final = 0.5
# Rounds of the overhead comparison (each side's backlog once a round, in alternating order):
# one round's ratio moves by a few hundredths with the machine's speed that minute.
OVERHEAD_ROUNDS: Final = 3
"""The paced latency batch is published at this share of the baseline's throughput."""

READY_TIMEOUT_S: Final = 90.0
STALL_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1
STOP_TIMEOUT_S: Final = 20.0
CONSOLE_WIDTH: Final = 120
"""Tables printed to a file or a pipe are this wide, so they can be quoted as they are."""


class BenchError(Exception):
    """The bench cannot go on; the message says why and where to look."""


def say_nothing(_message: str) -> None:
    return None
