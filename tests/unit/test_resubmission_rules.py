"""What a fix of a rejected message may change: what failed validation and the metadata, never
a valid eventId, customer or series."""

from __future__ import annotations

import json

from worker.domain.resubmission import changed_valid_fields, original_fields, refusal

FIXED = {"eventId": "e-1", "customer": {"id": "566881933"}, "seriesIds": [544770]}


def test_changing_a_valid_identity_field_is_named_identity_first() -> None:
    original = {**FIXED, "metadata": {"notes": "x"}}
    fixed = {**FIXED, "seriesIds": [1], "eventId": "e-2", "customer": {"id": "2"}}
    assert changed_valid_fields(original, fixed) == ["customer", "eventId", "seriesIds"]
    assert "keeps the original eventId, customer and series" in refusal(["customer"])


def test_the_invalid_or_missing_field_and_the_metadata_may_change() -> None:
    original = {"eventId": "e-1", "seriesIds": ["x"], "metadata": {"notes": "old"}}
    fixed = {**FIXED, "metadata": {"notes": "new"}}
    assert changed_valid_fields(original, fixed) == []


def test_a_valid_optional_field_may_not_be_dropped() -> None:
    original = {**FIXED, "eventType": "TierUpgraded", "seriesIds": "nope"}
    assert changed_valid_fields(original, FIXED) == ["eventType"]


def test_an_original_that_is_not_a_json_object_binds_nothing() -> None:
    assert original_fields(b"\xff not json") is None
    assert original_fields(b"[1, 2]") is None
    assert original_fields(json.dumps(FIXED).encode()) == FIXED
    assert changed_valid_fields(None, FIXED) == []
