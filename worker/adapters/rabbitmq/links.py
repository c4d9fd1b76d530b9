"""How the worker's steps find each other: one ``StepLinks`` per app, held by its container.

Celery builds each bootstep itself, from its parent (the worker or its consumer), so the steps
cannot be handed one another. Instead the sweeper writes its decision here, the bridge
registers itself here, and the guard reads both, from the app's container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.adapters.postgres.schema import SchemaStatus
from worker.domain.runtime_policy import CONSUME, ConsumptionPause


class Forwarder(Protocol):
    """What the guard needs of the bridge: its high-water mark, and releasing held messages."""

    high_water: int

    def release(self, room: int) -> None: ...


@dataclass
class StepLinks:
    """What one worker's steps share; read and written on the worker's main process only."""

    #: Written by the sweeper after each sweep; carried out by the guard.
    pause: ConsumptionPause = CONSUME
    #: The bus bridge, once its consumer step exists (None: this worker has none).
    bridge: Forwarder | None = None
    #: The ledger's schema as checked at start-up (None: the ledger could not be reached).
    schema: SchemaStatus | None = None
    #: The port /metrics is served on (None: off, or every port tried was taken).
    metrics_port: int | None = None
    #: The queues whose consumers the guard has cancelled (the metrics read them).
    paused_queues: frozenset[str] = frozenset()
