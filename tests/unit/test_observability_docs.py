"""docs/observability.md stays the reference: every log event the worker writes and every series
it exports is there."""

from __future__ import annotations

import re

from coupon_devtools.log_events import log_events, markdown
from tests.promql import REPO_ROOT, exported_names

PAGE = REPO_ROOT / "docs" / "observability.md"
START, END = "<!-- log-events:start -->", "<!-- log-events:end -->"


def test_the_log_reference_is_the_one_the_source_gives() -> None:
    # Regenerate with: python -m coupon_devtools.log_events (between the two markers)
    text = PAGE.read_text(encoding="utf-8")
    documented = text.split(START, 1)[1].split(END, 1)[0].strip()
    expected = markdown(log_events(REPO_ROOT / "worker"))
    assert documented == expected, "docs/observability.md's log reference is out of date"


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
