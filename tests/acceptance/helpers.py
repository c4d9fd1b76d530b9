"""Helpers for tests that drive the real worker: publish, and read the ledger's answer."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine

from tests.conftest import wait_until
from worker.broker.publisher import EventProducer
from worker.config import Settings
from worker.errors import NotFound
from worker.views import event_story


def example_event(event_id: str = "tier-upgrade-566881933-2026-11-25",
                  series: tuple[int, ...] = (544770, 553379),
                  customer: str = "566881933") -> dict[str, Any]:
    return {
        "eventId": event_id, "eventType": "TierUpgraded", "occurredAt": "2026-11-25T10:00:00Z",
        "customer": {"id": customer}, "seriesIds": list(series),
        "metadata": {"sourceType": "Journeys", "sourceId": "journey-block-001",
                     "sourceActivity": "Tier upgrade", "notes": "Gold reward",
                     "reason": "Tier upgrade to Gold"},
    }


def publish_raw(settings: Settings, *bodies: bytes) -> None:
    with EventProducer.open(settings) as producer:
        for body in bodies:
            producer.publish_raw(body)


def publish(settings: Settings, *events: dict[str, Any], via: str = "bus") -> None:
    with EventProducer.open(settings) as producer:
        for event in events:
            if via == "bus":
                producer.publish_raw(json.dumps(event).encode())
            else:
                producer.publish_event(event, via="task")


def story(engine: Engine, event_id: str) -> dict[str, Any] | None:
    try:
        return event_story(engine, event_id)
    except NotFound:
        return None


def wait_for_state(engine: Engine, event_id: str, state: str,
                   timeout_s: float = 30.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = story(engine, event_id)
        return found if found and found["state"] == state else None

    result: dict[str, Any] = wait_until(reached, timeout_s=timeout_s,
                                        message=f"event {event_id} to be {state}")
    return result
