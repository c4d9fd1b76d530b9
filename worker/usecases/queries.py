"""The read side: what support engineers and dashboards ask of the ledger.

Plain queries returning plain dicts (ready for ``--json`` or a table); no unit of work, since
nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, select, union

from worker.adapters.postgres import models as m
from worker.adapters.postgres.support import Selection
from worker.domain.errors import NotFound
from worker.domain.model import DeadMessageKind


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _row(mapping: Any) -> dict[str, Any]:
    return {key: _plain(value) for key, value in dict(mapping).items()}


def entity_state_counts(engine: Engine) -> dict[str, int]:
    """Entities per state, for the backlog gauges and the demo summary."""
    with engine.connect() as conn:
        rows = conn.execute(select(m.Entity.state, func.count()).group_by(m.Entity.state))
        return {state: int(count) for state, count in rows}


def entity_story(conn: Any, entity_id: int) -> dict[str, Any]:
    """One entity with its history, calls and coupon."""
    e = m.Entity
    row = conn.execute(select(e.__table__).where(e.id == entity_id)).mappings().first()
    if row is None:
        raise NotFound(f"no entity {entity_id}")
    entity = _row(row)
    entity.pop("claim_token", None)
    entity["history"] = [
        _row(h) for h in conn.execute(
            select(m.EntityHistory.at, m.EntityHistory.kind, m.EntityHistory.state,
                   m.EntityHistory.attempt, m.EntityHistory.error_code,
                   m.EntityHistory.message, m.EntityHistory.request_id,
                   m.EntityHistory.worker)
            .where(m.EntityHistory.entity_id == entity_id).order_by(m.EntityHistory.id)
        ).mappings()
    ]
    entity["calls"] = [
        _row(c) for c in conn.execute(
            select(m.ApiCall.started_at, m.ApiCall.operation, m.ApiCall.request_id,
                   m.ApiCall.http_status, m.ApiCall.latency_ms, m.ApiCall.outcome,
                   m.ApiCall.error_code, m.ApiCall.error_message, m.ApiCall.series_ids,
                   m.ApiCall.worker)
            .where(m.ApiCall.entity_ids.contains([entity_id])).order_by(m.ApiCall.id)
        ).mappings()
    ]
    coupons = [
        _coupon(c) for c in conn.execute(
            select(m.IssuedCoupon.__table__).where(m.IssuedCoupon.entity_id == entity_id)
            .order_by(m.IssuedCoupon.id)
        ).mappings()
    ]
    # Two coupons only for a duplicate (a late original landed): the first is the one
    # recorded first; both are listed.
    entity["coupon"] = coupons[0] if coupons else None
    entity["coupons"] = coupons
    entity["operator_actions"] = [
        _row(a) for a in conn.execute(
            select(m.OperatorAction.at, m.OperatorAction.action, m.OperatorAction.operator,
                   m.OperatorAction.reason, m.OperatorAction.outcome)
            .where(m.OperatorAction.entity_id == entity_id).order_by(m.OperatorAction.id)
        ).mappings()
    ]
    return entity


def _coupon(row: Any) -> dict[str, Any]:
    coupon = _row(row)
    coupon.pop("raw", None)
    return coupon


def event_story(engine: Engine, event_id: str) -> dict[str, Any]:
    """An event, its entities (with history and calls), coupons, and any rejections."""
    with engine.connect() as conn:
        row = conn.execute(
            select(m.Event.__table__).where(m.Event.event_id == event_id)
        ).mappings().first()
        rejections = [
            _row(r) for r in conn.execute(
                select(m.RejectedEvent.id, m.RejectedEvent.received_at, m.RejectedEvent.source,
                       m.RejectedEvent.reason, m.RejectedEvent.size_bytes)
                .where(m.RejectedEvent.event_id == event_id).order_by(m.RejectedEvent.id)
            ).mappings()
        ]
        if row is None:
            if rejections:
                return {"event_id": event_id, "state": "rejected", "rejections": rejections,
                        "entities": [], "coupons": []}
            raise NotFound(f"no event {event_id!r} in the ledger")
        event = _row(row)
        entity_ids = conn.execute(
            select(m.Entity.id).where(m.Entity.event_id == event_id).order_by(m.Entity.series_id)
        ).scalars().all()
        event["entities"] = [entity_story(conn, entity_id) for entity_id in entity_ids]
        event["coupons"] = [c for e in event["entities"] for c in e["coupons"]]
        event["rejections"] = rejections
        event["resubmitted_from"] = [
            int(x) for x in conn.execute(
                select(m.RejectedEvent.id).where(m.RejectedEvent.resubmitted_event_id == event_id)
                .order_by(m.RejectedEvent.id)
            ).scalars()
        ]
        return event


def rejected_list(engine: Engine, *, since: datetime | None = None,
                  until: datetime | None = None, event_id: str | None = None,
                  pending_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    """Rejected messages, newest first (without their raw bytes)."""
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
        return [_row(row) for row in conn.execute(query).mappings()]


def rejected_story(engine: Engine, rejected_id: int) -> dict[str, Any]:
    """One rejected message: what was received (``raw`` as bytes), why, and what support did."""
    r = m.RejectedEvent
    a = m.OperatorAction
    with engine.connect() as conn:
        row = conn.execute(select(r.__table__).where(r.id == rejected_id)).mappings().first()
        if row is None:
            raise NotFound(f"no rejected event {rejected_id}")
        actions = [
            _row(x) for x in conn.execute(
                select(a.at, a.action, a.operator, a.reason, a.outcome, a.event_id,
                       a.details["os_user"].astext.label("os_user"))
                .where(a.action == "rejected_resubmit",
                       a.details["rejected_id"].astext == str(rejected_id))
                .order_by(a.id)
            ).mappings()
        ]
    story = {key: _plain(value) for key, value in dict(row).items() if key != "raw"}
    story["raw"] = bytes(row["raw"])
    story["operator_actions"] = actions
    return story


#: The error code of a kept message in the dead letters: "rejected" (its own bytes), or the
#: kind of failure of ours that outlasted its redeliveries.
DEAD_MESSAGE_CODES = {"rejected": DeadMessageKind.INVALID,
                      **{k.value: k for k in DeadMessageKind if k is not DeadMessageKind.INVALID}}


def dead_letters(engine: Engine, selection: Selection, *, limit: int = 200,
                 include_rejected: bool = True) -> list[dict[str, Any]]:
    """Dead entities matching ``selection`` (newest first), then rejected events."""
    e = m.Entity
    with engine.connect() as conn:
        rows = [
            _row(r) for r in conn.execute(
                select(e.id, e.event_id, e.customer_key.label("customer"), e.series_id,
                       e.state, e.last_error_code.label("error_code"),
                       func.coalesce(e.dead_reason, "").label("reason"),
                       e.last_error_message.label("message"), e.attempts, e.needs_reconcile,
                       e.last_request_id.label("request_id"), e.dead_at)
                .where(*selection.conditions())
                .order_by(e.dead_at.desc().nullslast(), e.id.desc()).limit(limit)
            ).mappings()
        ]
        for row in rows:
            row["kind"] = "entity"
        only_entities = bool(selection.entity_ids or selection.series_id
                             or selection.error_code not in (None, *DEAD_MESSAGE_CODES))
        if include_rejected and not only_entities:
            r = m.RejectedEvent
            query = select(r.id, r.event_id, r.reason.label("message"), r.received_at,
                           r.source, r.size_bytes, r.kind.label("message_kind"),
                           ).order_by(r.id.desc()).limit(limit)
            if selection.error_code is not None:
                query = query.where(r.kind == DEAD_MESSAGE_CODES[selection.error_code].value)
            if selection.event_id:
                query = query.where(r.event_id == selection.event_id)
            if selection.since:
                query = query.where(r.received_at >= selection.since)
            if selection.until:
                query = query.where(r.received_at < selection.until)
            if not selection.customer:
                rows += [
                    {**_row(x), "kind": "rejected",
                     "error_code": "rejected" if x["message_kind"] == DeadMessageKind.INVALID
                     else x["message_kind"],
                     "dead_at": _plain(x["received_at"])}
                    for x in conn.execute(query).mappings()
                ]
    return rows


def dead_letter_summary(engine: Engine, selection: Selection) -> list[dict[str, Any]]:
    """Dead entities grouped by error code and series: how many, since when."""
    e = m.Entity
    with engine.connect() as conn:
        return [
            _row(r) for r in conn.execute(
                select(e.last_error_code.label("error_code"), e.series_id,
                       func.count().label("count"), func.min(e.dead_at).label("first"),
                       func.max(e.dead_at).label("last"),
                       func.count(func.distinct(e.customer_key)).label("customers"))
                .where(*selection.conditions())
                .group_by(e.last_error_code, e.series_id)
                .order_by(func.count().desc(), e.last_error_code, e.series_id)
            ).mappings()
        ]


DUPLICATE_ADVICE = (
    "Both coupons are recorded. An abandoned call landed after the re-send, so the customer "
    "holds two coupons for one entitlement; nothing more will be sent. Ask the loyalty team "
    "whether the customer keeps both or the later code is revoked in Capillary."
)


def duplicates(engine: Engine, *, limit: int = 200) -> list[dict[str, Any]]:
    """Entities found holding more than one of our coupons, newest first, with their codes."""
    e, c = m.Entity, m.IssuedCoupon
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.id, e.event_id, e.customer_key.label("customer"), e.series_id,
                   e.last_error_message.label("message"), e.updated_at.label("found_at"),
                   func.array_agg(c.code).label("codes"))
            .join(c, c.entity_id == e.id)
            .where(e.state == "duplicate_issued")
            .group_by(e.id).order_by(e.updated_at.desc(), e.id.desc()).limit(limit)
        ).mappings().all()
    return [{**_row(r), "codes": list(r["codes"])} for r in rows]


# -- the console's pages -------------------------------------------------------------------

CUSTOMER_KINDS = ("id", "mobile", "email", "externalId")


def customer_keys(query: str) -> list[str]:
    """The ledger keys a search term may name: ``id:…``, ``mobile:…`` … or the one given."""
    query = query.strip()
    kind, _, value = query.partition(":")
    if value and kind in CUSTOMER_KINDS:
        return [query]
    return [f"{kind}:{query}" for kind in CUSTOMER_KINDS]


def customer_story(engine: Engine, query: str, *, limit: int = 50) -> dict[str, Any]:
    """Every event a support question names, newest first, with entities, attempts and
    coupons: a customer's (by id, mobile, email or external id), or the one event a coupon
    code, a Capillary request id (``X-Cap-Requestid``) or an event id belongs to."""
    keys = customer_keys(query)
    by_code = select(m.IssuedCoupon.event_id).where(m.IssuedCoupon.code == query)
    by_request = select(m.ApiCall.event_id).where(m.ApiCall.request_id == query)
    ev = m.Event
    # One branch per way in, each through its own index: as one WHERE of four ORs, PostgreSQL
    # walked every event newest first, testing each (the whole table, on a large ledger).
    matches = union(*(
        select(ev.event_id, ev.received_at).where(condition)
        for condition in (ev.customer_key.in_(keys), ev.event_id == query,
                          ev.event_id.in_(by_code), ev.event_id.in_(by_request))
    )).subquery()
    with engine.connect() as conn:
        event_ids = conn.execute(
            select(matches.c.event_id).order_by(matches.c.received_at.desc()).limit(limit)
        ).scalars().all()
    events = [event_story(engine, event_id) for event_id in event_ids]
    found = sorted({e["customer_key"] for e in events})
    return {"query": query, "keys": found or keys, "events": events}


def dead_letter_groups(engine: Engine, *, limit: int = 200) -> list[dict[str, Any]]:
    """Dead entities grouped by cause: error code x series x message, biggest first."""
    e = m.Entity
    with engine.connect() as conn:
        return [
            _row(r) for r in conn.execute(
                select(e.last_error_code.label("error_code"), e.series_id,
                       e.last_error_message.label("message"), func.count().label("count"),
                       func.min(e.dead_at).label("first"), func.max(e.dead_at).label("last"))
                .where(e.state == "dead")
                .group_by(e.last_error_code, e.series_id, e.last_error_message)
                .order_by(func.count().desc(), e.last_error_code, e.series_id).limit(limit)
            ).mappings()
        ]


def overview_counts(engine: Engine, now: datetime) -> dict[str, dict[str, int]]:
    """Entities by state changed within the last hour and the last day."""
    from datetime import timedelta

    e = m.Entity
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for label, span in (("hour", timedelta(hours=1)), ("day", timedelta(days=1))):
            rows = conn.execute(
                select(e.state, func.count()).where(e.updated_at >= now - span)
                .group_by(e.state))
            counts = {state: int(n) for state, n in rows}
            unknown = conn.execute(
                select(func.count()).select_from(e).where(
                    e.updated_at >= now - span, e.needs_reconcile.is_(True),
                    e.state.in_(("retry_wait", "queued", "in_flight")))).scalar_one()
            out[label] = {
                "issued": counts.get("issued", 0),
                "retrying": counts.get("retry_wait", 0) + counts.get("queued", 0)
                + counts.get("in_flight", 0),
                "dead": counts.get("dead", 0),
                "unknown_outcome": int(unknown),
                "duplicate": counts.get("duplicate_issued", 0),
            }
    return out


def issued_per_minute(engine: Engine, now: datetime, *, minutes: int = 60) -> list[int]:
    """Coupons recorded per minute over the last ``minutes``, oldest first."""
    from datetime import timedelta

    c = m.IssuedCoupon
    start = now - timedelta(minutes=minutes)
    bucket = func.date_trunc("minute", c.issued_at)
    with engine.connect() as conn:
        rows: dict[datetime, int] = {
            at: int(n) for at, n in conn.execute(
                select(bucket, func.count()).where(c.issued_at >= start).group_by(bucket))}
    base = start.replace(second=0, microsecond=0)
    return [int(rows.get(base + timedelta(minutes=i + 1), 0)) for i in range(minutes)]


def circuit_states(engine: Engine) -> list[dict[str, Any]]:
    """The fleet-wide circuit breakers as they stand."""
    b = m.CircuitBreaker
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(
            select(b.name, b.state, b.consecutive_failures, b.open_until, b.reason)
            .order_by(b.name)).mappings()]


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


def audit_rows(engine: Engine, *, operator: str | None = None, action: str | None = None,
               since: datetime | None = None, until: datetime | None = None,
               limit: int = 500) -> list[dict[str, Any]]:
    """The operator audit, newest first, filtered (a page of it)."""
    query = _audit_query(operator, action, since, until, _audit_columns())
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(
            query.order_by(m.OperatorAction.id.desc()).limit(limit)).mappings()]


def audit_count(engine: Engine, *, operator: str | None = None, action: str | None = None,
                since: datetime | None = None, until: datetime | None = None) -> int:
    """How many audit rows the filters match."""
    with engine.connect() as conn:
        return int(conn.execute(_audit_query(operator, action, since, until,
                                             [func.count()])).scalar_one())


def audit_stream(engine: Engine, *, operator: str | None = None, action: str | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Every audit row the filters match, newest first, read in batches (a server-side
    cursor): an export of any size in bounded memory. Runs when iterated."""
    query = _audit_query(operator, action, since, until, _audit_columns())
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=batch).execute(
            query.order_by(m.OperatorAction.id.desc()))
        for r in result.mappings():
            yield _row(r)


def calls_last_minute(engine: Engine, now: datetime) -> int:
    """Calls to Capillary in the minute before ``now`` (the rate limit's use)."""
    from datetime import timedelta

    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.ApiCall).where(
            m.ApiCall.started_at >= now - timedelta(minutes=1))).scalar_one())
