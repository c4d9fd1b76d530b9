"""The bare Celery app ``coupon-worker bench`` measures our pipeline against.

One task, ``bench.baseline_issue(event)``: POST the event's customer, series and metadata to
Capillary's bulk-issue endpoint with ``requests`` and return the HTTP status. No ledger, no
idempotency, no claim, no retry, no rate limit, no circuit breaker: the least work that can
turn a broker message into a bulk-issue call, so the ratio "ours / baseline" prices everything
the exactly-once pipeline adds.

It keeps the broker settings that cost time in the real worker too, so the comparison is about
the pipeline and not about Celery tuning: late acknowledgement, the worker's prefetch (two
messages per pool process), JSON, a queue of its own (``BENCH_BASELINE_QUEUE``) on the same
broker, the same HTTP timeouts and one pooled ``requests`` session per process (per thread under
``threads``).

Run it as ``python -m celery -A coupon_devtools.bench.baseline worker -Q bench.baseline ...``;
the settings are read from the environment when Celery first configures the app, never at import:

- ``COUPONS_BROKER_URL``: the broker (default: local RabbitMQ, vhost ``/``);
- ``CAPILLARY_BASE_URL``, ``CAPILLARY_USERNAME``, ``CAPILLARY_PASSWORD``: the (sandbox) API;
- ``COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS``, ``COUPONS_HTTP_TIMEOUT_SECONDS``,
  ``COUPONS_PREFETCH_MULTIPLIER``: as the worker's;
- ``BENCH_BASELINE_QUEUE``: the queue to consume (default ``bench.baseline``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, Final

import requests
from celery import Celery
from kombu import Exchange, Queue
from pydantic import SecretStr

from worker.adapters.capillary.auth import basic_auth_header
from worker.config import (
    DEFAULT_BROKER_URL,
    DEFAULT_CAPILLARY_BASE_URL,
    DEFAULT_PREFETCH_MULTIPLIER,
)

BASELINE_QUEUE: Final = "bench.baseline"
TASK_BASELINE_ISSUE: Final = "bench.baseline_issue"
BULK_ISSUE_PATH: Final = "/v2/coupon/bulk/issue"
DEFAULT_CONNECT_TIMEOUT_S: Final = 3.05
DEFAULT_READ_TIMEOUT_S: Final = 10.0


def baseline_queue(name: str = BASELINE_QUEUE) -> Queue:
    """The baseline's durable queue (declared the same way by the bench and the worker)."""
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True)


def baseline_config(env: Mapping[str, str]) -> dict[str, Any]:
    """Celery settings for the baseline, from environment-style variables."""
    queue = baseline_queue(env.get("BENCH_BASELINE_QUEUE") or BASELINE_QUEUE)
    return {
        "broker_url": env.get("COUPONS_BROKER_URL") or DEFAULT_BROKER_URL,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_queues": [queue],
        "task_default_queue": queue.name,
        "task_default_exchange": queue.exchange.name,
        "task_default_routing_key": queue.routing_key,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": int(env.get("COUPONS_PREFETCH_MULTIPLIER")
                                          or DEFAULT_PREFETCH_MULTIPLIER),
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "worker_disable_rate_limits": True,
        "baseline_base_url": (env.get("CAPILLARY_BASE_URL") or DEFAULT_CAPILLARY_BASE_URL
                              ).rstrip("/"),
        "baseline_authorization": basic_auth_header(
            env.get("CAPILLARY_USERNAME") or "", SecretStr(env.get("CAPILLARY_PASSWORD") or "")),
        "baseline_timeout_s": (
            float(env.get("COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS") or DEFAULT_CONNECT_TIMEOUT_S),
            float(env.get("COUPONS_HTTP_TIMEOUT_SECONDS") or DEFAULT_READ_TIMEOUT_S),
        ),
    }


def bulk_issue_body(event: Mapping[str, Any]) -> dict[str, Any]:
    """The bulk-issue request body for an event, as our Capillary client builds it."""
    return {"seriesIds": list(event["seriesIds"]), "customer": dict(event["customer"]),
            "metadata": dict(event.get("metadata") or {})}


def create_app(env: Mapping[str, str] | None = None) -> Celery:
    """The baseline app; ``env`` defaults to the process environment, read at configure time."""
    app = Celery("coupon-bench-baseline", set_as_current=False)

    def configure(sender: Celery | None = None, **_: object) -> None:
        app.conf.update(baseline_config(env if env is not None else os.environ))

    app.on_configure.connect(configure, weak=False)
    local = threading.local()

    def session() -> requests.Session:
        # One session per process and thread, created after the pool forked.
        current: tuple[int, requests.Session] | None = getattr(local, "session", None)
        if current is None or current[0] != os.getpid():
            current = (os.getpid(), requests.Session())
            local.session = current
        return current[1]

    @app.task(name=TASK_BASELINE_ISSUE, ignore_result=True)
    def baseline_issue(event: dict[str, Any]) -> int:
        """POST one event's bulk-issue request; the status is all it looks at."""
        conf = app.conf
        response = session().post(
            conf["baseline_base_url"] + BULK_ISSUE_PATH, json=bulk_issue_body(event),
            headers={"Authorization": conf["baseline_authorization"]},
            timeout=conf["baseline_timeout_s"],
        )
        return response.status_code

    return app


app = create_app()
