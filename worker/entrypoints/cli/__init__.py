"""The ``coupon-worker`` command line.

    coupon-worker migrate                 create the database if needed, upgrade to head
    coupon-worker worker                  run a Celery worker (tasks, bus intake, sweeper, metrics)
    coupon-worker publish FILE|-          publish one event or a JSON-lines file of events
    coupon-worker events show EVENT_ID    an event's entities, attempts, errors and coupons
    coupon-worker events replay EVENT_ID  re-run what an event has not issued yet
    coupon-worker dlq list|summary|show|replay|discard   dead letters, for support engineers
    coupon-worker health                  whether this host's workers are consuming
    coupon-worker broker setup|parked|move-back   the quorum queues' policy, what RabbitMQ parked
    coupon-worker rejected list|show|resubmit   rejected messages: inspect, fix and resubmit
    coupon-worker flower                  Flower on the project's app
    coupon-worker console                 the support console in the browser
    coupon-worker console sessions list|revoke USER   its logged-in sessions (revoke: audited)
    coupon-worker duplicates              entities holding two of our coupons
    coupon-worker waiting list|retry-now|give-up   what waits for a retry or a read-back
    coupon-worker circuit status|open|close   the circuit breaker by hand (audited)
    coupon-worker prune --older-than 90d  prune settled events, age out the audit trail
    coupon-worker db roles                the ledger's PostgreSQL roles per job
    coupon-worker broker users            a RabbitMQ user per component (rabbitmqctl)
    coupon-worker doctor                  a deployment's settings against the capacity guide
    coupon-worker sandbox                 run the sandbox Capillary server      (dev tools)
    coupon-worker demo | bench | chaos    the demo, the benchmark, the chaos run (dev tools)

The dev-tool commands live in the ``coupon_devtools`` package (the ``devtools`` extra); the
runtime never imports it, and this command line finds those commands only when one is asked for.

Each command's module is imported when that command is asked for (``root.COMMAND_MODULES``), not
all of them at start-up: ``coupon-worker worker`` is the process every pool child is forked
from, and what it imports is resident in each of them (the other commands' modules and ``rich``
would be too).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from worker.entrypoints.cli.root import main

__all__ = ["main"]


def __getattr__(name: str) -> ModuleType:
    # ``cli.output``, ``cli.support``...: a command module, imported when first named.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
