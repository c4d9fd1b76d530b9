"""The bus bridge peeks at a message for Flower; no body may make that peek raise."""

from __future__ import annotations

import json

import pytest

from worker.broker.worker_steps import _peek

MAX = 65_536


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000, b"{" * 5000, b'{"a":' * 5000, b"\xff\xfe", b"null", b"[1]",
     b'{"seriesIds": [' + b"9" * 5000 + b"]}", b"x" * (MAX + 1)],
)
def test_a_peek_at_poison_is_empty_not_an_error(body: bytes) -> None:
    assert _peek(body, MAX) == (None, None, None)


def test_a_peek_shows_printable_labels_only() -> None:
    body = json.dumps({"eventId": "e\x1b[31m\n\x00\ud800", "customer": {"id": "1\n2"},
                       "seriesIds": [1, 2]}).encode()
    event_id, customer, series = _peek(body, MAX)
    assert event_id == "e\\x1b[31m\\n\\x00\\ud800"
    assert customer == "id:1\\n2"
    assert series == "[1, 2]"


def test_a_peek_cuts_long_labels() -> None:
    body = json.dumps({"eventId": "e" * 5000, "customer": {"id": "c" * 5000},
                       "seriesIds": list(range(5000))}).encode()
    event_id, customer, series = _peek(body, MAX)
    assert event_id is None  # longer than any valid event id: not a label worth showing
    assert customer is not None and len(customer) <= 80
    assert series is not None and len(series) <= 120
