"""An unknown outcome whose read-backs fail through an outage of Capillary: the circuit hears
of it, the entity is not given up while the outage lasts, and the coupon is found after."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.conftest import World
from worker.domain.events import LoyaltyEvent, parse_event_data
from worker.domain.model import EntityState
from worker.usecases.issue import issue_event

SERIES = 544770


def event() -> LoyaltyEvent:
    return parse_event_data({"eventId": "e-1", "customer": {"id": "566881933"},
                             "seriesIds": [SERIES]})


def test_read_backs_failing_through_an_outage_find_the_coupon_once_it_ends(
        world: World) -> None:
    # Given a call whose answer was lost after Capillary issued, and a search (the read-back
    # API) answering 503 for the next 20 s: shorter than the unknown outcome's floor (the
    # settle window and the backoff's cap: 24 s here), longer than the three attempts take
    world.api.fail_next("timeout_after_issue")
    world.api.read_backs_down_until = world.clock() + timedelta(seconds=20)
    issue_event(event(), source="task", deps=world.deps)
    opened = False
    # When the sweeper and the retries run every second for a minute
    for _ in range(60):
        world.clock.advance(1)
        world.sweep_and_retry()
        opened = opened or world.deps.circuit.state().state == "open"
        assert world.entity(SERIES).state is not EntityState.DEAD, "given up mid-outage"
    # Then the read-backs failed, and the outage seen only through them opened the circuit
    entity = world.entity(SERIES)
    assert world.api.read_backs >= 3 and opened
    # ... and, once the search answered again, the read-back found our coupon: issued, once,
    # never sent again, and the circuit closed
    assert entity.state is EntityState.ISSUED
    assert len(world.api.bulk_calls) == 1 and len(world.api.issued) == 1
    assert world.deps.circuit.state().state == "closed"
    assert entity.attempts <= world.deps.retry_policy.max_attempts


def test_an_outage_longer_than_the_floor_still_ends_dead_as_unknown(world: World) -> None:
    world.api.fail_next("timeout_after_issue")
    world.api.read_backs_down_until = world.clock() + timedelta(hours=1)
    issue_event(event(), source="task", deps=world.deps)
    for _ in range(300):
        world.clock.advance(1)
        world.sweep_and_retry()
    entity = world.entity(SERIES)
    assert entity.state is EntityState.DEAD and entity.last_error_code == "unknown_outcome"
    assert entity.needs_reconcile and len(world.api.bulk_calls) == 1


def test_a_read_back_that_answers_ends_the_run_of_failures(world: World) -> None:
    # Given an unknown outcome, then a read-back that fails (two failures in a row, of three
    # that open the circuit)
    world.api.fail_next("timeout_before_issue", "read_back_fails")
    issue_event(event(), source="task", deps=world.deps)
    world.clock.advance(2)
    world.sweep_and_retry()
    assert world.deps.circuit.state().consecutive_failures == 2
    # When the next read-back gets an answer (nothing there yet: the window is still open)
    world.clock.advance(5)
    world.sweep_and_retry()
    # Then Capillary answered: the count starts again, as after an answered call
    assert world.api.read_backs == 2
    assert world.deps.circuit.state().consecutive_failures == 0


def test_a_throttled_read_back_waits_for_retry_after_without_spending_the_attempt(
        world: World) -> None:
    world.api.fail_next("timeout_after_issue", "read_back_throttled")
    issue_event(event(), source="task", deps=world.deps)
    world.clock.advance(2)
    world.sweep_and_retry()
    entity = world.entity(SERIES)
    # A 429 is about our pace, not Capillary's health nor the coupon: the attempt is given
    # back, the entity waits Retry-After (2 s) and the circuit hears nothing
    assert world.api.read_backs == 1 and entity.attempts == 1
    assert entity.state is EntityState.RETRY_WAIT and entity.needs_reconcile
    assert entity.next_attempt_at == world.clock() + timedelta(seconds=2)
    assert world.deps.circuit.state().consecutive_failures == 1  # the lost answer's alone
    world.clock.advance(2)
    world.sweep_and_retry()
    assert world.entity(SERIES).state is EntityState.ISSUED and len(world.api.issued) == 1
