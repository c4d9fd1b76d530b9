"""The Prometheus endpoint (worker step) and the directory every process writes samples to."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from celery import bootsteps

from worker.broker.context import container_of, step_settings
from worker.metrics import exposition_registry, serve_metrics
from worker.views import entity_state_counts

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

        def backlog() -> dict[str, int]:
            return entity_state_counts(container.engine)

        registry = exposition_registry(container.metrics.registry, backlog)
        try:
            self._server = serve_metrics(settings.metrics_port, registry)
        except OSError as exc:
            log.error("metrics.unavailable", extra={"port": settings.metrics_port,
                                                    "error": str(exc)})
            return
        log.info("metrics.serving", extra={"port": settings.metrics_port})

    def stop(self, parent: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


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
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
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
