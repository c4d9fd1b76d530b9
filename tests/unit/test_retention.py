"""Retention's use case on a store double: batches until done, counts, and what it refuses."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import click
import pytest

from worker.adapters.postgres.retention import EventBatch, RetentionStore
from worker.entrypoints.cli.retention import parse_age_s
from worker.metrics import Metrics
from worker.usecases.retention import RetentionPolicy, prune

DAY_S = 86_400.0
POLICY = RetentionPolicy(older_than_s=30 * DAY_S, event_id_window_s=60 * DAY_S,
                         audit_days=90, batch_size=2)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class StoreDouble:
    """Hands out ``event_batches`` in turn, then forgets and ages out rows two at a time."""

    event_batches: list[EventBatch]
    forgettable: int = 3
    audit_rows: int = 1
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def prune_events(self, *, older_than_s: float, limit: int, dry_run: bool,
                     after: tuple[datetime, str] | None = None) -> EventBatch:
        self.calls.append(("events", after))
        return self.event_batches.pop(0) if self.event_batches else EventBatch()

    def forget_event_ids(self, *, window_s: float, limit: int, dry_run: bool) -> int:
        done = self.forgettable if dry_run else min(limit, self.forgettable)
        self.forgettable -= 0 if dry_run else done
        return done

    def prune_audit(self, *, audit_days: int, limit: int, dry_run: bool) -> int:
        self.calls.append(("audit", audit_days))
        done, self.audit_rows = self.audit_rows, 0
        return done

    def prune_replay_jobs(self, *, older_than_s: float, dry_run: bool) -> int:
        return 0

    def kept(self, *, older_than_s: float) -> dict[str, int]:
        return {"dead_letters": 5, "rejected_messages": 0}


def batches() -> list[EventBatch]:
    return [EventBatch(events=2, entities=4, coupons=4, history=8, calls=2,
                       after=(T0, "e2")),
            EventBatch(events=1, entities=1, coupons=0, history=2, calls=1,
                       kept=Counter(duplicate_issued=1), after=(T0, "e4")),
            EventBatch()]


def test_prune_goes_on_from_where_each_batch_stopped_and_adds_up() -> None:
    store = StoreDouble(batches())
    metrics = Metrics()

    report = prune(cast(RetentionStore, store), POLICY, pruned=metrics.ledger_pruned)

    assert [after for kind, after in store.calls if kind == "events"] == [
        None, (T0, "e2"), (T0, "e4")]
    assert (report.events, report.entities, report.coupons, report.history, report.calls) \
        == (3, 5, 4, 10, 3)
    # Forgotten two at a time until a batch came back short; the audit once, at its own age.
    assert report.event_ids_forgotten == 3 and store.forgettable == 0
    assert ("audit", 90) in store.calls and report.audit == 1
    assert report.kept == {"dead_letters": 5, "duplicate_issued": 1}
    assert metrics.registry.get_sample_value(
        "coupon_ledger_pruned_rows_total", {"table": "history"}) == 10


def test_a_dry_run_counts_nothing_in_the_metrics() -> None:
    metrics = Metrics()

    report = prune(cast(RetentionStore, StoreDouble(batches())), POLICY, dry_run=True,
                   pruned=metrics.ledger_pruned)

    assert report.dry_run and report.events == 3 and report.event_ids_forgotten == 3
    assert metrics.registry.get_sample_value(
        "coupon_ledger_pruned_rows_total", {"table": "events"}) is None


@pytest.mark.parametrize(("changes", "message"), [
    ({"event_id_window_s": 10 * DAY_S}, "event-id window"),
    ({"audit_days": 20}, "audit retention"),
    ({"batch_size": 0}, "batch size"),
])
def test_a_policy_that_would_forget_too_soon_is_refused(
        changes: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"older_than_s": 30 * DAY_S, "event_id_window_s": 60 * DAY_S,
                              "audit_days": 90, "batch_size": 10, **changes}
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**values)


def test_ages_are_days_or_hours_and_at_least_a_day() -> None:
    assert parse_age_s("90") == parse_age_s("90d") == 90 * DAY_S
    assert parse_age_s("36h") == 36 * 3600
    for bad in ("2h", "0", "ninety", "-5d", "1.5d"):
        with pytest.raises(click.BadParameter):
            parse_age_s(bad)
