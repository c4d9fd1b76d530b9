"""The statements behind the Waiting view: entities waiting in the ledger for their next
attempt, either a retry after a failure or an unknown outcome settling (read back first)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, case, func, select

from worker.adapters.postgres import models as m
from worker.domain.model import WAITING

_STATES = tuple(sorted(s.value for s in WAITING))
#: The kinds of wait the view tells apart.
KINDS = ("retry", "unknown_outcome")


class WaitingReader:
    """What waits, and why: each read in a short transaction of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def entities(self, *, now: datetime, kind: str | None = None, limit: int = 200,
                 ) -> list[dict[str, Any]]:
        """Waiting entities, the soonest due first: since when (the first attempt), the next
        attempt, the attempts made, the last error, when an unknown outcome settles."""
        e = m.Entity
        query = (
            select(e.id, e.event_id, e.customer_key.label("customer"), e.series_id, e.state,
                   e.attempts, e.needs_reconcile,
                   case((e.needs_reconcile, "unknown_outcome"), else_="retry").label("kind"),
                   func.coalesce(e.first_attempt_at, e.created_at).label("since"),
                   e.next_attempt_at, e.settles_at, e.last_error_code.label("error_code"),
                   e.last_error_message.label("error_message"),
                   e.last_request_id.label("request_id"),
                   (e.next_attempt_at <= now).label("due"))
            .where(e.state.in_(_STATES))
            .order_by(e.next_attempt_at.asc().nullsfirst(), e.id).limit(limit))
        if kind == "unknown_outcome":
            query = query.where(e.needs_reconcile)
        elif kind == "retry":
            query = query.where(e.needs_reconcile.is_(False))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        """How many wait, by kind."""
        e = m.Entity
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(e.needs_reconcile, func.count()).where(e.state.in_(_STATES))
                .group_by(e.needs_reconcile)).all()
        found = {("unknown_outcome" if unknown else "retry"): int(n) for unknown, n in rows}
        return {k: found.get(k, 0) for k in KINDS}
