"""The ledger the use cases are handed, behind the ``Ledger`` protocol.

``Ledger`` is every part at once: each consumer depends on its own part only (the hot path's
``IssuingLedger``, ``SweeperLedger``, ``CircuitLedger``, support's ``SupportLedger``...), and
``SqlLedger`` (PostgreSQL) and the in-memory fake (``coupon_devtools.fakes.ledger``) implement
them all. The statements live in the parts' modules: ``issuing``, ``sweeping``,
``circuit_store`` and ``support``, over the shared ``tables``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from worker.adapters.postgres.circuit_store import CircuitLedger, CircuitStatements
from worker.adapters.postgres.issuing import (
    DeliveryLedger,
    IssuingLedger,
    IssuingStatements,
    LeaseLedger,
    RejectionLedger,
)
from worker.adapters.postgres.support import (
    RejectedRow,
    Selection,
    SupportLedger,
    SupportRepository,
    Target,
)
from worker.adapters.postgres.sweeping import SweeperLedger, SweeperStatements


class Ledger(IssuingLedger, RejectionLedger, LeaseLedger, DeliveryLedger, SweeperLedger,
             CircuitLedger, SupportLedger, Protocol):
    """The ledger operations of the use cases; ``SqlLedger`` and ``InMemoryLedger`` agree."""


class SqlLedger(IssuingStatements, SweeperStatements, CircuitStatements):
    """The ``Ledger`` on PostgreSQL, inside the unit of work's session."""

    @property
    def _support(self) -> SupportRepository:
        return SupportRepository(self.session)

    # -- operator actions (SupportLedger), in ``worker.adapters.postgres.support``
    # ---------------------

    def support_targets(self, selection: Selection) -> list[Target]:
        return self._support.select(selection)

    def lock_target(self, entity_id: int) -> Target | None:
        return self._support.lock(entity_id)

    def requeue_target(self, target: Target, *, now: datetime, reset_attempts: bool) -> None:
        self._support.requeue(target, now=now, reset_attempts=reset_attempts)

    def discard_target(self, target: Target, *, now: datetime) -> None:
        self._support.discard(target, now=now)

    def make_due(self, target: Target, *, now: datetime) -> None:
        self._support.make_due(target, now=now)

    def give_up(self, target: Target, *, reason: str, now: datetime) -> None:
        self._support.give_up(target, reason=reason, now=now)

    def operator_history(self, target: Target, *, kind: str, state: str, message: str,
                         operator: str, now: datetime) -> None:
        self._support.history(target, kind=kind, state=state, message=message,
                              operator=operator, now=now)

    def resume_deferred(self, error_code: str, *, now: datetime) -> int:
        return self._support.resume_deferred(error_code, now=now)

    def audit(self, *, action: str, operator: str, reason: str, outcome: str, now: datetime,
              entity_id: int | None = None, event_id: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        self._support.audit(action=action, operator=operator, reason=reason, outcome=outcome,
                            now=now, entity_id=entity_id, event_id=event_id, details=details)

    def lock_rejected(self, rejected_id: int) -> RejectedRow | None:
        return self._support.lock_rejected(rejected_id)

    def link_resubmission(self, rejected_id: int, *, event_id: str, now: datetime) -> None:
        self._support.link_resubmission(rejected_id, event_id=event_id, now=now)


    def event_fingerprint(self, event_id: str) -> tuple[str, str] | None:
        return self._support.event_fingerprint(event_id)
