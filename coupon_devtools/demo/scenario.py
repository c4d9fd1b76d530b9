"""The demo's scenario: which events are sent (some twice, some malformed) and which faults
the sandbox injects."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from coupon_devtools.demo.defaults import (
    FIRST_CUSTOMER_ID,
    SERIES_DELIVERY,
    SERIES_EXPIRED,
    SERIES_GOLD,
    STALL_S,
    Via,
)


@dataclass(frozen=True)
class Delivery:
    """One message to publish: an event the given way in, or raw (malformed) bytes."""

    via: Literal["bus", "task", "raw"]
    event: dict[str, Any] | None = None
    raw: bytes = b""


@dataclass(frozen=True)
class Plan:
    """Everything a run publishes and injects, decided before anything starts."""

    events: list[dict[str, Any]]
    deliveries: list[Delivery]
    unknown_customers: list[str]
    faults: list[dict[str, Any]]

    @property
    def duplicates(self) -> int:
        """Deliveries of an event that was already published once."""
        return sum(1 for d in self.deliveries if d.via != "raw") - len(self.events)

    @property
    def malformed(self) -> int:
        return sum(1 for d in self.deliveries if d.via == "raw")

    def describe(self) -> str:
        """One line on what the run will throw at the worker."""
        kinds = Counter(str(f["kind"]) for f in self.faults)
        expired = sum(1 for e in self.events if SERIES_EXPIRED in e["seriesIds"])
        return (f"{len(self.events)} events, {self.duplicates} sent twice, {self.malformed} "
                f"malformed; Capillary faults: {kinds['stall_after']} timeouts after issuing, "
                f"{kinds['error_after']} 5xx after issuing, {kinds['error_before']} 503s; "
                f"expired series {SERIES_EXPIRED} in {expired} events; unknown customers: "
                f"{len(self.unknown_customers)}")


def _spread(n_events: int, count: int, phase: float, taken: set[int]) -> list[int]:
    """``count`` event positions spread over the run, so faults do not come in a burst (five
    failures in a row would open the circuit breaker and pause the demo for 30 s)."""
    step = n_events / count
    chosen = []
    for j in range(count):
        index = int(step * (j + phase)) % n_events
        while index in taken:
            index = (index + 1) % n_events
        taken.add(index)
        chosen.append(index)
    return chosen


def plan_scenario(n_events: int) -> Plan:
    """The events, duplicates, malformed messages and faults of a run of ``n_events``."""
    taken: set[int] = set()
    stalled = _spread(n_events, max(1, n_events // 60), 0.1, taken)
    failed_after = _spread(n_events, max(1, n_events // 60), 0.3, taken)
    refused_503 = _spread(n_events, max(1, n_events // 40), 0.5, taken)
    unknown = _spread(n_events, max(1, n_events // 100), 0.7, taken)
    expired = set(_spread(n_events, max(1, n_events // 25), 0.9, taken))

    occurred = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    events = []
    for i in range(n_events):
        customer = str(FIRST_CUSTOMER_ID + i)
        series = [SERIES_GOLD, SERIES_EXPIRED if i in expired else SERIES_DELIVERY]
        events.append({
            "eventId": f"tier-upgrade-{customer}-gold", "eventType": "TierUpgraded",
            "occurredAt": occurred, "customer": {"id": customer}, "seriesIds": series,
            "metadata": {"sourceType": "Journeys", "sourceId": "demo-journey",
                         "sourceActivity": "Tier upgrade", "notes": "Gold tier welcome",
                         "reason": "Tier upgrade to Gold"},
        })

    deliveries: list[Delivery] = []
    repeats: dict[int, list[Delivery]] = {}
    for i, event in enumerate(events):
        via: Via = "task" if i % 5 == 2 else "bus"
        deliveries.append(Delivery(via, event))
        if i % 10 == 5:
            # ~10% arrive twice, the other way in, a few messages later (some while the
            # first delivery is still in flight, some after it completed).
            repeats.setdefault(i + 1 + i % 7, []).append(
                Delivery("bus" if via == "task" else "task", event))
        deliveries.extend(repeats.pop(i, []))
    deliveries.extend(d for later in repeats.values() for d in later)
    malformed = _malformed_messages()
    for n, raw in enumerate(malformed, start=1):
        deliveries.insert(len(deliveries) * n // (len(malformed) + 1), Delivery("raw", raw=raw))

    def customer_of(i: int) -> str:
        return str(FIRST_CUSTOMER_ID + i)

    faults = (
        [{"kind": "stall_after", "customer": customer_of(i), "delay_seconds": STALL_S}
         for i in stalled]
        + [{"kind": "error_after", "customer": customer_of(i), "status": 500}
           for i in failed_after]
        + [{"kind": "error_before", "customer": customer_of(i), "status": 503}
           for i in refused_503]
    )
    return Plan(events, deliveries, [customer_of(i) for i in unknown], faults)


def _malformed_messages() -> list[bytes]:
    return [
        b'{"eventId": "tier-upgrade-truncated", "customer": {"id": "566880001"}, "seriesIds": [',
        json.dumps({"eventId": "tier-upgrade-bad-series", "customer": {"id": "566880002"},
                    "seriesIds": str(SERIES_GOLD)}).encode(),
        json.dumps({"eventId": "tier-upgrade-no-customer", "seriesIds": [SERIES_GOLD]}).encode(),
    ]


def write_scenario(plan: Plan, path: Path) -> Path:
    """Write the sandbox's scenario file (series behaviours, unknown customers)."""
    scenario = {
        "series": {
            str(SERIES_GOLD): {"description": "Gold tier welcome: 500 off",
                               "discountType": "ABS", "discountValue": 500},
            str(SERIES_DELIVERY): {"description": "Free delivery for a month",
                                   "discountType": "PERC", "discountValue": 100,
                                   "discountUpto": 99},
            str(SERIES_EXPIRED): {"description": "Summer sale (ended)", "behaviour": "expired"},
        },
        "unknownCustomers": plan.unknown_customers,
    }
    path.write_text(json.dumps(scenario, indent=2) + "\n", encoding="utf-8")
    return path
