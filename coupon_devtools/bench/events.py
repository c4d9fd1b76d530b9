"""The events a run publishes, in batches, and the percentiles of their latencies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def customer_id(run_no: int, index: int) -> str:
    return f"9{run_no:04d}{index:07d}"


def make_event(run_no: int, index: int, series: Sequence[int], at: datetime) -> dict[str, Any]:
    """One bench event: a customer of its own, so no per-customer limit ever applies."""
    return {
        "eventId": f"bench-{run_no}-{index}",
        "eventType": "BenchIssue",
        "occurredAt": at.isoformat(),
        "customer": {"id": customer_id(run_no, index)},
        "seriesIds": list(series),
        "metadata": {"sourceType": "Bench", "sourceId": f"run-{run_no}",
                     "notes": "coupon-worker bench", "reason": "throughput"},
    }


@dataclass
class Batch:
    """Events published together, with the wall-clock time each was published at."""

    run_no: int
    events: list[dict[str, Any]]
    published_at: list[float] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"bench-{self.run_no}-"

    def __len__(self) -> int:
        return len(self.events)

    def index_of_customer(self, customer_id: str) -> int | None:
        head = f"9{self.run_no:04d}"
        if not customer_id.startswith(head) or len(customer_id) != len(head) + 7:
            return None
        return int(customer_id[len(head):])


@dataclass(frozen=True)
class Percentiles:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        if not seconds:
            return cls(math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(seconds)

        def at(q: float) -> float:
            rank = q * (len(ordered) - 1)
            low, high = math.floor(rank), math.ceil(rank)
            value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
            return round(value * 1000, 1)

        return cls(at(0.50), at(0.95), at(0.99), round(ordered[-1] * 1000, 1))
