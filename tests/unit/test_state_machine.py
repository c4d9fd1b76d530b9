"""The entity state machine: one table, walked here, used by the SQL ledger and the fake."""

from __future__ import annotations

import pytest

from worker.domain.model import (
    CLAIMABLE_FOR_RETRY,
    CLAIMABLE_FRESH,
    CLAIMABLE_WHEN_DUE,
    DISCARDABLE,
    EVENT_REPLAYABLE,
    ISSUED_STATES,
    REPLAYABLE,
    TERMINAL_STATES,
    TRANSITIONS,
    EntityState,
    IllegalTransition,
    can_transition,
    check_transition,
)

S = EntityState


def reachable_from(start: EntityState) -> set[EntityState]:
    seen, todo = {start}, [start]
    while todo:
        for new in TRANSITIONS[todo.pop()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(EntityState)


def test_every_state_is_reachable_from_a_new_entity() -> None:
    assert reachable_from(S.PENDING) == set(EntityState)


def test_every_claimable_state_can_be_claimed() -> None:
    for state in CLAIMABLE_FRESH | CLAIMABLE_FOR_RETRY:
        assert can_transition(state, S.IN_FLIGHT), state
    assert CLAIMABLE_WHEN_DUE <= CLAIMABLE_FOR_RETRY
    assert not (CLAIMABLE_FRESH & CLAIMABLE_FOR_RETRY), "a fresh delivery never takes a retry"


def test_only_a_claim_leads_in_flight_and_nothing_at_rest_is_claimed() -> None:
    into_flight = {state for state, moves in TRANSITIONS.items() if S.IN_FLIGHT in moves}
    # An in-flight entity is re-claimed only once its lease ran out (its worker is gone).
    assert into_flight == CLAIMABLE_FRESH | CLAIMABLE_FOR_RETRY | {S.IN_FLIGHT}
    assert not (into_flight & TERMINAL_STATES)


def test_an_attempt_ends_issued_waiting_or_dead() -> None:
    assert TRANSITIONS[S.IN_FLIGHT] - {S.IN_FLIGHT} == {
        S.ISSUED, S.DUPLICATE_ISSUED, S.RETRY_WAIT, S.DEAD}


def test_states_at_rest_move_only_by_a_person_or_by_proof_of_a_second_coupon() -> None:
    assert TRANSITIONS[S.ISSUED] == {S.DUPLICATE_ISSUED}
    assert TRANSITIONS[S.DEAD] == {S.QUEUED, S.DISCARDED}
    assert TRANSITIONS[S.DISCARDED] == TRANSITIONS[S.DUPLICATE_ISSUED] == frozenset()


def test_what_a_person_replays_or_discards_can_move_there() -> None:
    for state in REPLAYABLE | EVENT_REPLAYABLE:
        assert can_transition(state, S.QUEUED), state
    for state in DISCARDABLE:
        assert can_transition(state, S.DISCARDED), state


@pytest.mark.parametrize("state", sorted(set(EntityState) - ISSUED_STATES))
def test_proof_of_a_coupon_is_recorded_whatever_the_state(state: EntityState) -> None:
    assert can_transition(state, S.ISSUED)
    assert can_transition(state, S.DUPLICATE_ISSUED)


def test_an_issued_entity_is_not_recorded_issued_twice() -> None:
    assert not can_transition(S.ISSUED, S.ISSUED)
    assert not can_transition(S.DUPLICATE_ISSUED, S.ISSUED)


@pytest.mark.parametrize(("current", "new"), [
    (S.PENDING, S.DEAD), (S.PENDING, S.RETRY_WAIT), (S.QUEUED, S.DEAD),
    (S.DISCARDED, S.QUEUED), (S.ISSUED, S.RETRY_WAIT), (S.DEAD, S.IN_FLIGHT),
])
def test_an_illegal_move_is_refused(current: EntityState, new: EntityState) -> None:
    assert not can_transition(current, new)
    with pytest.raises(IllegalTransition):
        check_transition(current, new)
