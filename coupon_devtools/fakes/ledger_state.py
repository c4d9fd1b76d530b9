"""The in-memory ledger's state (``FakeState``, ``FakeEntity``) and what its parts share.

``FakePart`` is each part of the fake (``ledger_issuing``, ``ledger_sweeping``,
``ledger_support``) over one ``FakeState``: the event states recomputed, an abandoned claim
told, PostgreSQL's refusals of text met.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from worker.adapters.postgres.records import CircuitState, RecordedCall
from worker.domain.errors import LedgerError
from worker.domain.model import (
    ISSUED_STATES,
    Coupon,
    EntityState,
    event_state,
)


@dataclass
class FakeEntity:
    id: int
    event_id: str
    series_id: int
    customer_key: str
    state: EntityState = EntityState.PENDING
    attempts: int = 0
    needs_reconcile: bool = False
    claim_token: str | None = None
    lease_until: datetime | None = None
    next_attempt_at: datetime | None = None
    queued_at: datetime | None = None
    first_attempt_at: datetime | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None
    last_verdict: str | None = None
    last_request_id: str | None = None
    dead_reason: str | None = None
    dead_at: datetime | None = None
    dead_published: bool = False
    settles_at: datetime | None = None
    verify_after: datetime | None = None
    history: list[str] = field(default_factory=list)


@dataclass
class FakeState:
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    entities: dict[int, FakeEntity] = field(default_factory=dict)
    coupons: dict[int, Any] = field(default_factory=dict)
    extra_coupons: dict[int, list[Coupon]] = field(default_factory=dict)
    calls: list[RecordedCall] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    circuits: dict[str, CircuitState] = field(default_factory=dict)
    ids: Any = field(default_factory=lambda: itertools.count(1))
    #: Operator actions, as ``operator_actions`` rows.
    audits: list[dict[str, Any]] = field(default_factory=list)
    #: ``message_failures`` rows, by key.
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeState:
        clone = FakeState(
            copy.deepcopy(self.events, memo), copy.deepcopy(self.entities, memo),
            dict(self.coupons), copy.deepcopy(self.extra_coupons, memo), list(self.calls),
            copy.deepcopy(self.rejections, memo), dict(self.circuits),
            audits=list(self.audits), failures=copy.deepcopy(self.failures, memo),
        )
        clone.ids = self.ids  # ids are never reused, even after a rollback
        return clone


_ISSUED_STATES = ISSUED_STATES


def _settles_after_lease(entity: FakeEntity, settle_window_s: float) -> datetime:
    assert entity.lease_until is not None
    after_lease = entity.lease_until + timedelta(seconds=settle_window_s)
    return max(entity.settles_at, after_lease) if entity.settles_at else after_lease


def _pg_text(*values: str | None) -> None:
    """Refuse what a PostgreSQL text column refuses, so unit tests meet the same wall."""
    for value in values:
        if value is None:
            continue
        if "\x00" in value:
            raise LedgerError("database error: PostgreSQL text fields cannot contain NUL "
                              "(0x00) bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LedgerError(f"database error: {exc}") from None

class FakePart:
    """A part of ``InMemoryLedger`` over a shared ``FakeState``."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    @staticmethod
    def _abandoned(entity: FakeEntity, now: datetime) -> bool:
        return entity.state is EntityState.IN_FLIGHT and entity.lease_until is not None \
            and entity.lease_until < now

    def _refresh(self, event_id: str) -> None:
        self.state.events[event_id]["state"] = event_state(
            e.state for e in self.state.entities.values() if e.event_id == event_id)


    def refresh_event_states(self, event_ids: Iterable[str], *, now: datetime) -> None:
        for event_id in sorted(set(event_ids)):
            self._refresh(event_id)
