"""The ledger's tables and the statements its parts share, built once.

Building a statement costs more CPU than running it through the driver, and an event runs a
dozen of them, so those on the path of every event are built here once and executed on the
session's connection with bound parameters (names prefixed ``b_`` so they never clash with
column names). ``SessionBound`` is what each part of the ledger (``issuing``, ``sweeping``,
``circuit_store``) runs its statements on: the unit of work's session, or a transaction of its
own for a statement that runs alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Float,
    Table,
    and_,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import insert as pg_insert

from worker.adapters.postgres import hot_path
from worker.adapters.postgres import models as m
from worker.adapters.postgres.driver import run_alone
from worker.domain.model import ISSUED_STATES, TERMINAL_STATES, Coupon, EntityState


def _values(states: frozenset[EntityState]) -> tuple[str, ...]:
    return tuple(sorted(s.value for s in states))


EVENTS = cast(Table, m.Event.__table__)
ENTITIES = cast(Table, m.Entity.__table__)
HISTORY = cast(Table, m.EntityHistory.__table__)
CALLS = cast(Table, m.ApiCall.__table__)
COUPONS = cast(Table, m.IssuedCoupon.__table__)
_E = ENTITIES.c
_IN_FLIGHT = EntityState.IN_FLIGHT.value
# Plain ``issued`` first: verification moves ``_ISSUED_STATES[0]`` only.
_ISSUED_STATES = (EntityState.ISSUED.value,
                  *_values(ISSUED_STATES - {EntityState.ISSUED}))
_INSERT_HISTORY = insert(HISTORY)
_INSERT_COUPONS = pg_insert(COUPONS).on_conflict_do_nothing(
    index_elements=["entity_id", "code"])


def _number(name: str) -> Any:
    # Typed in the SQL itself: PostgreSQL cannot infer a parameter's type from "$1 IS NULL".
    return sql_cast(bindparam(name, type_=Float), Float)


def _seconds(name: str) -> Any:
    """A bound number of seconds as an interval, for arithmetic on the database's clock."""
    return _number(name) * literal_column("interval '1 second'")


# Leases, settle times and verification times are read and written on the database's clock
# (now()), never a host's: two hosts whose clocks disagree must still agree on whether a
# claim is alive, or both would call Capillary for one entity.
_DB_NOW = func.now()
_ABANDONED = and_(_E.state == _IN_FLIGHT, _E.lease_until < _DB_NOW)
# A dead worker's call was sent before its lease ran out and may land until the window after.
_SETTLES_AFTER_LEASE = func.greatest(
    func.coalesce(_E.settles_at, _E.lease_until), _E.lease_until + _seconds("b_settle_s"))


_NOW = bindparam("b_now", type_=DateTime(timezone=True))


_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_EVENT_IDS: Any = bindparam("b_event_ids", expanding=True)
# Lock first, in a statement of its own: two transactions finishing different entities of one
# event would otherwise each read the other's entity as unfinished (READ COMMITTED snapshots
# are taken per statement) and both leave the event "processing".
_LOCK_EVENTS = (
    select(EVENTS.c.event_id).where(EVENTS.c.event_id.in_(_EVENT_IDS))
    .order_by(EVENTS.c.event_id).with_for_update()
)
_REFRESH_EVENTS = (
    update(EVENTS)
    .where(EVENTS.c.event_id.in_(_EVENT_IDS))
    .values(
        # The outcome statement's rule, written once (``hot_path.event_state_sql``).
        state=select(literal_column(hot_path.event_state_sql("entities.state")))
        .select_from(ENTITIES)
        .where(_E.event_id == EVENTS.c.event_id).scalar_subquery(),
        updated_at=_NOW,
    )
)


def _coupon_row(c: Coupon, entity_id: int, event_id: str, customer_key: str, via: str,
                request_id: str | None, now: datetime) -> dict[str, Any]:
    """The whole ``coupons`` row: the outcome statement's mapping (``hot_path.coupon_row``)
    with the event, the customer and the time."""
    return {**hot_path.coupon_row(c, entity_id, via, request_id), "event_id": event_id,
            "customer_key": customer_key, "issued_at": now}


class Sessions(Protocol):
    """Where a ``SqlLedger`` gets its session, and its engine for the statements run alone."""

    @property
    def engine(self) -> Engine: ...

    @property
    def session(self) -> Connection: ...

    def in_transaction(self) -> bool: ...


class SessionBound:
    """A part of the ledger, on the unit of work's session."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    @property
    def session(self) -> Connection:
        return self._sessions.session

    @property
    def _conn(self) -> Any:
        return self.session

    def _alone(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement; as a transaction of its own when nothing ran before it.

        A single statement is atomic, so running it in autocommit saves the BEGIN and the
        COMMIT round trips. Should the unit of work already hold a transaction (it ran other
        statements first), the statement joins it instead and commits with it.
        """
        if self._sessions.in_transaction():
            return list(self.session.exec_driver_sql(sql, params).all())
        return run_alone(self._sessions.engine, sql, params)

    def refresh_event_states(self, event_ids: Iterable[str], *, now: datetime) -> None:
        """Recompute the summary state of events from their entities."""
        ids = sorted(set(event_ids))
        if ids:
            conn = self._conn
            conn.execute(_LOCK_EVENTS, {"b_event_ids": ids})
            conn.execute(_REFRESH_EVENTS, {"b_event_ids": ids, "b_now": now})
