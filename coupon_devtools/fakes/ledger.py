"""An in-memory ``Ledger`` and unit of work, for fast unit tests of the services.

It keeps the same rules as ``SqlLedger`` (what may be claimed, when a claim is lost, which
outcomes survive a lost claim), and ``tests/integration/test_ledger_contract.py`` runs the same
scenarios against both so they cannot drift apart.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from coupon_devtools.fakes.ledger_issuing import FakeIssuing
from coupon_devtools.fakes.ledger_state import FakeState
from coupon_devtools.fakes.ledger_support import FakeSupport
from coupon_devtools.fakes.ledger_sweeping import FakeSweeping
from worker.adapters.postgres.records import CLOSED_CIRCUIT, CircuitState
from worker.adapters.postgres.repository import Ledger


class InMemoryLedger(FakeIssuing, FakeSweeping, FakeSupport):
    """The ``Ledger`` protocol over plain dicts: one part per consumer (``ledger_issuing``,
    ``ledger_sweeping``, ``ledger_support``) and the circuit's row here."""

    def circuit(self, name: str) -> CircuitState:
        return self.state.circuits.get(name, CLOSED_CIRCUIT)

    def save_circuit(self, name: str, state: CircuitState, *, now: datetime) -> None:
        self.state.circuits[name] = state

    def count_failure(self, name: str, *, now: datetime) -> CircuitState:
        current = self.circuit(name)
        updated = replace(current, consecutive_failures=current.consecutive_failures + 1)
        self.state.circuits[name] = updated
        return updated

    def try_probe(self, name: str, *, now: datetime, probe_until: datetime) -> bool:
        current = self.circuit(name)
        if current.state in ("open", "half_open") and current.open_until is not None \
                and current.open_until <= now:
            self.state.circuits[name] = replace(current, state="half_open",
                                                open_until=probe_until)
            return True
        return False


class FakeUnitOfWork:
    """Rolls back (restores a snapshot) unless ``commit()`` was called."""

    def __init__(self, state: FakeState) -> None:
        self._state = state
        self.ledger = InMemoryLedger(state)
        self.commits = 0
        self._snapshot: FakeState | None = None

    def __enter__(self) -> Self:
        self._snapshot = copy.deepcopy(self._state)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._snapshot is not None:
            self.rollback()

    def commit(self) -> None:
        self._snapshot = None
        self.commits += 1

    def rollback(self) -> None:
        if self._snapshot is not None:
            snapshot = self._snapshot
            self._state.__dict__.update(snapshot.__dict__)
            self._snapshot = None


def _implements_the_protocol(state: FakeState) -> Ledger:
    """Never called: mypy checks here that the fake implements the whole ``Ledger``."""
    return InMemoryLedger(state)


def fake_unit_of_work_factory(state: FakeState | None = None) -> tuple[FakeState, Any]:
    """A shared state and a factory of units of work over it."""
    shared = state or FakeState()
    return shared, lambda: FakeUnitOfWork(shared)
