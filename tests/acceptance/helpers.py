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
    seen: list[dict[str, Any] | None] = [None]

    def reached() -> dict[str, Any] | None:
        seen[0] = found = story(engine, event_id)
        return found if found and found["state"] == state else None

    try:
        result: dict[str, Any] = wait_until(reached, timeout_s=timeout_s,
                                            message=f"event {event_id} to be {state}")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; the ledger's story: {seen[0]!r}") from None
    return result


def queue_consumers(settings: Settings, queue: str) -> int:
    """How many consumers RabbitMQ counts on ``queue`` (a passive declare: it must exist)."""
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        _name, _ready, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
        return int(consumers)


def circuit(engine: Engine) -> tuple[str, int]:
    """The fleet's circuit as the ledger holds it: state and how often it opened."""
    from sqlalchemy import text

    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT state, times_opened FROM circuit_breakers WHERE name = 'capillary'")).first()
    return (str(row[0]), int(row[1])) if row else ("closed", 0)


def wait_for_circuit_opened(engine: Engine, timeout_s: float = 30.0) -> None:
    wait_until(lambda: circuit(engine)[1] >= 1, timeout_s=timeout_s,
               message="the circuit to open")


def wait_for_consumers(settings: Settings, queue: str, predicate: Any,
                       timeout_s: float = 30.0, what: str = "consumers") -> None:
    wait_until(lambda: predicate(queue_consumers(settings, queue)), timeout_s=timeout_s,
               message=what)
