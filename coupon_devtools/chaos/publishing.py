"""The events of a run and the thread that publishes them (some twice, both ways in)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from worker.config import Settings
from coupon_devtools.chaos.defaults import SERIES, Timeline, first_line


@dataclass(frozen=True)
class Delivery:
    via: str  # "bus" or "task"
    event: dict[str, Any]


def make_event(customer_id: int) -> dict[str, Any]:
    return {
        "eventId": f"chaos-tier-upgrade-{customer_id}", "eventType": "TierUpgraded",
        "occurredAt": "2026-11-25T10:00:00Z", "customer": {"id": str(customer_id)},
        "seriesIds": list(SERIES),
        "metadata": {"sourceType": "Journeys", "sourceId": "chaos", "sourceActivity": "Tier "
                     "upgrade", "notes": "Gold tier welcome", "reason": "Tier upgrade to Gold"},
    }


def plan_deliveries(events: Sequence[dict[str, Any]]) -> list[Delivery]:
    """Each event once, one in five as a Celery task; one in twenty again, the other way in,
    a few messages later (a producer that retried)."""
    deliveries: list[Delivery] = []
    again: dict[int, list[Delivery]] = {}
    for i, event in enumerate(events):
        via = "task" if i % 5 == 2 else "bus"
        deliveries.append(Delivery(via, event))
        if i % 20 == 7:
            again.setdefault(i + 3, []).append(Delivery("bus" if via == "task" else "task",
                                                        event))
        deliveries.extend(again.pop(i, []))
    deliveries.extend(d for later in again.values() for d in later)
    return deliveries


class Publisher(threading.Thread):
    """Publishes the deliveries at a steady pace through the project's producer; when the
    broker fails, reconnects and publishes the unconfirmed message again."""

    def __init__(self, settings: Settings, deliveries: Sequence[Delivery], spread_s: float,
                 timeline: Timeline) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.settings = settings
        self.deliveries = deliveries
        self.spread_s = spread_s
        self.timeline = timeline
        self.republished = 0
        self.published = 0
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._publish_all()
        except Exception as exc:  # noqa: BLE001 - the main loop reports it and stops the run
            self.error = exc
        self.finished_at = self.timeline.now()

    def _publish_all(self) -> None:
        from worker.bootstrap import open_producer
        from worker.domain.errors import WorkerError

        started = time.monotonic()
        pace = self.spread_s / max(len(self.deliveries), 1)
        failing_since: float | None = None
        while self.published < len(self.deliveries) and not self.stop.is_set():
            try:
                with open_producer(self.settings) as producer:
                    while self.published < len(self.deliveries) and not self.stop.is_set():
                        due = started + self.published * pace
                        self.stop.wait(max(due - time.monotonic(), 0.0))
                        delivery = self.deliveries[self.published]
                        producer.publish_event(delivery.event, via=delivery.via)  # type: ignore[arg-type]
                        self.published += 1
                        if failing_since is not None:
                            self.timeline.note(f"publisher: broker back, publishing again "
                                               f"after {time.monotonic() - failing_since:.1f} s")
                            failing_since = None
            except WorkerError as exc:
                # The message may or may not have been stored: publish it again (the worker
                # takes a second delivery of an event in without a second call).
                self.republished += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.timeline.note(f"publisher: {first_line(str(exc))}; retrying")
                self.stop.wait(0.5)
        self.timeline.note(f"publisher: all {len(self.deliveries)} messages published "
                           f"({self.republished} published again after a broker error)")
