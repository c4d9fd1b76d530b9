"""The statements behind a support action's dry run: how many entities a selection names, and
which, never more than a bound at once.

A dry run of a filter over millions of dead letters must not load them all: the counts are one
``GROUP BY``, the list is ``LIMIT``-ed, and the caller refuses a selection over its bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from worker.adapters.postgres import models as m
from worker.adapters.postgres.support import Selection, Target


@dataclass(frozen=True)
class SelectionCounts:
    """How many entities a selection names, and how many of them need a read-back first."""

    total: int
    read_back_first: int


class SqlActionPlans:
    """Counts and bounded lists of what a selection names, each in a short read of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self, selection: Selection) -> SelectionCounts:
        e = m.Entity
        with self.engine.connect() as conn:
            total, read_back = conn.execute(
                select(func.count(), func.count().filter(e.needs_reconcile))
                .select_from(e).where(*selection.conditions())).one()
        return SelectionCounts(int(total), int(read_back))

    def listed(self, selection: Selection, *, limit: int) -> list[Target]:
        """The first ``limit`` entities of ``selection``, by id."""
        e = m.Entity
        with self.engine.connect() as conn:
            return [Target(*row) for row in conn.execute(
                select(e.id, e.event_id, e.series_id, e.customer_key, e.state, e.attempts,
                       e.last_error_code, e.needs_reconcile)
                .where(*selection.conditions()).order_by(e.id).limit(limit))]
