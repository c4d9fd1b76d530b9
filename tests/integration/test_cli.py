"""Support commands in process, on a real ledger: what a support engineer reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tests.acceptance.helpers import queue_ready
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.model import Coupon, EntityState

SETTLE_S = 120.0


def seed(engine: Engine, event_id: str, *outcomes: Transition | None) -> list[int]:
    """An event whose entities (series 1, 2, ...) end as ``outcomes`` say."""
    uow = sql_unit_of_work_factory(engine)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(parse_event_data({
            "eventId": event_id, "customer": {"id": "566881933"},
            "seriesIds": list(range(1, len(outcomes) + 1))}), source="bus", now=now)
        claim = u.ledger.claim_event(event_id, token="t", worker="w", now=now, lease_s=60,
                                     settle_window_s=SETTLE_S)
        ids = [e.entity_id for e in claim.entities]
        transitions = [t.__class__(**{**t.__dict__, "entity_id": entity_id})
                       for t, entity_id in zip(outcomes, ids, strict=True) if t is not None]
        u.ledger.record(claim, calls=[], transitions=transitions, worker="w", now=now)
        u.commit()
    return ids


def duplicate() -> Transition:
    return Transition(0, EntityState.DUPLICATE_ISSUED, "duplicate_issued", 2,
                      coupon=Coupon(code="FIRST00001", series_id=1),
                      extra_coupons=(Coupon(code="LATE000002", series_id=1),),
                      error_code="duplicate_issued", error_message="2 coupons of ours")


def dead(code: str = "712") -> Transition:
    return Transition(0, EntityState.DEAD, "dead", 1, error_code=code, verdict="permanent",
                      dead_reason="refused by Capillary: series expired")


def test_duplicates_are_listed_with_both_codes_and_what_to_do(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    assert "no duplicates" in cli("duplicates").output
    seed(clean_ledger, "dup-1", duplicate())
    shown = cli("duplicates")
    assert shown.exit_code == 0
    assert "dup-1" in shown.output and "FIRST00001, LATE000002" in shown.output
    assert "revoked in Capillary" in shown.output
    listed = json.loads(cli("duplicates", "--json").output)
    assert listed["duplicates"][0]["codes"] == ["FIRST00001", "LATE000002"]


def test_events_show_lists_every_coupon_of_a_duplicate(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    seed(clean_ledger, "dup-2", duplicate())
    story = json.loads(cli("events", "show", "dup-2", "--json").output)
    assert story["entities"][0]["state"] == "duplicate_issued"
    assert {c["code"] for c in story["coupons"]} == {"FIRST00001", "LATE000002"}


def test_dead_letters_list_summarise_and_show_with_their_meaning(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    entity_id, _ = seed(clean_ledger, "dead-1", dead(), None)
    listed = cli("dlq", "list")
    assert listed.exit_code == 0 and "dead-1" in listed.output
    summary = cli("dlq", "summary", "--json")
    assert [(r["error_code"], r["count"]) for r in json.loads(summary.output)] == [("712", 1)]
    shown = cli("dlq", "show", str(entity_id))
    assert shown.exit_code == 0 and "series expired" in shown.output


def test_a_replay_dry_run_changes_nothing_and_says_what_it_would_do(
    cli: Callable[..., Any], clean_ledger: Engine,
) -> None:
    entity_id, _ = seed(clean_ledger, "dead-2", dead(), None)
    dry = cli("dlq", "replay", str(entity_id), "--reason", "series renewed", "--dry-run")
    assert dry.exit_code == 0 and "dry run" in dry.output.lower()
    again = json.loads(cli("dlq", "list", "--json").output)
    assert [r["state"] for r in again if r["kind"] == "entity"] == ["dead"]


def test_health_without_a_worker_is_unhealthy(cli: Callable[..., Any]) -> None:
    result = cli("health", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["healthy"] is False


def test_publish_sends_each_valid_line_and_names_the_invalid_ones(
        cli: Callable[..., Any], settings: Settings, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        json.dumps({"eventId": "p-1", "customer": {"id": "1"}, "seriesIds": [544770]}) + "\n"
        + '{"eventId": "p-bad", "seriesIds": "not a list"}\n'
        + json.dumps({"eventId": "p-2", "customer": {"id": "2"}, "seriesIds": [553379]}) + "\n")
    result = cli("publish", str(events), "--repeat", "2")
    assert result.exit_code == 1, "an invalid line makes the command fail"
    assert "line 2: not published" in result.output
    assert f"published 4 message(s) to {settings.events_queue}; 1 invalid line(s) skipped" \
        in " ".join(result.output.split())
    assert queue_ready(settings, settings.events_queue) == 4


def test_publish_as_a_task_from_stdin(cli: Callable[..., Any], settings: Settings) -> None:
    line = json.dumps({"eventId": "p-3", "customer": {"id": "3"}, "seriesIds": [544770]})
    result = cli("publish", "-", "--via", "task", stdin=line.encode())
    assert result.exit_code == 0, result.output
    assert queue_ready(settings, settings.tasks_queue) == 1
