"""How long the entities a disruption caught in flight took to be issued after it.

Shared by the two kills a run can make: a worker SIGKILLed mid-call (its claims wait for their
heartbeat lease to run out, then a read-back finds the calls that landed) and, on a cluster, the
node leading the events queue (Celery ends the tasks in flight on the lost connection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sqlalchemy import Engine

RECOVERY_TARGET_S: Final = 90.0
"""The entities a kill caught in flight are all issued within this long of it (issue 21: a
call that landed settles at once by read-back once the claim's short lease runs out)."""


@dataclass(frozen=True)
class Claimed:
    """The database's clock at a moment, and the entities claimed then, with their holders."""

    at: datetime
    holders: dict[int, str]  # entity id -> claimed_by (``host:pid[/task:<id>]``)

    def held_by(self, keep: Callable[[int], bool]) -> tuple[int, ...]:
        """The entities whose holder's pid ``keep`` accepts."""
        from worker.adapters.rabbitmq.names import TASK_MARK

        return tuple(entity for entity, holder in self.holders.items()
                     if keep(int(holder.split(TASK_MARK)[0].rsplit(":", 1)[1])))


def claimed_now(engine: Engine) -> Claimed:
    """The database's clock and the entities claimed right now."""
    from sqlalchemy import func, select

    from worker.adapters.postgres import models as m

    with engine.connect() as conn:
        now = conn.execute(select(func.now())).scalar_one()
        rows = conn.execute(select(m.Entity.id, m.Entity.claimed_by).where(
            m.Entity.state == "in_flight", m.Entity.claimed_by.is_not(None))).all()
    return Claimed(now, {int(i): str(by) for i, by in rows})


@dataclass(frozen=True)
class Recovery:
    """What became of the entities a kill caught in flight."""

    what: str
    in_flight: int
    recovered: int
    recovered_s: float | None
    """From the kill to the last of them issued (None: one never was)."""
    target_s: float = RECOVERY_TARGET_S

    @property
    def lost(self) -> bool:
        return self.recovered < self.in_flight

    @property
    def within_target(self) -> bool:
        return not self.lost and (self.recovered_s or 0.0) <= self.target_s

    def row(self) -> tuple[str, str, str]:
        if not self.in_flight:
            return (self.what, "0", "no entity was in flight at the kill")
        last = "never" if self.recovered_s is None else f"{self.recovered_s:.1f} s"
        verdict = "within" if self.within_target else "OVER"
        return (self.what, f"{self.recovered}/{self.in_flight}",
                f"issued, the last {last} after the kill ({verdict} the {self.target_s:g} s "
                "recovery target)")


def recovery(engine: Engine, what: str, killed_at: datetime,
             in_flight: tuple[int, ...]) -> Recovery:
    """How many of ``in_flight`` were issued, and the last how long after ``killed_at``."""
    from sqlalchemy import select

    from worker.adapters.postgres import models as m

    if not in_flight:
        return Recovery(what, 0, 0, 0.0)
    with engine.connect() as conn:
        issued = [t for (t,) in conn.execute(select(m.Entity.issued_at).where(
            m.Entity.id.in_(in_flight), m.Entity.issued_at.is_not(None))) if t is not None]
    last = max(((t - killed_at).total_seconds() for t in issued), default=0.0)
    return Recovery(what, len(in_flight), len(issued),
                    last if len(issued) == len(in_flight) else None)
