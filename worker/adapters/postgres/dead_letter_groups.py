"""The console's dead-letter groups, read from the summary a trigger keeps (0017).

``dead_letter_groups`` holds a row of +1 for every entity that entered the dead state and of -1
for every one that left it, each with the entity's ``dead_at``, and one folded row per group
(its count, oldest and newest). The read sums them per group; the sweeper folds the deltas
(``fold``) within a second, so the read costs a row per group whatever the ledger's size.

Why deltas and not a counter row per group: an outage dead-letters thousands of entities at
once from every worker, into a handful of groups. Updating a group's row would make each of
those transactions wait for the previous one's commit (and two transactions taking two groups
in opposite orders would deadlock); an INSERT waits for nobody. The fold is the only writer
that touches more than its own row, and one sweeper folds at a time (an advisory lock: the
others skip).

The count is exact from the deltas alone. The oldest and newest are the deltas' min and max,
which a removal can leave behind: when a -1 carries a ``dead_at`` at or beyond the group's
bound, the bound is read again from the entities (``ix_entities_dead_causes``, that group
only). A fold stores bounds exact at its time, so this happens only between a replay or a
discard and the next fold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, func, insert, select, text

from worker.adapters.postgres import models as m
from worker.domain.model import EntityState

#: The groups counted afresh from the entities, as folded rows: into an empty summary, for a
#: ledger loaded without its triggers (the ledger-size bench's COPY). Migration 0017 holds its
#: own copy: a migration is a snapshot.
COUNT_AFRESH = """
INSERT INTO dead_letter_groups
    (error_code, series_id, message, dead, first_dead_at, last_dead_at, folded)
SELECT last_error_code, series_id, last_error_message, count(*), min(dead_at), max(dead_at),
       true
FROM entities WHERE state = 'dead'
GROUP BY last_error_code, series_id, last_error_message
"""

#: The advisory lock a fold holds (``pg_try_advisory_xact_lock``): one fold at a time.
FOLD_LOCK = 0x64_6C_67_72  # "dlgr"

Key = tuple[str | None, int, str | None]


@dataclass
class _Group:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    gone_first: datetime | None = None
    gone_last: datetime | None = None

    def stale(self) -> bool:
        """Whether a removal may have taken the oldest or newest away."""
        return ((self.gone_first is not None
                 and (self.first is None or self.gone_first <= self.first))
                or (self.gone_last is not None
                    and (self.last is None or self.gone_last >= self.last)))


def _is(column: Any, value: Any) -> ColumnElement[bool]:
    # Written as IS NULL for a NULL key, which ix_entities_dead_causes answers too.
    return column.is_(None) if value is None else column == value  # type: ignore[no-any-return]


def _bounds(conn: Connection, key: Key) -> tuple[datetime | None, datetime | None]:
    """The oldest and newest ``dead_at`` of one group, from its entities."""
    e = m.Entity
    code, series_id, message = key
    row = conn.execute(
        select(func.min(e.dead_at), func.max(e.dead_at))
        .where(e.state == EntityState.DEAD.value, _is(e.last_error_code, code),
               e.series_id == series_id, _is(e.last_error_message, message))
    ).one()
    return row[0], row[1]


def _exact(conn: Connection, key: Key, group: _Group) -> _Group:
    if group.stale():
        group.first, group.last = _bounds(conn, key)
        group.gone_first = group.gone_last = None
    return group


def read(conn: Connection, *, limit: int) -> list[dict[str, Any]]:
    """Dead entities grouped by cause: error code x series x message, biggest first, with
    the oldest and newest ``dead_at`` (``first``, ``last``)."""
    g = m.DeadLetterGroup
    total = func.sum(g.dead)
    rows = conn.execute(
        select(g.error_code, g.series_id, g.message, total.label("count"),
               func.min(g.first_dead_at).filter(g.dead > 0).label("first"),
               func.max(g.last_dead_at).filter(g.dead > 0).label("last"),
               func.min(g.first_dead_at).filter(g.dead < 0).label("gone_first"),
               func.max(g.last_dead_at).filter(g.dead < 0).label("gone_last"))
        .group_by(g.error_code, g.series_id, g.message)
        .having(total > 0)
        .order_by(total.desc(), g.error_code, g.series_id)
        .limit(limit)
    ).mappings().all()
    out = []
    for r in rows:
        key = (r["error_code"], r["series_id"], r["message"])
        group = _exact(conn, key, _Group(int(r["count"]), r["first"], r["last"],
                                         r["gone_first"], r["gone_last"]))
        out.append({"error_code": key[0], "series_id": key[1], "message": key[2],
                    "count": group.count, "first": group.first, "last": group.last})
    return out


def _sum(rows: Iterable[Sequence[Any]]) -> dict[Key, _Group]:
    groups: dict[Key, _Group] = {}
    for code, series_id, message, dead, first, last in rows:
        group = groups.setdefault((code, series_id, message), _Group())
        group.count += dead
        if dead > 0:
            group.first = _least(group.first, first)
            group.last = _greatest(group.last, last)
        else:
            group.gone_first = _least(group.gone_first, first)
            group.gone_last = _greatest(group.gone_last, last)
    return groups


def _least(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _greatest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def fold(conn: Connection) -> int:
    """Fold the deltas into one row per group; how many rows were folded (0 when there was
    nothing to fold or another sweeper is folding). Runs in the caller's transaction."""
    g = m.DeadLetterGroup
    due = conn.execute(
        text("SELECT CASE WHEN EXISTS (SELECT 1 FROM dead_letter_groups WHERE NOT folded) "
             "THEN pg_try_advisory_xact_lock(:key) ELSE false END"), {"key": FOLD_LOCK}
    ).scalar_one()
    if not due:
        return 0
    # Every row this statement sees, folded ones included; deltas committed after it stay
    # for the next fold, so every +1 and -1 is summed exactly once.
    rows = conn.execute(
        delete(g).returning(g.error_code, g.series_id, g.message, g.dead, g.first_dead_at,
                            g.last_dead_at)
    ).all()
    groups = {key: _exact(conn, key, group) for key, group in _sum(rows).items()
              if group.count > 0}
    folded = [{"error_code": key[0], "series_id": key[1], "message": key[2],
               "dead": group.count, "first_dead_at": group.first,
               "last_dead_at": group.last, "folded": True}
              for key, group in groups.items()]
    if folded:
        conn.execute(insert(g), folded)
    return len(rows)
