"""What the metrics endpoint reads when Prometheus scrapes: the series on-call alerts on.

Each collector is handed a reader (a function of the composition, so this module does no I/O
of its own) and turns one reading into gauges:

- ``ledger_collector``: whether the ledger answered (``coupon_ledger_up``), the circuit's
  state and time in it, the age of the oldest waiting retry, unknown outcome and dead letter,
  the rate limit's buckets, and the configured quota and settle window beside them, so an
  alert compares like with like.
- ``consumers_collector``: which of this worker's queue consumers are paused (the main
  process's own state, which the guard keeps).
- ``queues_collector``: messages waiting per queue, as RabbitMQ counts them.

Values read from PostgreSQL or RabbitMQ at scrape time are the same whichever worker is
scraped, and are naturally safe under prefork: only the main process serves them. A reader
that fails leaves its gauges out of this scrape (and says so in its ``_up`` gauge) instead of
failing the scrape: the other series still tell on-call what they can.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from worker.adapters.postgres.ratelimit import BucketSpec
    from worker.adapters.postgres.vitals import LedgerVitals

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The circuit's states, each a series of ``coupon_circuit_state`` (1 for the current one).
CIRCUIT_STATES = ("closed", "open", "half_open")
#: The circuit a ledger without a row for it holds: closed, as the workers read it.
CAPILLARY_CIRCUIT = "capillary"


@dataclass(frozen=True)
class Configured:
    """Settings exported beside the readings: what the alerts compare the readings with."""

    settle_window_s: float
    #: The rate limit, when one is configured (None: only a 429's Retry-After holds calls).
    rate_limit: BucketSpec | None = None
    rate_limit_per_minute: int | None = None


class LedgerReads:
    """The ledger reads of a scrape, failing together: once one fails, those of the next
    ``hold_s`` fail at once instead of each waiting out its own connect timeout.

    Against a database that drops packets, every read would wait the full connect timeout, and
    two of them would outlast Prometheus's scrape timeout: the scrape would fail and read as a
    worker gone, when the worker is there to say that the ledger is not.
    """

    def __init__(self, hold_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold_s = hold_s
        self._clock = clock
        self._failed_until = float("-inf")
        self._error: Exception | None = None

    def run(self, read: Callable[[], T]) -> T:
        """``read()``, unless a read failed less than ``hold_s`` ago: then that read's error."""
        if self._clock() < self._failed_until and self._error is not None:
            raise self._error
        try:
            return read()
        except Exception as exc:
            self._error = exc
            self._failed_until = self._clock() + self._hold_s
            raise


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, labels=labels)


def _collector(collect: Callable[[], Iterator[Any]]) -> Any:
    from prometheus_client.registry import Collector

    class ScrapeCollector(Collector):
        def collect(self) -> Iterator[Any]:
            return collect()

    return ScrapeCollector()


def ledger_collector(read: Callable[[], LedgerVitals], configured: Configured) -> Any:
    """The ledger's vitals, read once per scrape (``worker.adapters.postgres.vitals``)."""

    def collect() -> Iterator[Any]:
        up = _gauge("coupon_ledger_up",
                    "1 when the ledger answered this scrape's reads, 0 when it did not")
        window = _gauge("coupon_settle_window_seconds",
                        "The configured settle window (COUPONS_SETTLE_WINDOW_SECONDS)")
        window.add_metric([], configured.settle_window_s)
        yield window
        if configured.rate_limit_per_minute is not None:
            quota = _gauge("capillary_rate_limit_calls_per_minute",
                           "The configured Capillary quota per bucket "
                           "(COUPONS_RATE_LIMIT_PER_MINUTE)")
            quota.add_metric([], configured.rate_limit_per_minute)
            yield quota
        try:
            vitals = read()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the ledger did
            log.warning("metrics.ledger_unreadable", extra={"error": str(exc)})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _circuit_gauges(vitals)
        yield from _age_gauges(vitals, configured)
        yield from _bucket_gauges(vitals, configured)

    return _collector(collect)


def _circuit_gauges(vitals: LedgerVitals) -> Iterator[Any]:
    state = _gauge("coupon_circuit_state",
                   "The fleet's circuit breaker: 1 for its current state, 0 for the others "
                   "(open or half_open: nobody calls Capillary but a probe)",
                   ["circuit", "state"])
    in_state = _gauge("coupon_circuit_in_state_seconds",
                      "Seconds since the circuit last opened or closed (a probe's half-open "
                      "counts as open)", ["circuit"])
    circuits = {c.name: c for c in vitals.circuits}
    for name in sorted({CAPILLARY_CIRCUIT, *circuits}):
        found = circuits.get(name)
        current = found.state if found is not None else "closed"
        for each in CIRCUIT_STATES:
            state.add_metric([name, each], 1 if each == current else 0)
        if found is not None:
            in_state.add_metric([name], found.in_state_s)
    yield state
    yield in_state


def _age_gauges(vitals: LedgerVitals, configured: Configured) -> Iterator[Any]:
    retry = _gauge("coupon_retry_oldest_age_seconds",
                   "Seconds since the first attempt of the oldest entity waiting for a retry "
                   "(retry_wait or queued); 0 when none waits")
    retry.add_metric([], max(vitals.oldest_retry_s or 0.0, 0.0))
    unknown = _gauge("coupon_unknown_outcome_oldest_age_seconds",
                     "Seconds since the oldest unreconciled unknown outcome's call (its settle "
                     "time minus the settle window); 0 when none")
    past = vitals.oldest_unknown_past_settle_s
    unknown.add_metric([], 0.0 if past is None else max(past + configured.settle_window_s, 0.0))
    dead = _gauge("coupon_dead_letter_oldest_age_seconds",
                  "Seconds since the oldest entity still dead-lettered died; 0 when none")
    dead.add_metric([], max(vitals.oldest_dead_s or 0.0, 0.0))
    yield retry
    yield unknown
    yield dead


def _bucket_gauges(vitals: LedgerVitals, configured: Configured) -> Iterator[Any]:
    blocked = _gauge("capillary_rate_limit_blocked_seconds",
                     "Seconds a 429's Retry-After still holds every call of this bucket back",
                     ["bucket"])
    tokens = _gauge("capillary_rate_limit_tokens",
                    "Calls the bucket lets through at once now; below 0, callers already wait "
                    "in line (only with a configured rate limit)", ["bucket"])
    for bucket in vitals.buckets:
        blocked.add_metric([bucket.name], bucket.blocked_s)
        if configured.rate_limit is not None:
            tokens.add_metric([bucket.name], configured.rate_limit.available(
                bucket.tokens, bucket.since_refill_s))
    yield blocked
    if configured.rate_limit is not None:
        yield tokens


def consumers_collector(paused: Callable[[], Mapping[str, bool]]) -> Any:
    """``coupon_consumers_paused{queue}``: 1 while this worker does not consume ``queue``."""

    def collect() -> Iterator[Any]:
        gauge = _gauge("coupon_consumers_paused",
                       "1 while this worker has paused its consumer of the queue (circuit "
                       "open, ledger unreachable), 0 while it consumes", ["queue"])
        for queue, is_paused in sorted(paused().items()):
            gauge.add_metric([queue], 1 if is_paused else 0)
        yield gauge

    return _collector(collect)


def queues_collector(read: Callable[[], Mapping[str, tuple[str, int | None]]]) -> Any:
    """``coupon_queue_messages_ready{role,queue}``, from ``role -> (queue, ready or None)``."""

    def collect() -> Iterator[Any]:
        up = _gauge("coupon_broker_up",
                    "1 when RabbitMQ answered this scrape's queue counts, 0 when it did not")
        ready = _gauge("coupon_queue_messages_ready",
                       "Messages waiting in the queue, ready for a consumer (RabbitMQ's count)",
                       ["role", "queue"])
        try:
            counts = read()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the broker did
            log.warning("metrics.broker_unreadable", extra={"error": str(exc)})
            counts = {}
        for role, (queue, waiting) in sorted(counts.items()):
            if waiting is not None:
                ready.add_metric([role, queue], waiting)
        up.add_metric([], 1 if any(w is not None for _q, w in counts.values()) else 0)
        yield up
        yield ready

    return _collector(collect)
