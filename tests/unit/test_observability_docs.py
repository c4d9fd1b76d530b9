"""The on-call references stay complete: every series the worker exports is in
docs/observability.md, and the log events' page finds every event (its staleness is checked with
the other generated pages, tests/unit/test_docs_reference.py)."""

from __future__ import annotations

import re

from coupon_devtools.docs import PAGES
from coupon_devtools.docs.log_events import log_events
from tests.promql import REPO_ROOT, exported_names

PAGE = REPO_ROOT / "docs" / "observability.md"


def test_the_log_events_page_is_generated_with_the_others() -> None:
    assert "docs/reference/log-events.md" in PAGES
    page = PAGES["docs/reference/log-events.md"]()
    assert "| `circuit.opened` | error |" in page


def test_the_log_reference_finds_events_wherever_they_are_logged() -> None:
    events = log_events(REPO_ROOT / "worker")
    assert {"circuit.opened", "consumer.paused", "entity.dead", "metrics.ledger_unreadable",
            "sweep.ledger_unavailable"} <= set(events)
    # fields from a literal extra=, and from a dict built beforehand
    assert {"reason", "verdict", "open_until"} <= events["circuit.opened"].fields
    assert {"event_id", "entity_id", "reason", "request_id"} <= events["entity.dead"].fields
    assert events["entity.dead"].levels == {"warning"}


def test_every_exported_series_is_in_the_metrics_reference() -> None:
    text = PAGE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_:]+)` \|", text, re.M))
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", name)
                for name in exported_names()}
    # a counter is documented with its _total sample; a histogram by its family name
    documented_families = {re.sub(r"_total$", "", name) for name in documented}
    assert families <= documented_families, sorted(families - documented_families)
