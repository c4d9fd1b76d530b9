"""Inbound events: every class of bad input is rejected with a precise reason."""

from __future__ import annotations

import json

import pytest

from worker.errors import EventRejected
from worker.events import parse_event_bytes, parse_event_data

MAX = 65_536
GOOD = {
    "eventId": "tier-upgrade-566881933-2026-11-25",
    "eventType": "TierUpgraded",
    "occurredAt": "2026-11-25T10:00:00Z",
    "customer": {"id": "566881933"},
    "seriesIds": [544770, 553379],
    "metadata": {"sourceType": "Journeys", "sourceId": "journey-block-001",
                 "sourceActivity": "Tier upgrade", "notes": "n", "reason": "r"},
}


def with_(**changes: object) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def rejected(body: bytes) -> str:
    with pytest.raises(EventRejected) as info:
        parse_event_bytes(body, max_bytes=MAX)
    return info.value.reason


def test_the_documented_event_is_valid() -> None:
    event = parse_event_bytes(json.dumps(GOOD).encode(), max_bytes=MAX)
    assert event.eventId == GOOD["eventId"]
    assert event.seriesIds == (544770, 553379)
    assert event.customer.key == "id:566881933"
    assert event.occurredAt is not None and event.occurredAt.tzinfo is not None


def test_duplicate_series_collapse_in_order() -> None:
    event = parse_event_bytes(with_(seriesIds=[3, 1, 3, 2, 1]), max_bytes=MAX)
    assert event.seriesIds == (3, 1, 2)


def test_numeric_customer_id_is_text() -> None:
    event = parse_event_bytes(with_(customer={"id": 566881933}), max_bytes=MAX)
    assert event.customer.id == "566881933"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (with_(eventId=...), "eventId: Field required"),
        (with_(eventId=""), "eventId: String should have at least 1 character"),
        (with_(eventId="x" * 129), "eventId: String should have at most 128 characters"),
        (with_(customer=...), "customer: Field required"),
        (with_(customer={}), "customer needs at least one of id, mobile, email, externalId"),
        (with_(customer={"id": True}), "customer.id"),
        (with_(seriesIds=[]), "seriesIds: must list at least one series id"),
        (with_(seriesIds="544770"), "seriesIds"),
        (with_(seriesIds=[544770, "553379"]), "seriesIds.1: Input should be a valid integer"),
        (with_(seriesIds=[0]), "every series id must be a positive integer"),
        (with_(seriesIds=[1.5]), "seriesIds.0"),
        (with_(metadata={"sourceType": "x" * 51}), "metadata.sourceType: String should"),
        (with_(metadata={"notes": "x" * 251}), "metadata.notes: String should have at most 250"),
        (with_(metadata={"unknown": "x"}), "metadata.unknown: Extra inputs are not permitted"),
        (with_(occurredAt="2026-11-25T10:00:00"), "occurredAt needs a time zone"),
    ],
)
def test_bad_input_is_rejected_with_a_precise_reason(body: bytes, reason: str) -> None:
    assert reason in rejected(body)


def test_a_ten_megabyte_body_is_rejected_by_size_before_parsing() -> None:
    body = b'{"eventId": "big", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert rejected(body) == f"body is {len(body)} bytes, over the {MAX}-byte limit"


def test_rejection_keeps_the_event_id_when_it_can_be_read() -> None:
    with pytest.raises(EventRejected) as info:
        parse_event_data({**GOOD, "seriesIds": []})
    assert info.value.event_id == GOOD["eventId"]


def test_every_problem_is_reported_at_once() -> None:
    reason = rejected(with_(customer={}, seriesIds=[]))
    assert "customer" in reason and "seriesIds" in reason
