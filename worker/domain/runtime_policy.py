"""The runtime's own decisions, returned as values that the tasks and the bootsteps carry out.

How a message goes back when nothing could be recorded (``requeue``), what becomes of a message
that keeps failing for a reason not its own (``after_failed_delivery``), when consumers pause
(``ConsumptionPause``), how long the task queue may grow before the bridge holds bus messages
(``bridge_high_water``), and how a publish is retried (``PUBLISH_RETRY_POLICY``). The entity's
own retry, backoff and dead-letter decisions are ``worker.domain.policy``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from worker.domain.errors import BrokerUnavailable, CapillaryError, LedgerError
from worker.domain.model import DeadMessageKind

#: How long a task waits before putting back a message it could not record anything about
#: because the ledger is down or stalled: it slows the redelivery loop for the seconds the
#: sweeper needs to notice and pause consumers.
LEDGER_DOWN_PAUSE_S = 1.0


@dataclass(frozen=True)
class Requeue:
    """Put the message back on its queue after ``pause_s``: nothing about it is recorded."""

    pause_s: float


def requeue(*, ledger_down: bool) -> Requeue:
    """How a task gives its message back when no outcome could be committed.

    A ledger that is down or stalled: after ``LEDGER_DOWN_PAUSE_S``. Out of time (the soft
    limit): at once; claims taken make the redelivery a no-op until their lease runs out.
    """
    return Requeue(LEDGER_DOWN_PAUSE_S if ledger_down else 0.0)


#: The error code an entity waits under while the circuit is open (cleared when an operator
#: closes it by hand: ``worker.usecases.circuit_control``).
CIRCUIT_OPEN_CODE = "circuit_open"


#: A message that fails for a reason not its own waits this long before going back, doubling
#: with each failure up to the cap: a bug or a refusing dependency is not hammered, and the
#: pool process it holds is back to work within seconds.
FAILED_DELIVERY_PAUSE_BASE_S = 0.5
FAILED_DELIVERY_PAUSE_MAX_S = 8.0
#: A message's count of failed deliveries is forgotten once it has not failed for a day. A
#: count is dropped when its message becomes a dead letter, but a message that went through
#: on a later delivery left its row for ever, and a failure of the same event id a month
#: later (a replay) would still have counted toward the limit.
FAILURE_COUNT_FORGOTTEN_AFTER_S = 86_400.0


@dataclass(frozen=True)
class KeepAsDeadLetter:
    """Stop redelivering the message: keep it, as received, as a dead letter of ``kind``."""

    kind: DeadMessageKind


def failure_kind(error: BaseException) -> DeadMessageKind:
    """Whose fault a failure is, when it is not the message's own bytes (``EventRejected``).

    A dependency that answered with an error (the database refusing a statement, Capillary or
    the broker failing in a way their adapters did not expect) is ``INFRASTRUCTURE``; anything
    else is a bug of ours, ``INTERNAL_ERROR``. Neither ever makes the message a rejection.
    """
    if isinstance(error, LedgerError | CapillaryError | BrokerUnavailable):
        return DeadMessageKind.INFRASTRUCTURE
    return DeadMessageKind.INTERNAL_ERROR


def after_failed_delivery(failures: int, error: BaseException, *,
                          limit: int) -> Requeue | KeepAsDeadLetter:
    """What to do with a message whose ``failures``-th delivery failed for a reason not its
    own: put it back after a growing pause, or, at ``limit``, keep it as a dead letter."""
    if failures >= limit:
        return KeepAsDeadLetter(failure_kind(error))
    pause_s = FAILED_DELIVERY_PAUSE_BASE_S * 2 ** max(failures - 1, 0)
    return Requeue(min(pause_s, FAILED_DELIVERY_PAUSE_MAX_S))


QueueRole = Literal["tasks", "retry"]


@dataclass(frozen=True)
class ConsumptionPause:
    """Which queues a worker should stop consuming now, and why (``reason`` None: consume).

    Messages stay in RabbitMQ meanwhile. The bus (``coupons.events``) is never paused: the
    bridge only forwards, and its back-pressure holds what the task queue cannot take.
    """

    reason: str | None = None
    roles: frozenset[QueueRole] = frozenset()

    @property
    def paused(self) -> bool:
        return bool(self.roles)


CONSUME = ConsumptionPause()


def consumption_for_circuit(*, circuit_state: str, reason: str | None,
                            open_until: datetime | None, now: datetime) -> ConsumptionPause:
    """While the circuit's pause lasts, fresh events wait in RabbitMQ.

    Retries keep being consumed: the sweeper dispatches none while the circuit is open but the
    probe, and the probe must run.
    """
    if circuit_state != "closed" and open_until is not None and now < open_until:
        return ConsumptionPause(f"circuit {circuit_state}: {reason}", frozenset({"tasks"}))
    return CONSUME


def consumption_for_ledger_down(error: str) -> ConsumptionPause:
    """The database is down: nothing can be claimed or recorded, so no queue is consumed."""
    return ConsumptionPause(f"database unavailable: {error}", frozenset({"tasks", "retry"}))


#: Tasks allowed to wait per pool slot before the bridge stops forwarding bus messages.
BACKLOG_PER_SLOT = 16
BACKLOG_MIN = 32


def bridge_high_water(pool_processes: int | None) -> int:
    """How many task messages may wait before the bridge holds bus messages instead.

    Forwarding is cheap and the pool is not: without a mark, a bus backlog is copied into the
    task queue as fast as the main loop can publish, and that loop also feeds the pool.
    """
    return max(BACKLOG_PER_SLOT * (pool_processes or 1), BACKLOG_MIN)


def bridge_room(high_water: int, waiting: int) -> int:
    """How many bus messages the bridge may forward with ``waiting`` task messages queued."""
    return max(high_water - waiting, 0)


#: kombu's retry of one publish on a broker error, for every publish of ours and for Celery's
#: ``task_publish_retry_policy``: about 5 s in all, then ``BrokerUnavailable``.
PUBLISH_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}
