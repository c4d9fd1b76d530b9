"""Support actions on the in-memory ledger: the same unit of work and ledger protocol as the
services, so replay, discard and resubmit run here without a database (and, with the same
assertions, on PostgreSQL in tests/integration/test_replay.py and test_rejected.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.ledger import FakeState, fake_unit_of_work_factory
from worker.adapters.postgres.support import Selection
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState
from worker.usecases.support import SupportDeps, discard, replay, replay_event, resubmit_rejected

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
EVENT = {"eventId": "e-1", "customer": {"id": "566881933"}, "seriesIds": [544770, 553379]}


def ledger_with_one_dead_entity() -> tuple[FakeState, SupportDeps, FakePublisher]:
    state, uow = fake_unit_of_work_factory()
    with uow() as unit:
        unit.ledger.ingest(parse_event_data(EVENT), source="bus", now=NOW)
        unit.commit()
    dead = state.entities[1]
    dead.state, dead.attempts, dead.last_error_code = EntityState.DEAD, 8, "712"
    dead.dead_at = NOW
    state.entities[2].state = EntityState.ISSUED
    publisher = FakePublisher()
    return state, SupportDeps(uow=uow, publisher=publisher, clock=lambda: NOW,
                              sleep=lambda _s: None), publisher


def test_a_dead_entity_is_requeued_with_fresh_attempts_and_an_audit_row() -> None:
    state, deps, publisher = ledger_with_one_dead_entity()
    # When support replays the dead letters of series 544770
    results = replay(Selection(series_id=544770), reason="series fixed", operator="ana",
                     deps=deps)
    # Then the entity is queued again, its retry published after the commit
    assert [r.outcome for r in results] == ["requeued"]
    entity = state.entities[1]
    assert (entity.state, entity.attempts) == (EntityState.QUEUED, 0)
    assert publisher.retries == [1]
    assert entity.history[-1] == "replayed"
    audit, = state.audits
    assert (audit["action"], audit["operator"], audit["entity_id"]) == ("replay", "ana", 1)
    assert audit["details"] == {"state_before": "dead", "attempts_before": 8}


def test_a_dry_run_changes_nothing() -> None:
    state, deps, publisher = ledger_with_one_dead_entity()
    results = replay(Selection(series_id=544770), reason="check", operator="ana", deps=deps,
                     dry_run=True)
    assert [r.outcome for r in results] == ["would issue again"]
    assert state.entities[1].state is EntityState.DEAD
    assert publisher.retries == [] and state.audits == []


def test_discard_closes_a_dead_entity_and_completes_its_event_state() -> None:
    state, deps, _ = ledger_with_one_dead_entity()
    results = discard(Selection(error_code="712"), reason="series retired", operator="ana",
                      deps=deps)
    assert [r.outcome for r in results] == ["discarded"]
    assert state.entities[1].state is EntityState.DISCARDED
    assert state.events["e-1"]["state"] == "completed"
    assert [a["action"] for a in state.audits] == ["discard"]


def test_an_event_with_nothing_to_replay_is_audited_as_such() -> None:
    state, deps, publisher = ledger_with_one_dead_entity()
    state.entities[1].state = EntityState.ISSUED
    assert replay_event("e-1", reason="customer asked", operator="ana", deps=deps) == []
    assert publisher.retries == []
    assert [a["outcome"] for a in state.audits] == ["nothing to replay"]


def test_a_fixed_rejection_is_resubmitted_once_then_refused() -> None:
    state, deps, publisher = ledger_with_one_dead_entity()
    with deps.uow() as unit:
        rejected_id = unit.ledger.record_rejection(
            raw=b'{"eventId": "e-2"}', reason="customer: Field required", source="bus",
            event_id="e-2", content_type="application/json", now=NOW)
        unit.commit()
    fixed = json.dumps({**EVENT, "eventId": "e-2"}).encode()
    first = resubmit_rejected(rejected_id, fixed, reason="added the customer", operator="ana",
                              deps=deps, submitter=publisher, max_bytes=65_536, os_user="ana")
    again = resubmit_rejected(rejected_id, fixed, reason="again", operator="ana", deps=deps,
                              submitter=publisher, max_bytes=65_536, os_user="ana")
    assert first.accepted and first.outcome == "resubmitted as event e-2"
    assert not again.accepted and again.outcome.startswith("refused: already resubmitted")
    assert [source for _event, source in publisher.events] == ["resubmit"]
    assert state.rejections[0]["resubmitted_event_id"] == "e-2"


def test_a_resubmission_of_an_event_already_in_the_ledger_is_linked_not_sent() -> None:
    _state, deps, publisher = ledger_with_one_dead_entity()
    with deps.uow() as unit:
        rejected_id = unit.ledger.record_rejection(
            raw=b"{", reason="invalid JSON", source="bus", event_id=None,
            content_type="application/json", now=NOW)
        unit.commit()
    result = resubmit_rejected(rejected_id, json.dumps(EVENT).encode(), reason="dup",
                               operator="ana", deps=deps, submitter=publisher,
                               max_bytes=65_536, os_user="ana")
    assert result.accepted and result.outcome.startswith("linked: event e-1")
    assert publisher.events == []
