"""A resubmission keeps the original's eventId, customer and series (only what failed
validation, and the metadata, may change), and is on record before it is published."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from tests.integration.test_rejected import FIXED, MAX, reject, support_deps
from worker.domain.events import LoyaltyEvent
from worker.usecases.support import resubmit_rejected


@pytest.mark.parametrize(("change", "named"), [
    ({"eventId": "someone-elses-event"}, "eventId"),
    ({"customer": {"id": "999"}}, "customer"),
    ({"seriesIds": [544770]}, "seriesIds"),
])
def test_a_fix_that_changes_a_valid_identity_field_is_refused(
        clean_ledger: Engine, change: dict[str, Any], named: str) -> None:
    # Given a message rejected for its metadata only (eventId, customer, series all valid)
    original = {**FIXED, "metadata": {"notes": "x" * 100_000}}
    rejected_id = reject(clean_ledger, json.dumps(original).encode())
    support, publisher = support_deps(clean_ledger)
    # When the fix also changes the eventId, the customer or the series
    result = resubmit_rejected(rejected_id, json.dumps({**FIXED, **change}).encode(),
                               reason="fix", operator="ana", deps=support,
                               submitter=publisher, max_bytes=MAX)
    # Then it is refused, naming the field and the rule, and nothing is sent
    assert not result.accepted and publisher.events == []
    assert result.outcome.startswith(f"refused: the fix changes {named}")
    assert "keeps the original eventId, customer and series" in result.outcome


def test_the_field_that_failed_and_the_metadata_may_change(clean_ledger: Engine) -> None:
    original = {**FIXED, "seriesIds": [544770, "x"], "metadata": {"notes": "old"}}
    rejected_id = reject(clean_ledger, json.dumps(original).encode())
    support, publisher = support_deps(clean_ledger)
    fixed = {**FIXED, "seriesIds": [544770, 553379], "metadata": {"notes": "fixed, SUP-8"}}
    result = resubmit_rejected(rejected_id, json.dumps(fixed).encode(), reason="fix",
                               operator="ana", deps=support, submitter=publisher,
                               max_bytes=MAX)
    assert result.accepted, result.outcome
    assert [e["seriesIds"] for e, _ in publisher.events] == [[544770, 553379]]


def test_a_missing_customer_may_be_added(clean_ledger: Engine) -> None:
    original = {k: v for k, v in FIXED.items() if k != "customer"}
    rejected_id = reject(clean_ledger, json.dumps(original).encode())
    support, publisher = support_deps(clean_ledger)
    result = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                               operator="ana", deps=support, submitter=publisher,
                               max_bytes=MAX)
    assert result.accepted, result.outcome


def test_the_resubmission_is_committed_before_it_is_published(clean_ledger: Engine) -> None:
    rejected_id = reject(clean_ledger, json.dumps({**FIXED, "seriesIds": []}).encode())
    support, _ = support_deps(clean_ledger)
    seen: list[tuple[Any, ...]] = []

    class LookingPublisher(FakePublisher):
        def submit_event(self, event: LoyaltyEvent, *, source: str) -> None:
            # What another connection sees at the moment of publishing
            with clean_ledger.connect() as conn:
                seen.append(tuple(conn.execute(text(
                    "SELECT resubmitted_event_id FROM rejected_events")).scalars()))
                seen.append(tuple(conn.execute(text(
                    "SELECT action FROM operator_actions")).scalars()))
            super().submit_event(event, source=source)

    publisher = LookingPublisher()
    result = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                               operator="ana", deps=support, submitter=publisher,
                               max_bytes=MAX)
    assert result.accepted and len(publisher.events) == 1
    assert seen == [(FIXED["eventId"],), ("rejected_resubmit",)]
