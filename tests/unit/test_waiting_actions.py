"""Retry now and give up on the in-memory ledger: only a waiting entity moves; giving up makes
a dead letter with who and why; both are audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.ledger import FakeState, fake_unit_of_work_factory
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState, can_transition
from worker.usecases.support import SupportDeps
from worker.usecases.waiting import give_up, retry_now

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def waiting_ledger() -> tuple[FakeState, SupportDeps]:
    state, uow = fake_unit_of_work_factory()
    with uow() as unit:
        unit.ledger.ingest(parse_event_data({"eventId": "e-w", "customer": {"id": "1"},
                                             "seriesIds": [1, 2]}), source="bus", now=NOW)
        unit.commit()
    for e in state.entities.values():
        e.state, e.next_attempt_at, e.attempts = EntityState.RETRY_WAIT, NOW + timedelta(hours=1), 3
    state.entities[2].state = EntityState.ISSUED
    return state, SupportDeps(uow=uow, publisher=FakePublisher(), clock=lambda: NOW)


def test_a_person_may_give_up_on_a_waiting_entity() -> None:
    assert can_transition(EntityState.RETRY_WAIT, EntityState.DEAD)


def test_retry_now_makes_it_due_and_skips_what_moved_on() -> None:
    state, deps = waiting_ledger()
    results = retry_now([1, 2], operator="ana", deps=deps)
    assert [r.outcome for r in results] == ["due now", "skipped: now issued"]
    assert state.entities[1].next_attempt_at == NOW
    assert state.entities[1].state is EntityState.RETRY_WAIT
    assert [a["action"] for a in state.audits] == ["retry_now", "retry_now"]


def test_give_up_needs_a_reason_and_makes_a_dead_letter() -> None:
    state, deps = waiting_ledger()
    with pytest.raises(ValueError, match="reason"):
        give_up([1], reason=" ", operator="ana", deps=deps)
    results = give_up([1], reason="SUP-3", operator="ana", deps=deps)
    assert [r.outcome for r in results] == ["dead (given up)"]
    entity = state.entities[1]
    assert entity.state is EntityState.DEAD and entity.dead_reason == "given up by ana: SUP-3"
    assert not entity.dead_published and entity.history[-1] == "given_up"
    assert state.audits[-1]["action"] == "give_up"


def test_no_ids_is_refused() -> None:
    _, deps = waiting_ledger()
    with pytest.raises(ValueError):
        retry_now([], operator="ana", deps=deps)
