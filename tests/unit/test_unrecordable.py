"""An outcome the ledger refuses (not an outage) ends in a dead letter, not a lease loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from coupon_devtools.fakes.ledger import FakeUnitOfWork, InMemoryLedger
from tests.unit.conftest import World
from worker.adapters.postgres.records import Claim, RecordedCall, Transition
from worker.domain.errors import LedgerError
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState, describe_error
from worker.domain.policy import OUTCOME_UNRECORDABLE
from worker.usecases.issue import issue_event
from worker.usecases.sweep import sweep

REFUSED_SERIES = 553379


class RefusingLedger(InMemoryLedger):
    """Refuses any outcome that carries a coupon of ``REFUSED_SERIES``, as PostgreSQL refuses
    a value it cannot store, every time."""

    def record(self, claim: Claim, *, calls: Sequence[RecordedCall],
               transitions: Sequence[Transition], worker: str, now: datetime) -> int:
        if any(t.coupon is not None and t.coupon.series_id == REFUSED_SERIES
               for t in transitions):
            raise LedgerError("database error: the coupon's value cannot be stored")
        return super().record(claim, calls=calls, transitions=transitions, worker=worker,
                              now=now)


def refusing(world: World) -> World:
    def uow() -> FakeUnitOfWork:
        unit = FakeUnitOfWork(world.state)
        unit.ledger = RefusingLedger(world.state)
        return unit

    return replace(world, deps=replace(world.deps, uow=uow))


def test_a_refused_outcome_is_dead_lettered_and_the_others_recorded(world: World) -> None:
    world = refusing(world)
    event = parse_event_data({"eventId": "e-1", "customer": {"id": "566881933"},
                              "seriesIds": [544770, REFUSED_SERIES]})
    report = issue_event(event, source="bus", deps=world.deps)
    # The other series' coupon is recorded as usual
    assert (report.issued, report.dead) == (1, 1)
    assert world.entity(544770).state is EntityState.ISSUED
    assert [c.series_id for c in world.state.coupons.values()] == [544770]
    # The refused one is dead, says what Capillary answered, and reads back first if replayed
    refused = world.entity(REFUSED_SERIES)
    code = next(i.code for i in world.api.issued if i.series_id == REFUSED_SERIES)
    assert refused.state is EntityState.DEAD
    assert refused.last_error_code == OUTCOME_UNRECORDABLE
    assert refused.needs_reconcile
    assert refused.dead_reason is not None
    assert f"coupon {code}" in refused.dead_reason
    assert "cannot be stored" in refused.dead_reason
    assert refused.dead_reason.endswith(
        "check before replaying (a replay reads back first)")
    assert world.state.events["e-1"]["state"] == "failed"
    # And it reaches the dead-letter queue, once, with nothing sent again meanwhile
    world.clock.advance(600)
    world.sweep_and_retry()
    sweep(world.deps)
    assert [m["seriesId"] for m in world.publisher.dead_letters] == [REFUSED_SERIES]
    assert world.api.bulk_calls == [[544770, REFUSED_SERIES]]
    assert world.api.read_backs == 0


def test_listings_say_what_the_code_means() -> None:
    assert "refused to store" in describe_error(OUTCOME_UNRECORDABLE)
