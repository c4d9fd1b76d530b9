"""The circuit breaker's row: its state read, saved, a failure counted, a probe taken.

One row per circuit, shared by the fleet; ``worker.adapters.postgres.circuit`` decides with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from worker.adapters.postgres import hot_path
from worker.adapters.postgres import models as m
from worker.adapters.postgres.records import CLOSED_CIRCUIT, CircuitState
from worker.adapters.postgres.tables import SessionBound


class CircuitLedger(Protocol):
    """The fleet-wide circuit's state (``worker.adapters.postgres.circuit``)."""

    def circuit(self, name: str) -> CircuitState: ...

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None: ...

    def count_failure(self, name: str, *, now: datetime) -> CircuitState: ...

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool: ...


class CircuitStatements(SessionBound):
    """``CircuitLedger`` on PostgreSQL."""

    def circuit(self, name: str) -> CircuitState:
        # Every pool process reads it once a second, between an event's claim and its call:
        # one statement alone, not BEGIN, SELECT and ROLLBACK through a session.
        rows = self._alone(hot_path.CIRCUIT_STATE, {"name": name})
        return CircuitState(*rows[0]) if rows else CLOSED_CIRCUIT

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None:
        values = {
            "state": state.state, "consecutive_failures": state.consecutive_failures,
            "times_opened": state.times_opened, "open_until": state.open_until,
            "reason": state.reason, "updated_at": now,
        }
        self.session.execute(
            pg_insert(m.CircuitBreaker).values(name=name, **values)
            .on_conflict_do_update(index_elements=["name"], set_=values)
        )

    def count_failure(self, name: str, *, now: datetime) -> CircuitState:
        """Add one consecutive failure, fleet-wide, and return the new state (row locked)."""
        cb = m.CircuitBreaker
        row = self.session.execute(
            pg_insert(cb).values(name=name, consecutive_failures=1, updated_at=now)
            .on_conflict_do_update(
                index_elements=["name"],
                set_={"consecutive_failures": cb.consecutive_failures + 1, "updated_at": now},
            )
            .returning(cb.state, cb.consecutive_failures, cb.times_opened, cb.open_until,
                       cb.reason)
        ).one()
        return CircuitState(*row)

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool:
        """Become the one worker that probes an open circuit whose pause is over."""
        cb = m.CircuitBreaker
        won = self.session.execute(
            update(cb)
            .where(cb.name == name, cb.state.in_(("open", "half_open")), cb.open_until <= now)
            .values(state="half_open", open_until=probe_until, updated_at=now)
            .returning(cb.name)
            .execution_options(synchronize_session=False)
        ).first()
        return won is not None
