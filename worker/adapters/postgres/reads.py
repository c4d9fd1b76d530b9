"""The read side's statements: what support engineers, the console and the dashboards ask of
the ledger, each named by what it asks.

They return rows as PostgreSQL gives them (mappings, counts); ``worker.usecases.queries``
turns them into the plain dicts the pages and ``--json`` show. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, func, select, union

from worker.adapters.postgres import models as m
from worker.adapters.postgres.dead_letter_groups import read as read_dead_letter_groups
from worker.adapters.postgres.support import Selection

# -- one entity, one event ---------------------------------------------------------------------


def entity_state_counts(engine: Engine) -> dict[str, int]:
    """Entities per state."""
    with engine.connect() as conn:
        rows = conn.execute(select(m.Entity.state, func.count()).group_by(m.Entity.state))
        return {state: int(count) for state, count in rows}


def entity(conn: Connection, entity_id: int) -> RowMapping | None:
    """The entity's row, every column."""
    e = m.Entity
    return conn.execute(select(e.__table__).where(e.id == entity_id)).mappings().first()


def entity_history(conn: Connection, entity_id: int) -> Sequence[RowMapping]:
    """The entity's history, oldest first."""
    h = m.EntityHistory
    return conn.execute(
        select(h.at, h.kind, h.state, h.attempt, h.error_code, h.message, h.request_id,
               h.worker)
        .where(h.entity_id == entity_id).order_by(h.id)
    ).mappings().all()


def entity_calls(conn: Connection, entity_id: int) -> Sequence[RowMapping]:
    """The calls to Capillary that carried the entity, oldest first."""
    c = m.ApiCall
    return conn.execute(
        select(c.started_at, c.operation, c.request_id, c.http_status, c.latency_ms, c.outcome,
               c.error_code, c.error_message, c.series_ids, c.worker)
        .where(c.entity_ids.contains([entity_id])).order_by(c.id)
    ).mappings().all()


def entity_coupons(conn: Connection, entity_id: int) -> Sequence[RowMapping]:
    """The coupons recorded for the entity, first recorded first."""
    c = m.IssuedCoupon
    return conn.execute(
        select(c.__table__).where(c.entity_id == entity_id).order_by(c.id)
    ).mappings().all()


def entity_operator_actions(conn: Connection, entity_id: int) -> Sequence[RowMapping]:
    """What operators did to the entity, oldest first."""
    a = m.OperatorAction
    return conn.execute(
        select(a.at, a.action, a.operator, a.reason, a.outcome)
        .where(a.entity_id == entity_id).order_by(a.id)
    ).mappings().all()


def event(conn: Connection, event_id: str) -> RowMapping | None:
    """The event's row, every column."""
    return conn.execute(
        select(m.Event.__table__).where(m.Event.event_id == event_id)
    ).mappings().first()


def event_rejections(conn: Connection, event_id: str) -> Sequence[RowMapping]:
    """The messages rejected under the event's id, oldest first."""
    r = m.RejectedEvent
    return conn.execute(
        select(r.id, r.received_at, r.source, r.reason, r.size_bytes)
        .where(r.event_id == event_id).order_by(r.id)
    ).mappings().all()


def event_entity_ids(conn: Connection, event_id: str) -> Sequence[int]:
    """The event's entities, by series."""
    return conn.execute(
        select(m.Entity.id).where(m.Entity.event_id == event_id).order_by(m.Entity.series_id)
    ).scalars().all()


def resubmitted_from(conn: Connection, event_id: str) -> list[int]:
    """The rejected messages support resubmitted as this event."""
    r = m.RejectedEvent
    return [int(x) for x in conn.execute(
        select(r.id).where(r.resubmitted_event_id == event_id).order_by(r.id)).scalars()]


def customer_event_ids(engine: Engine, *, keys: Sequence[str], term: str,
                       limit: int) -> Sequence[str]:
    """The events a support question names, newest first: a customer's (by ledger key), or
    the one event a coupon code, a Capillary request id or an event id belongs to."""
    by_code = select(m.IssuedCoupon.event_id).where(m.IssuedCoupon.code == term)
    by_request = select(m.ApiCall.event_id).where(m.ApiCall.request_id == term)
    ev = m.Event
    # One branch per way in, each through its own index: as one WHERE of four ORs, PostgreSQL
    # walked every event newest first, testing each (the whole table, on a large ledger).
    matches = union(*(
        select(ev.event_id, ev.received_at).where(condition)
        for condition in (ev.customer_key.in_(keys), ev.event_id == term,
                          ev.event_id.in_(by_code), ev.event_id.in_(by_request))
    )).subquery()
    with engine.connect() as conn:
        return conn.execute(
            select(matches.c.event_id).order_by(matches.c.received_at.desc()).limit(limit)
        ).scalars().all()


# -- rejected messages -------------------------------------------------------------------------


def rejected(engine: Engine, *, since: datetime | None, until: datetime | None,
             event_id: str | None, pending_only: bool, limit: int) -> Sequence[RowMapping]:
    """Rejected messages, newest first, without their raw bytes."""
    r = m.RejectedEvent
    query = (
        select(r.id, r.received_at, r.source, r.event_id, r.size_bytes, r.content_type,
               r.reason, r.kind, r.resubmitted_at, r.resubmitted_event_id)
        .order_by(r.id.desc()).limit(limit)
    )
    if since:
        query = query.where(r.received_at >= since)
    if until:
        query = query.where(r.received_at < until)
    if event_id:
        query = query.where(r.event_id == event_id)
    if pending_only:
        query = query.where(r.resubmitted_at.is_(None))
    with engine.connect() as conn:
        return conn.execute(query).mappings().all()


def rejected_message(conn: Connection, rejected_id: int) -> RowMapping | None:
    """One rejected message's row, its raw bytes included."""
    r = m.RejectedEvent
    return conn.execute(select(r.__table__).where(r.id == rejected_id)).mappings().first()


def rejected_resubmissions(conn: Connection, rejected_id: int) -> Sequence[RowMapping]:
    """Support's resubmissions of a rejected message, oldest first."""
    a = m.OperatorAction
    return conn.execute(
        select(a.at, a.action, a.operator, a.reason, a.outcome, a.event_id,
               a.details["os_user"].astext.label("os_user"))
        .where(a.action == "rejected_resubmit",
               a.details["rejected_id"].astext == str(rejected_id))
        .order_by(a.id)
    ).mappings().all()


# -- dead letters and duplicates ---------------------------------------------------------------


def dead_entities(conn: Connection, selection: Selection, *,
                  limit: int) -> Sequence[RowMapping]:
    """The entities ``selection`` names, newest dead first."""
    e = m.Entity
    return conn.execute(
        select(e.id, e.event_id, e.customer_key.label("customer"), e.series_id,
               e.state, e.last_error_code.label("error_code"),
               func.coalesce(e.dead_reason, "").label("reason"),
               e.last_error_message.label("message"), e.attempts, e.needs_reconcile,
               e.last_request_id.label("request_id"), e.dead_at)
        .where(*selection.conditions())
        .order_by(e.dead_at.desc().nullslast(), e.id.desc()).limit(limit)
    ).mappings().all()


def kept_messages(conn: Connection, selection: Selection, *, kind: str | None,
                  limit: int) -> Sequence[RowMapping]:
    """Messages kept as received (rejected, or dead-lettered by a failure of ours), of
    ``kind`` when given, within ``selection``'s event and time range, newest first."""
    r = m.RejectedEvent
    query = select(r.id, r.event_id, r.reason.label("message"), r.received_at,
                   r.source, r.size_bytes, r.kind.label("message_kind"),
                   ).order_by(r.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(r.kind == kind)
    if selection.event_id:
        query = query.where(r.event_id == selection.event_id)
    if selection.since:
        query = query.where(r.received_at >= selection.since)
    if selection.until:
        query = query.where(r.received_at < selection.until)
    return conn.execute(query).mappings().all()


def dead_letter_summary(engine: Engine, selection: Selection) -> Sequence[RowMapping]:
    """The entities ``selection`` names, grouped by error code and series: how many, since
    when, how many customers."""
    e = m.Entity
    with engine.connect() as conn:
        return conn.execute(
            select(e.last_error_code.label("error_code"), e.series_id,
                   func.count().label("count"), func.min(e.dead_at).label("first"),
                   func.max(e.dead_at).label("last"),
                   func.count(func.distinct(e.customer_key)).label("customers"))
            .where(*selection.conditions())
            .group_by(e.last_error_code, e.series_id)
            .order_by(func.count().desc(), e.last_error_code, e.series_id)
        ).mappings().all()


def dead_letter_groups(engine: Engine, *, limit: int) -> list[dict[str, Any]]:
    """Dead entities grouped by cause: error code x series x message, biggest first, from
    the summary a trigger keeps (``worker.adapters.postgres.dead_letter_groups``)."""
    with engine.connect() as conn:
        return read_dead_letter_groups(conn, limit=limit)


def duplicates(engine: Engine, *, limit: int) -> Sequence[RowMapping]:
    """Entities found holding more than one of our coupons, newest first, with their codes."""
    e, c = m.Entity, m.IssuedCoupon
    with engine.connect() as conn:
        return conn.execute(
            select(e.id, e.event_id, e.customer_key.label("customer"), e.series_id,
                   e.last_error_message.label("message"), e.updated_at.label("found_at"),
                   func.array_agg(c.code).label("codes"))
            .join(c, c.entity_id == e.id)
            .where(e.state == "duplicate_issued")
            .group_by(e.id).order_by(e.updated_at.desc(), e.id.desc()).limit(limit)
        ).mappings().all()


# -- the overview ------------------------------------------------------------------------------


def states_changed_since(conn: Connection, since: datetime) -> dict[str, int]:
    """Entities per state, of those changed since ``since``."""
    e = m.Entity
    rows = conn.execute(
        select(e.state, func.count()).where(e.updated_at >= since).group_by(e.state))
    return {state: int(n) for state, n in rows}


def unknown_outcomes_since(conn: Connection, since: datetime) -> int:
    """Entities changed since ``since`` still waiting to settle an unknown outcome."""
    e = m.Entity
    return int(conn.execute(
        select(func.count()).select_from(e).where(
            e.updated_at >= since, e.needs_reconcile.is_(True),
            e.state.in_(("retry_wait", "queued", "in_flight")))).scalar_one())


def issued_per_minute(engine: Engine, since: datetime) -> dict[datetime, int]:
    """Coupons recorded since ``since``, per minute (minutes with none are absent)."""
    c = m.IssuedCoupon
    bucket = func.date_trunc("minute", c.issued_at)
    with engine.connect() as conn:
        return {at: int(n) for at, n in conn.execute(
            select(bucket, func.count()).where(c.issued_at >= since).group_by(bucket))}


def calls_since(engine: Engine, since: datetime) -> int:
    """Calls to Capillary started since ``since``."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.ApiCall).where(
            m.ApiCall.started_at >= since)).scalar_one())


def circuit_states(engine: Engine) -> Sequence[RowMapping]:
    """The fleet-wide circuit breakers as they stand."""
    b = m.CircuitBreaker
    with engine.connect() as conn:
        return conn.execute(
            select(b.name, b.state, b.consecutive_failures, b.open_until, b.reason)
            .order_by(b.name)).mappings().all()


# -- the operator audit ------------------------------------------------------------------------


def _audit_query(operator: str | None, action: str | None, since: datetime | None,
                 until: datetime | None, columns: Sequence[Any]) -> Any:
    a = m.OperatorAction
    query = select(*columns).select_from(a)
    if operator:
        query = query.where(a.operator == operator)
    if action:
        query = query.where(a.action == action)
    if since:
        query = query.where(a.at >= since)
    if until:
        query = query.where(a.at < until)
    return query


def _audit_columns() -> list[Any]:
    a = m.OperatorAction
    return [a.id, a.at, a.action, a.operator, a.reason, a.outcome, a.entity_id, a.event_id,
            a.details]


def audit(engine: Engine, *, operator: str | None, action: str | None,
          since: datetime | None, until: datetime | None, limit: int) -> Sequence[RowMapping]:
    """The operator audit, newest first, filtered (a page of it)."""
    query = _audit_query(operator, action, since, until, _audit_columns())
    with engine.connect() as conn:
        return conn.execute(
            query.order_by(m.OperatorAction.id.desc()).limit(limit)).mappings().all()


def audit_count(engine: Engine, *, operator: str | None, action: str | None,
                since: datetime | None, until: datetime | None) -> int:
    """How many audit rows the filters match."""
    with engine.connect() as conn:
        return int(conn.execute(_audit_query(operator, action, since, until,
                                             [func.count()])).scalar_one())


def audit_stream(engine: Engine, *, operator: str | None, action: str | None,
                 since: datetime | None, until: datetime | None,
                 batch: int) -> Iterator[RowMapping]:
    """Every audit row the filters match, newest first, read in batches (a server-side
    cursor): an export of any size in bounded memory. Runs when iterated."""
    query = _audit_query(operator, action, since, until, _audit_columns())
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=batch).execute(
            query.order_by(m.OperatorAction.id.desc()))
        yield from result.mappings()
