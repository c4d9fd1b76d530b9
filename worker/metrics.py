"""Prometheus metrics of the pipeline.

``prometheus_client`` is imported only when ``Metrics()`` is built (in the bootstrap, never at
import): its multiprocess mode is fixed when the library is first imported, and the worker sets
``PROMETHEUS_MULTIPROC_DIR`` just before its pool forks. Under the prefork pool every child
writes its samples there and the main process serves them all; the ledger backlog gauges are
read from PostgreSQL at scrape time, so they are the fleet's truth, not one process's view.

Gauges that pool processes set carry a ``multiprocess_mode`` that says how the main process
merges them: a timestamp is the most recent one any process wrote. What on-call alerts on from
the ledger and the broker (``worker.scrape``) is read at scrape time too. The reference of
every series is docs/observability.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The counters and histograms the services update."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.coupons_issued = Counter(
            "coupons_issued", "Coupons recorded as issued", ["via"], registry=r)
        self.entities_failed = Counter(
            "coupon_entities_failed", "Entity attempts that did not issue, by classification",
            ["classification"], registry=r)
        self.retries_scheduled = Counter(
            "coupon_retries_scheduled", "Entities scheduled for another attempt", registry=r)
        self.dead_letters = Counter(
            "coupon_dead_letters", "Entities moved to the dead letters", ["error_code"],
            registry=r)
        self.duplicates_issued = Counter(
            "coupon_duplicates_issued",
            "Entities found holding two of our coupons (a late original landed)", registry=r)
        self.replays = Counter(
            "coupon_operator_actions", "Entities replayed or discarded by an operator",
            ["action"], registry=r)
        self.events_received = Counter(
            "coupon_events_received", "Events taken in: new, duplicate or rejected",
            ["outcome"], registry=r)
        self.bridge_forward_failures = Counter(
            "coupon_bridge_forward_failures",
            "Bus messages the bridge could not forward (the broker refused or was gone); held "
            "and tried again", registry=r)
        self.ledger_pruned = Counter(
            "coupon_ledger_pruned_rows", "Ledger rows removed by retention, by table",
            ["table"], registry=r)
        self.answer_remarks = Counter(
            "capillary_answer_remarks",
            "Bulk-issue answers that broke an assumption about Capillary, per series: counts "
            "disagreeing with the entries, missing, empty or conflicting entries, entries in "
            "an error status, warnings; and read-backs after 'already holds one'",
            ["kind"], registry=r)
        self.api_latency = Histogram(
            "capillary_call_seconds", "Capillary call latency", ["operation", "status"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.read_backs = Counter(
            "capillary_read_backs",
            "Read-backs of a customer's coupons, by why they were made (reconcile an unknown "
            "outcome, a 'holds one' refusal, verify a re-send) and what they found",
            ["purpose", "outcome"], registry=r)
        self.last_success = Gauge(
            "capillary_last_success_timestamp_seconds",
            "When Capillary last answered a call with a 2xx (Unix time), by operation",
            ["operation"], multiprocess_mode="mostrecent", registry=r)
        self.last_task = Gauge(
            "coupon_worker_last_task_finished_timestamp_seconds",
            "When a task last finished on this worker (Unix time), whatever its outcome",
            ["worker"], multiprocess_mode="mostrecent", registry=r)

    def observe_call(self, operation: str, status: int | None, latency_ms: float) -> None:
        self.api_latency.labels(operation, str(status) if status else "none").observe(
            latency_ms / 1000.0)
        if status is not None and 200 <= status < 300:
            self.last_success.labels(operation).set(time.time())

    def read_back(self, purpose: str, outcome: str) -> None:
        """Count one read-back: ``purpose`` reconcile, holds_one or verify; ``outcome`` ours,
        duplicate, absent (proven not issued), settling (not visible yet), not_ours or
        failed."""
        self.read_backs.labels(purpose, outcome).inc()

    def task_finished(self, worker: str) -> None:
        """A task just finished on ``worker`` (its Celery node name)."""
        self.last_task.labels(worker).set(time.time())


BacklogReader = Callable[[], dict[str, int]]


def _backlog_collector(read_counts: BacklogReader) -> Any:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class BacklogCollector(Collector):
        """Ledger backlog (entities per state) read from PostgreSQL when Prometheus scrapes."""

        def collect(self) -> Iterator[Any]:
            gauge = GaugeMetricFamily(
                "coupon_ledger_entities", "Entities in the ledger by state", labels=["state"])
            try:
                counts = read_counts()
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database blinked
                counts = {}
            for state, count in sorted(counts.items()):
                gauge.add_metric([state], count)
            yield gauge

    return BacklogCollector()


def _build_info_collector(labels: dict[str, str]) -> Any:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class BuildInfoCollector(Collector):
        """Always 1: which release runs, on which schema (count workers by version)."""

        def collect(self) -> Iterator[Any]:
            gauge = GaugeMetricFamily(
                "coupon_worker_build_info",
                "The worker's version, its schema revision and the ledger's at start-up",
                labels=sorted(labels))
            gauge.add_metric([labels[name] for name in sorted(labels)], 1)
            yield gauge

    return BuildInfoCollector()


def exposition_registry(own: CollectorRegistry, backlog: BacklogReader | None,
                        build: dict[str, str] | None = None,
                        scraped: Sequence[Any] = ()) -> CollectorRegistry:
    """The registry to serve: every process's samples (multiprocess mode) or this one's, and
    the collectors read at scrape time (``scraped``, from ``worker.scrape``)."""
    from prometheus_client import CollectorRegistry

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = own
    # Collected in this order: the scraped ledger reads (with their short timeout) before the
    # backlog's count, which then fails at once if they found the ledger gone.
    for collector in scraped:
        registry.register(collector)
    if backlog is not None:
        registry.register(_backlog_collector(backlog))
    if build is not None:
        registry.register(_build_info_collector(build))
    return registry


#: Ports a worker tries, from COUPONS_METRICS_PORT up: a second worker started on the same
#: host with the same settings serves on the next one instead of going without metrics.
METRICS_PORT_SPAN = 16


def stop_metrics(server: Any) -> None:
    """Stop the /metrics endpoint ``serve_metrics`` started and free its port: ``shutdown``
    only ends the serving loop, the listening socket stays bound until ``server_close``."""
    server.shutdown()
    server.server_close()


def serve_metrics(first_port: int, registry: CollectorRegistry,
                  span: int = METRICS_PORT_SPAN) -> tuple[Any, int]:
    """Start the /metrics HTTP endpoint in a daemon thread on the first free port of
    ``first_port`` .. ``first_port + span - 1``; returns the server and its port. Raises the
    last ``OSError`` when every port is taken."""
    from prometheus_client import start_http_server

    error: OSError | None = None
    for port in range(first_port, min(first_port + span, 65536)):
        try:
            server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)  # noqa: S104 - scraped from outside the host
        except OSError as exc:
            error = exc
            continue
        return server, port
    assert error is not None
    raise error
