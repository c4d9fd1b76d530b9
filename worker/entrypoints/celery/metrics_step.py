"""What a worker tells about itself: the Prometheus endpoint (worker step), the directory every
process writes samples to, and its build (version and schema: checked and logged at start-up,
the ``coupon_worker_build_info`` metric, and the ``coupon_worker`` entry of the worker's stats,
which Flower shows in the worker's "Other" tab and ``celery inspect stats`` prints).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from worker import __version__
from worker.adapters.postgres.driver import PoolerMismatch
from worker.adapters.postgres.migrate import schema_status, shipped_revisions
from worker.adapters.postgres.ratelimit import BucketSpec, PostgresRateLimiter
from worker.adapters.postgres.schema import SchemaStatus
from worker.bootstrap import Container
from worker.config import Settings
from worker.domain.errors import LedgerUnavailable
from worker.entrypoints.celery.context import container_of, links_of, pool_name, step_settings
from worker.metrics import METRICS_PORT_SPAN, exposition_registry, serve_metrics, stop_metrics

if TYPE_CHECKING:
    from worker.adapters.postgres.vitals import LedgerVitals
    from worker.scrape import LedgerReads

log = logging.getLogger(__name__)


class MetricsServer(bootsteps.StartStopStep):
    """Serves Prometheus metrics from the worker's main process."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._worker = parent
        self._server: Any = None

    def start(self, parent: Any) -> None:
        settings = step_settings(parent)
        if not settings.metrics_port:
            return
        container = container_of(parent.app)
        # Imported here, after the prefork pool forked: only this process serves metrics.
        from worker.scrape import LedgerReads
        from worker.usecases.queries import entity_state_counts

        reads = LedgerReads()

        def backlog() -> dict[str, int]:
            return reads.run(lambda: entity_state_counts(container.engine))

        registry = exposition_registry(container.metrics.registry, backlog,
                                       build_labels(links_of(parent.app).schema),
                                       scraped_collectors(container, settings, reads))
        try:
            self._server, port = serve_metrics(settings.metrics_port, registry)
        except OSError as exc:
            log.error("metrics.unavailable", extra={
                "ports": f"{settings.metrics_port}-{settings.metrics_port + METRICS_PORT_SPAN - 1}",
                "error": str(exc)})
            return
        links_of(parent.app).metrics_port = port
        log.info("metrics.serving", extra={"port": port, "configured": settings.metrics_port})

    def stop(self, parent: Any) -> None:
        if self._server is not None:
            stop_metrics(self._server)
            self._server = None


def scraped_collectors(container: Container, settings: Settings,
                       reads: LedgerReads) -> list[Any]:
    """What on-call alerts on, read at each scrape: the ledger's vitals, this worker's paused
    consumers, and the queues' backlogs (``worker.scrape``). The ledger's reads go through
    ``reads``, shared with the backlog's, so that an unreachable ledger costs one timeout."""
    from worker.adapters.postgres.vitals import read_vitals
    from worker.adapters.rabbitmq.backlog import QueueBacklogs, queue_names
    from worker.scrape import Configured, consumers_collector, ledger_collector, queues_collector

    links = container.links
    limiter = container.deps().limiter
    spec: BucketSpec | None = limiter.spec if isinstance(limiter, PostgresRateLimiter) else None
    configured = Configured(settle_window_s=settings.settle_window_s, rate_limit=spec,
                            rate_limit_per_minute=settings.rate_limit_per_minute)
    # Fresh events come by the task queue and, read directly, by the bus (as the guard says).
    consumed = [settings.tasks_queue, settings.retry_queue]
    if settings.bus_intake == "direct":
        consumed.insert(0, settings.events_queue)
    names = queue_names(settings)
    depths = QueueBacklogs(settings)

    def vitals() -> LedgerVitals:
        return reads.run(lambda: read_vitals(container.engine))

    def paused() -> dict[str, bool]:
        return {queue: queue in links.paused_queues for queue in consumed}

    def backlogs() -> dict[str, tuple[str, int | None]]:
        return {role: (names[role], count) for role, count in depths.read().items()}

    return [ledger_collector(vitals, configured), consumers_collector(paused),
            queues_collector(backlogs)]


def task_finished(sender: Any = None, **_: Any) -> None:
    """``task_postrun``, in the pool process that ran the task: stamp its worker's last task."""
    hostname = getattr(getattr(sender, "request", None), "hostname", None)
    container_of(sender.app).metrics.task_finished(str(hostname or "unknown"))


def build_labels(status: SchemaStatus | None) -> dict[str, str]:
    """This worker's version, the schema revision it is built for, and the ledger's."""
    head = status.head if status else (shipped_revisions().get_current_head() or "none")
    ledger = (status.ledger or "none") if status else "unknown"
    return {"version": __version__, "schema": head, "ledger_schema": ledger}


def check_schema(sender: Any = None, **_: Any) -> None:
    """At start-up: refuse a ledger schema this release cannot run on, log what runs.

    Older than this release: run ``coupon-worker migrate`` first. Newer: accepted when the
    migrations that made it recorded that this release's code still runs on it
    (``worker.adapters.postgres.schema``). An unreachable ledger is not refused here: the worker
    starts and waits for it like for any outage.
    """
    app = sender.app
    settings = step_settings(sender)
    try:
        status: SchemaStatus | None = schema_status(settings.ledger_url(),
                                                    connect_timeout_s=settings.db_connect_timeout_s,
                                                    pooler=settings.db_pooler)
    except LedgerUnavailable as exc:
        if isinstance(exc, PoolerMismatch):
            # Not an outage: every connection would be refused the same way.
            log.critical("worker.pooler_mismatch", extra={"error": str(exc)})
            raise SystemExit(f"coupon-worker {__version__} refuses to start: {exc}") from exc
        status = None
        log.warning("worker.schema_unchecked", extra={"error": str(exc)})
    labels = build_labels(status)
    if status is not None and not status.runnable:
        log.critical("worker.schema_refused", extra={**labels, "verdict": str(status.verdict),
                                                     "reason": status.explain()})
        raise SystemExit(f"coupon-worker {__version__} refuses to start: {status.explain()}")
    links_of(app).schema = status
    log.info("worker.starting", extra={**labels, "verdict": str(status.verdict) if status
                                       else "unknown"})


class BuildInfo(bootsteps.StartStopStep):
    """Adds the worker's build and metrics port to its stats: Flower shows them, ``celery
    inspect stats`` too.

    A start/stop step with nothing to start: only those are asked for ``info``.
    """

    # celery-types says None; Blueprint.info merges what a step returns into the stats.
    def info(self, parent: Any) -> dict[str, Any]:  # type: ignore[override]
        links = links_of(parent.app)
        return {"coupon_worker": {**build_labels(links.schema),
                                  "metrics_port": links.metrics_port}}


_MULTIPROC_OWNED: list[str] = []


def prepare_metrics_dir() -> None:
    """Give every process of this worker one directory for its metric samples.

    Must run before ``prometheus_client`` is first imported (it picks its storage then), which
    is why ``coupon-worker worker`` calls it before Celery's command line loads its plugins.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="coupon-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _MULTIPROC_OWNED.append(path)



def _check_metrics_dir(sender: Any = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or pool_name(sender) == "threads":
        # Threads: one process counts every task, in its own registry.
        return
    if "prometheus_client" not in sys.modules:
        prepare_metrics_dir()
        return
    # Celery's own command line imports Flower's plugin, and with it prometheus_client.
    log.warning("metrics.single_process",
                extra={"hint": "pool processes' metrics are not served: start with "
                               "`coupon-worker worker` or set PROMETHEUS_MULTIPROC_DIR"})


def _remove_metrics_dir(**_: Any) -> None:
    for path in _MULTIPROC_OWNED:
        shutil.rmtree(path, ignore_errors=True)
    _MULTIPROC_OWNED.clear()
