"""Replay jobs in PostgreSQL: created by the console, stepped by whichever worker's sweeper gets
the row lock first, paused or cancelled by an operator. Survive any restart: all state is here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from worker.adapters.postgres import models as m

JOB_STATES = ("running", "paused", "cancelled", "done")


@dataclass(frozen=True)
class DueJob:
    """A running job whose next item is due, locked by this sweeper until its step ends."""

    id: int
    created_by: str
    reason: str
    selection: dict[str, Any]
    velocity_per_min: int
    next_at: datetime


class ReplayJobs(Protocol):
    """What the replay jobs' use cases need (``worker.usecases.replay_jobs``): a job created,
    a due one stepped under its row lock, paused, resumed or cancelled."""

    def create(self, *, created_by: str, reason: str, selection: dict[str, Any],
               plan: dict[str, Any], velocity_per_min: int, entity_ids: Sequence[int],
               now: datetime) -> int: ...

    def lock_due(self, now: datetime
                 ) -> AbstractContextManager[tuple[Connection, DueJob] | None]: ...

    def next_items(self, conn: Connection, job_id: int, limit: int) -> list[tuple[int, int]]:
        ...

    def record_item(self, conn: Connection, item_id: int, outcome: str, now: datetime) -> None:
        ...

    def advance(self, conn: Connection, job_id: int, *, next_at: datetime,
                now: datetime) -> None: ...

    def set_state(self, job_id: int, *, to: str, allowed_from: Sequence[str],
                  now: datetime) -> bool: ...


class ReplayJobStore:
    """The statements behind replay jobs (``ReplayJobs``, and the console's reads of them),
    each in a short transaction of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, created_by: str, reason: str, selection: dict[str, Any],
               plan: dict[str, Any], velocity_per_min: int, entity_ids: Sequence[int],
               now: datetime) -> int:
        with self.engine.begin() as conn:
            job_id = int(conn.execute(
                insert(m.ReplayJob).values(
                    created_by=created_by, reason=reason, selection=selection, plan=plan,
                    velocity_per_min=velocity_per_min, total=len(entity_ids), next_at=now,
                    created_at=now, updated_at=now,
                    state="running" if entity_ids else "done",
                    finished_at=None if entity_ids else now)
                .returning(m.ReplayJob.id)).scalar_one())
            if entity_ids:
                conn.execute(pg_insert(m.ReplayJobItem).on_conflict_do_nothing(),
                             [{"job_id": job_id, "entity_id": e} for e in entity_ids])
        return job_id

    @contextmanager
    def lock_due(self, now: datetime) -> Iterator[tuple[Connection, DueJob] | None]:
        """The most overdue running job, locked (SKIP LOCKED) for the caller's step."""
        j = m.ReplayJob
        with self.engine.begin() as conn:
            row = conn.execute(
                select(j.id, j.created_by, j.reason, j.selection, j.velocity_per_min, j.next_at)
                .where(j.state == "running", j.next_at <= now)
                .order_by(j.next_at).limit(1).with_for_update(skip_locked=True)
            ).first()
            yield (conn, DueJob(*row)) if row is not None else None

    def next_items(self, conn: Connection, job_id: int, limit: int) -> list[tuple[int, int]]:
        """(item id, entity id) of the job's next pending items, in order."""
        i = m.ReplayJobItem
        return [(int(a), int(b)) for a, b in conn.execute(
            select(i.id, i.entity_id).where(i.job_id == job_id, i.state == "pending")
            .order_by(i.id).limit(limit))]

    def record_item(self, conn: Connection, item_id: int, outcome: str, now: datetime) -> None:
        i = m.ReplayJobItem
        conn.execute(update(i).where(i.id == item_id)
                     .values(state="done", outcome=outcome, done_at=now))

    def advance(self, conn: Connection, job_id: int, *, next_at: datetime,
                now: datetime) -> None:
        """Set when the next item is due; the job is done when nothing is pending."""
        i, j = m.ReplayJobItem, m.ReplayJob
        pending = conn.execute(select(func.count()).select_from(i).where(
            i.job_id == job_id, i.state == "pending")).scalar_one()
        values: dict[str, Any] = {"next_at": next_at, "updated_at": now}
        if not pending:
            values.update(state="done", finished_at=now)
        conn.execute(update(j).where(j.id == job_id, j.state == "running").values(**values))

    def set_state(self, job_id: int, *, to: str, allowed_from: Sequence[str],
                  now: datetime) -> bool:
        """Pause, resume or cancel; False when the job was not in ``allowed_from``."""
        j, i = m.ReplayJob, m.ReplayJobItem
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"state": to, "updated_at": now}
            if to == "running":
                values["next_at"] = now  # a paused job does not catch up in a burst
            if to == "cancelled":
                values["finished_at"] = now
            changed = conn.execute(
                update(j).where(j.id == job_id, j.state.in_(allowed_from)).values(**values)
            ).rowcount
            if changed and to == "cancelled":
                conn.execute(update(i).where(i.job_id == job_id, i.state == "pending")
                             .values(state="cancelled", outcome="cancelled", done_at=now))
            return bool(changed)

    def get(self, job_id: int) -> dict[str, Any] | None:
        j, i = m.ReplayJob, m.ReplayJobItem
        with self.engine.connect() as conn:
            row = conn.execute(select(j.__table__).where(j.id == job_id)).mappings().first()
            if row is None:
                return None
            job = dict(row)
            counts = dict(conn.execute(
                select(i.state, func.count()).where(i.job_id == job_id).group_by(i.state)
            ).all())
            job["counts"] = {state: int(counts.get(state, 0))
                             for state in ("pending", "done", "cancelled")}
            return job

    def progress(self, job_id: int, *, now: datetime) -> dict[str, Any]:
        """How fast a job's items went: in the last minute, and since its first."""
        i = m.ReplayJobItem
        done = i.state == "done"
        with self.engine.connect() as conn:
            last_minute, first, last, count = conn.execute(
                select(func.count().filter(done, i.done_at >= now - timedelta(minutes=1)),
                       func.min(i.done_at).filter(done), func.max(i.done_at).filter(done),
                       func.count().filter(done))
                .where(i.job_id == job_id)).one()
        span_s = (last - first).total_seconds() if first is not None and last is not None \
            else 0.0
        return {"last_minute": int(last_minute), "first_done_at": first, "last_done_at": last,
                "per_min": round(60.0 * (count - 1) / span_s, 1) if span_s > 0 else None}

    def items(self, job_id: int, *, limit: int = 500) -> list[dict[str, Any]]:
        i, e = m.ReplayJobItem, m.Entity
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(i.id, i.entity_id, i.state, i.outcome, i.done_at,
                       e.event_id, e.series_id, e.customer_key, e.state.label("entity_state"))
                .join(e, e.id == i.entity_id, isouter=True)
                .where(i.job_id == job_id).order_by(i.id).limit(limit)).mappings()]

    def recent(self, *, limit: int = 50) -> list[dict[str, Any]]:
        j = m.ReplayJob
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(j.id, j.created_at, j.created_by, j.reason, j.state, j.total,
                       j.velocity_per_min, j.finished_at)
                .order_by(j.id.desc()).limit(limit)).mappings()]

