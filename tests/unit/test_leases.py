"""Claims are renewed while their task runs, up to its deadline; a lapsed one sends nothing."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pytest

from tests.unit.conftest import World
from worker.domain.errors import ClaimLapsed
from worker.domain.events import parse_event_data
from worker.usecases import issue
from worker.usecases.leases import SEND_MARGIN_S, LeaseKeeper


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Renewals:
    """The ledger side of a heartbeat: which tokens it is asked for, which it still holds."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.held: set[str] = set()
        self.fail = False

    def __call__(self, tokens: Sequence[str], entity_ids: Sequence[int],
                 lease_s: float) -> Collection[str]:
        if self.fail:
            raise ConnectionError("database unreachable")
        self.asked.append(list(tokens))
        return self.held & set(tokens)


def keeper(renewals: Renewals, clock: Clock) -> LeaseKeeper:
    return LeaseKeeper(renewals, lease_s=30, interval_s=10, deadline_s=115, clock=clock)


def test_a_held_claim_is_renewed_while_its_task_runs_and_forgotten_after() -> None:
    clock, renewals = Clock(), Renewals()
    leases = keeper(renewals, clock)
    renewals.held = {"a"}
    with leases.hold("a", [1, 2]) as held:
        assert held.valid_until == 1030
        clock.t += 25
        assert leases.renew_due() == 1
        # Renewed from the moment the heartbeat started, not from the claim
        assert held.valid_until == 1055
        clock.t += 28
        assert held.may_send()
    assert leases.renew_due() == 0
    assert renewals.asked == [["a"]]


def test_renewals_stop_at_the_task_deadline() -> None:
    clock, renewals = Clock(), Renewals()
    leases = keeper(renewals, clock)
    renewals.held = {"hung"}
    with leases.hold("hung", [1]) as held:
        clock.t += 114
        assert leases.renew_due() == 1
        clock.t += 2  # past the deadline (115 s): a hung task's claim is let go
        assert leases.renew_due() == 0
        assert held.valid_until == 1000 + 114 + 30


def test_a_claim_whose_renewals_fail_lapses_and_may_not_send() -> None:
    clock, renewals = Clock(), Renewals()
    leases = keeper(renewals, clock)
    renewals.fail = True
    with leases.hold("a", [1]) as held:
        clock.t += 20
        assert leases.renew_due() == 0
        assert held.may_send()
        clock.t += 30 - 20 - SEND_MARGIN_S
        assert not held.may_send(), "too close to the end of the lease to start a call"


def test_a_claim_the_ledger_no_longer_holds_is_not_extended() -> None:
    clock, renewals = Clock(), Renewals()
    leases = keeper(renewals, clock)
    with leases.hold("taken-back", [1]) as held:
        clock.t += 10
        assert leases.renew_due() == 0
        assert held.valid_until == 1030


def test_a_task_whose_claim_lapsed_sends_nothing(world: World) -> None:
    # Given a process whose heartbeat cannot reach the ledger, and a slow rate-limit slot
    clock, renewals = Clock(), Renewals()
    renewals.fail = True
    world.deps.leases = LeaseKeeper(renewals, lease_s=30, interval_s=10, deadline_s=115,
                                    clock=clock)

    def slow_slot(_name: str = "bulk_issue") -> float:
        clock.t += 31  # the heartbeats meanwhile all failed
        world.deps.leases.renew_due()
        return 0.0

    world.limiter.reserve = slow_slot  # type: ignore[method-assign]
    event = parse_event_data({"eventId": "e-1", "customer": {"id": "7"}, "seriesIds": [1]})
    # When the event is issued, its lease lapses while it waits for the slot
    with pytest.raises(ClaimLapsed):
        issue.issue_event(event, source="bus", deps=world.deps)
    # Then no call went out, and the entity is still in flight, for the sweeper to take back
    assert world.api.bulk_calls == []
    entity, = world.state.entities.values()
    assert entity.state == "in_flight"
