"""The read side: what support engineers and dashboards ask of the ledger, as read models.

Plain dicts (ready for ``--json`` or a table) made from the rows the ledger's read statements
return (``worker.adapters.postgres.reads``, where every statement lives); no unit of work, since
nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from worker.adapters.postgres import reads
from worker.adapters.postgres.support import Selection
from worker.domain.errors import NotFound
from worker.domain.model import DeadMessageKind

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine


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
    return reads.entity_state_counts(engine)


def entity_story(conn: Connection, entity_id: int) -> dict[str, Any]:
    """One entity with its history, calls and coupon."""
    row = reads.entity(conn, entity_id)
    if row is None:
        raise NotFound(f"no entity {entity_id}")
    entity = _row(row)
    entity.pop("claim_token", None)
    entity["history"] = [_row(h) for h in reads.entity_history(conn, entity_id)]
    entity["calls"] = [_row(c) for c in reads.entity_calls(conn, entity_id)]
    coupons = [_coupon(c) for c in reads.entity_coupons(conn, entity_id)]
    # Two coupons only for a duplicate (a late original landed): the first is the one
    # recorded first; both are listed.
    entity["coupon"] = coupons[0] if coupons else None
    entity["coupons"] = coupons
    entity["operator_actions"] = [_row(a)
                                  for a in reads.entity_operator_actions(conn, entity_id)]
    return entity


def _coupon(row: Any) -> dict[str, Any]:
    coupon = _row(row)
    coupon.pop("raw", None)
    return coupon


def event_story(engine: Engine, event_id: str) -> dict[str, Any]:
    """An event, its entities (with history and calls), coupons, and any rejections."""
    with engine.connect() as conn:
        row = reads.event(conn, event_id)
        rejections = [_row(r) for r in reads.event_rejections(conn, event_id)]
        if row is None:
            if rejections:
                return {"event_id": event_id, "state": "rejected", "rejections": rejections,
                        "entities": [], "coupons": []}
            raise NotFound(f"no event {event_id!r} in the ledger")
        event = _row(row)
        event["entities"] = [entity_story(conn, entity_id)
                             for entity_id in reads.event_entity_ids(conn, event_id)]
        event["coupons"] = [c for e in event["entities"] for c in e["coupons"]]
        event["rejections"] = rejections
        event["resubmitted_from"] = reads.resubmitted_from(conn, event_id)
        return event


def rejected_list(engine: Engine, *, since: datetime | None = None,
                  until: datetime | None = None, event_id: str | None = None,
                  pending_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    """Rejected messages, newest first (without their raw bytes)."""
    return [_row(row) for row in reads.rejected(engine, since=since, until=until,
                                                  event_id=event_id, pending_only=pending_only,
                                                  limit=limit)]


def rejected_story(engine: Engine, rejected_id: int) -> dict[str, Any]:
    """One rejected message: what was received (``raw`` as bytes), why, and what support did."""
    with engine.connect() as conn:
        row = reads.rejected_message(conn, rejected_id)
        if row is None:
            raise NotFound(f"no rejected event {rejected_id}")
        actions = [_row(x) for x in reads.rejected_resubmissions(conn, rejected_id)]
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
    with engine.connect() as conn:
        rows = [_row(r) for r in reads.dead_entities(conn, selection, limit=limit)]
        for row in rows:
            row["kind"] = "entity"
        only_entities = bool(selection.entity_ids or selection.series_id
                             or selection.error_code not in (None, *DEAD_MESSAGE_CODES))
        if include_rejected and not only_entities and not selection.customer:
            kind = (None if selection.error_code is None
                    else DEAD_MESSAGE_CODES[selection.error_code].value)
            rows += [
                {**_row(x), "kind": "rejected",
                 "error_code": "rejected" if x["message_kind"] == DeadMessageKind.INVALID
                 else x["message_kind"],
                 "dead_at": _plain(x["received_at"])}
                for x in reads.kept_messages(conn, selection, kind=kind, limit=limit)
            ]
    return rows


def dead_letter_summary(engine: Engine, selection: Selection) -> list[dict[str, Any]]:
    """Dead entities grouped by error code and series: how many, since when."""
    return [_row(r) for r in reads.dead_letter_summary(engine, selection)]


DUPLICATE_ADVICE = (
    "Both coupons are recorded. An abandoned call landed after the re-send, so the customer "
    "holds two coupons for one entitlement; nothing more will be sent. Ask the loyalty team "
    "whether the customer keeps both or the later code is revoked in Capillary."
)


def duplicates(engine: Engine, *, limit: int = 200) -> list[dict[str, Any]]:
    """Entities found holding more than one of our coupons, newest first, with their codes."""
    return [{**_row(r), "codes": list(r["codes"])} for r in reads.duplicates(engine, limit=limit)]


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
    event_ids = reads.customer_event_ids(engine, keys=keys, term=query, limit=limit)
    events = [event_story(engine, event_id) for event_id in event_ids]
    found = sorted({e["customer_key"] for e in events})
    return {"query": query, "keys": found or keys, "events": events}


def dead_letter_groups(engine: Engine, *, limit: int = 200) -> list[dict[str, Any]]:
    """Dead entities grouped by cause: error code x series x message, biggest first."""
    return [_row(r) for r in reads.dead_letter_groups(engine, limit=limit)]


def overview_counts(engine: Engine, now: datetime) -> dict[str, dict[str, int]]:
    """Entities by state changed within the last hour and the last day."""
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for label, span in (("hour", timedelta(hours=1)), ("day", timedelta(days=1))):
            counts = reads.states_changed_since(conn, now - span)
            unknown = reads.unknown_outcomes_since(conn, now - span)
            out[label] = {
                "issued": counts.get("issued", 0),
                "retrying": counts.get("retry_wait", 0) + counts.get("queued", 0)
                + counts.get("in_flight", 0),
                "dead": counts.get("dead", 0),
                "unknown_outcome": unknown,
                "duplicate": counts.get("duplicate_issued", 0),
            }
    return out


def issued_per_minute(engine: Engine, now: datetime, *, minutes: int = 60) -> list[int]:
    """Coupons recorded per minute over the last ``minutes``, oldest first."""
    start = now - timedelta(minutes=minutes)
    rows = reads.issued_per_minute(engine, start)
    base = start.replace(second=0, microsecond=0)
    return [int(rows.get(base + timedelta(minutes=i + 1), 0)) for i in range(minutes)]


def circuit_states(engine: Engine) -> list[dict[str, Any]]:
    """The fleet-wide circuit breakers as they stand."""
    return [_row(r) for r in reads.circuit_states(engine)]


def audit_rows(engine: Engine, *, operator: str | None = None, action: str | None = None,
               since: datetime | None = None, until: datetime | None = None,
               limit: int = 500) -> list[dict[str, Any]]:
    """The operator audit, newest first, filtered (a page of it)."""
    return [_row(r) for r in reads.audit(engine, operator=operator, action=action,
                                         since=since, until=until, limit=limit)]


def audit_count(engine: Engine, *, operator: str | None = None, action: str | None = None,
                since: datetime | None = None, until: datetime | None = None) -> int:
    """How many audit rows the filters match."""
    return reads.audit_count(engine, operator=operator, action=action, since=since,
                             until=until)


def audit_stream(engine: Engine, *, operator: str | None = None, action: str | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Every audit row the filters match, newest first, read in batches (a server-side
    cursor): an export of any size in bounded memory. Runs when iterated."""
    for r in reads.audit_stream(engine, operator=operator, action=action, since=since,
                                until=until, batch=batch):
        yield _row(r)


def calls_last_minute(engine: Engine, now: datetime) -> int:
    """Calls to Capillary in the minute before ``now`` (the rate limit's use)."""
    return reads.calls_since(engine, now - timedelta(minutes=1))
