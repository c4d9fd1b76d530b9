"""Inbound events: every class of bad input is rejected with a precise reason."""

from __future__ import annotations

import json

import pytest

from worker.domain.errors import EventRejected
from worker.domain.events import parse_event_bytes, parse_event_data

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


# -- poison input: what PostgreSQL, the JSON parser or Unicode itself cannot take -----------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 5000, "JSON nested deeper than 32 levels"),
        (b'{"eventId": "x", "pad": ' + b"[" * 40 + b"]" * 40 + b"}",
         "JSON nested deeper than 32 levels"),
        (with_(eventId="tier-\u0000-1"), "eventId: contains a NUL character (U+0000)"),
        (with_(customer={"id": "5668\u000081933"}),
         "customer.id: contains a NUL character (U+0000)"),
        (with_(metadata={"notes": "gold\u0000"}), "metadata.notes: contains a NUL character"),
        (with_(eventId="tier-\ud800"), "eventId: contains a lone surrogate (U+D800)"),
        (with_(customer={"email": "a@b.c\udfff"}),
         "customer.email: contains a lone surrogate (U+DFFF)"),
        (with_(seriesIds=[544770, 2**31]),
         "seriesIds: series id 2147483648 is above 2147483647"),
        (with_(seriesIds=[10**30]), "seriesIds: series id 1000000000000000000000000000000 is"),
        (b'{"eventId": "x", "seriesIds": [' + b"9" * 5000 + b"]}",
         "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
        (b"[]", "event must be a JSON object, got an array"),
        (b'"x"', "event must be a JSON object, got a string"),
        (b"42", "event must be a JSON object, got a number"),
        (b"4.2", "event must be a JSON object, got a number"),
        (b"null", "event must be a JSON object, got null"),
        (b"true", "event must be a JSON object, got true"),
        (b'{"eventId": "\xc3\x28"}', "body is not UTF-8: invalid continuation byte at byte 13"),
    ],
)
def test_poison_input_is_rejected_with_a_precise_reason(body: bytes, reason: str) -> None:
    assert reason in rejected(body)


def test_the_limits_are_exact() -> None:
    # The largest series id the ledger stores passes, one more does not.
    assert parse_event_bytes(with_(seriesIds=[2**31 - 1]), max_bytes=MAX).seriesIds == (
        2**31 - 1,)
    assert "series id 2147483648 is above" in rejected(with_(seriesIds=[2**31]))
    # 32 levels pass (the event object and 31 nested arrays in an ignored field), 33 do not.
    assert parse_event_bytes(with_(extra=json.loads("[" * 31 + "]" * 31)), max_bytes=MAX)
    assert rejected(with_(extra=json.loads("[" * 32 + "]" * 32))) == \
        "JSON nested deeper than 32 levels"


def test_decoded_data_from_a_task_is_checked_the_same_way() -> None:
    deep: object = []
    for _ in range(100):
        deep = [deep]
    for data, reason in [
        ({**GOOD, "eventId": "a\u0000b"}, "eventId: contains a NUL character"),
        ({**GOOD, "seriesIds": [2**31]}, "seriesIds: series id 2147483648 is above"),
        ({**GOOD, "extra": deep}, "JSON nested deeper than 32 levels"),
        ([], "event must be a JSON object, got an array"),
        (None, "event must be a JSON object, got null"),
    ]:
        with pytest.raises(EventRejected) as info:
            parse_event_data(data)
        assert reason in info.value.reason


def test_reasons_and_event_id_hints_are_printable_and_storable() -> None:
    # Keys of forbidden extras and bad event ids come from the sender: a reason quoting them
    # must not carry control characters, lone surrogates or NULs into the ledger or a terminal.
    body = with_(eventId="\x1b[31mred\u0000\ud800", metadata={"\x1b]0;evil\x07\n": "x"})
    with pytest.raises(EventRejected) as info:
        parse_event_bytes(body, max_bytes=MAX)
    reason, hint = info.value.reason, info.value.event_id
    assert reason.isprintable() and "\x1b" not in reason
    assert "metadata.\\x1b]0;evil\\x07\\n: Extra inputs are not permitted" in reason
    assert hint is not None and hint.isprintable() and "\x00" not in hint
    assert hint == "\\x1b[31mred\\x00\\ud800"
    key = rejected(with_(metadata={"k\ud800": "y"}))
    assert key == ("metadata: key k\\ud800 contains a lone surrogate (U+D800), "
                   "which is not valid Unicode")


def test_a_reason_listing_many_problems_stays_bounded() -> None:
    reason = rejected(with_(metadata={f"k{n}" * 30: "x" for n in range(60)}))
    assert len(reason) <= 2000
    assert reason.endswith("more problems)")


def test_an_event_may_name_more_series_than_one_call_takes_up_to_the_events_bound() -> None:
    from worker.domain.errors import EventRejected
    from worker.domain.events import MAX_SERIES_PER_EVENT, parse_event_data

    many = parse_event_data({"eventId": "many", "customer": {"id": "1"},
                             "seriesIds": list(range(1, 251))})
    assert len(many.seriesIds) == 250
    with pytest.raises(EventRejected, match=f"at most {MAX_SERIES_PER_EVENT} distinct"):
        parse_event_data({"eventId": "too-many", "customer": {"id": "1"},
                          "seriesIds": list(range(1, MAX_SERIES_PER_EVENT + 2))})
