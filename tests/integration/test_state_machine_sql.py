"""The database enforces the domain's entity state machine on every statement, not only the
statements the ledger's code happens to write."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from worker.domain.model import EntityState, can_transition


def test_the_database_allows_exactly_the_moves_of_the_domain(engine: Engine) -> None:
    with engine.connect() as conn:
        in_sql = {(a, b) for a, b in conn.execute(
            text("SELECT from_state, to_state FROM entity_transitions"))}
    in_domain = {(a.value, b.value) for a in EntityState for b in EntityState
                 if a is not b and can_transition(a, b)}
    assert in_sql == in_domain, "a change to the state machine needs a migration of its table"


def _entity_in(engine: Engine, state: str) -> int:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO events (event_id, event_type, customer_key, customer, series_ids, "
            "metadata, payload, fingerprint, issue_ref, source) VALUES ('sm-1', 'tier', 'id:1', "
            "'{}', '{1}', '{}', '{}', 'f', 'cw:sm', 'test')"))
        return int(conn.execute(text(
            "INSERT INTO entities (event_id, series_id, customer_key, state) "
            "VALUES ('sm-1', 1, 'id:1', :state) RETURNING id"), {"state": state}).scalar_one())


def _move(engine: Engine, entity_id: int, state: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE entities SET state = :state WHERE id = :id"),
                     {"state": state, "id": entity_id})


def _state(engine: Engine, entity_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT state FROM entities WHERE id = :id"),
                                {"id": entity_id}).scalar_one())


@pytest.mark.parametrize(("start", "illegal"), [
    ("issued", "retry_wait"),      # an issued coupon is never retried
    ("discarded", "queued"),       # a discarded entity is never replayed
    ("pending", "dead"),           # nothing dies without an attempt
    ("duplicate_issued", "issued"),
])
def test_an_illegal_move_is_refused_by_the_database(clean_ledger: Engine, start: str,
                                                    illegal: str) -> None:
    entity_id = _entity_in(clean_ledger, start)
    with pytest.raises(IntegrityError, match="cannot move"):
        _move(clean_ledger, entity_id, illegal)
    assert _state(clean_ledger, entity_id) == start


def test_allowed_moves_and_other_columns_go_through(clean_ledger: Engine) -> None:
    entity_id = _entity_in(clean_ledger, "pending")
    for state in ("in_flight", "retry_wait", "queued", "in_flight", "issued"):
        _move(clean_ledger, entity_id, state)
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET attempts = attempts + 1 WHERE id = :id"),
                     {"id": entity_id})
    assert _state(clean_ledger, entity_id) == "issued"
