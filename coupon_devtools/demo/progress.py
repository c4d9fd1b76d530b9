"""Publishing the scenario and watching the ledger drain."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from worker.config import Settings
from coupon_devtools.demo.defaults import POLL_INTERVAL_S
from coupon_devtools.demo.scenario import Plan
from coupon_devtools.demo.services import Service


def publish_batch(settings: Settings, plan: Plan) -> None:
    """Publish every delivery of the plan, in order, with the project's producer."""
    from worker.bootstrap import open_producer

    with open_producer(settings) as producer:
        for delivery in plan.deliveries:
            if delivery.event is None or delivery.via == "raw":
                producer.publish_raw(delivery.raw)
            else:
                producer.publish_event(delivery.event, via=delivery.via)


def inject_faults(sandbox_url: str, plan: Plan) -> None:
    """Register the plan's faults; each strikes the first bulk-issue call of one customer."""
    from coupon_devtools.sandbox import SandboxAdmin

    with SandboxAdmin(sandbox_url) as admin:
        for fault in plan.faults:
            admin.add_fault(times=1, **fault)


# -- watching ------------------------------------------------------------------------------

_RECEIVED = re.compile(r'^coupon_events_received_total\{outcome="(\w+)"\}\s+([0-9.eE+-]+)$',
                       re.MULTILINE)


def deliveries_taken_in(metrics_url: str) -> Counter[str] | None:
    """What the worker counted: new events, duplicate deliveries, rejected messages (None when
    its metrics endpoint does not answer or has counted nothing yet)."""
    import requests

    try:
        response = requests.get(metrics_url, timeout=2.0)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    counts: Counter[str] = Counter()
    for outcome, value in _RECEIVED.findall(response.text):
        counts[outcome] += int(float(value))
    return counts or None


@dataclass(frozen=True)
class Snapshot:
    """The ledger (and the worker's intake counters) at one moment."""

    events_at_rest: int
    rejected: int
    entities: Mapping[str, int]
    taken_in: Counter[str] | None

    def drained(self, plan: Plan) -> bool:
        """Every event at rest, every malformed message recorded and, when the worker's
        counters are readable, every delivery taken in (duplicates included)."""
        at_rest = self.events_at_rest >= len(plan.events) and self.rejected >= plan.malformed
        if not self.taken_in:
            return at_rest
        return at_rest and self.taken_in.total() >= len(plan.deliveries)


def snapshot(engine: Engine, metrics_url: str) -> Snapshot:
    """Read where the pipeline stands."""
    from sqlalchemy import exists, func, select

    from worker.adapters.postgres import models as m
    from worker.domain.model import TERMINAL_STATES
    from worker.usecases.queries import entity_state_counts

    unsettled = exists().where(m.Entity.event_id == m.Event.event_id,
                               m.Entity.state.not_in([s.value for s in TERMINAL_STATES]))
    with engine.connect() as conn:
        # At rest means every entity at rest: the event row's own state can lag behind.
        at_rest = conn.execute(select(func.count()).select_from(m.Event).where(~unsettled)
                               ).scalar_one()
        rejected = conn.execute(select(func.count()).select_from(m.RejectedEvent)).scalar_one()
    return Snapshot(int(at_rest), int(rejected), entity_state_counts(engine),
                    deliveries_taken_in(metrics_url))


def watch_progress(engine: Engine, plan: Plan, metrics_url: str, timeout_s: float,
                   console: Console, services: Sequence[Service]) -> tuple[bool, Snapshot]:
    """Show the ledger draining; True when it drained within ``timeout_s``. Raises DemoError
    as soon as one of ``services`` dies, rather than waiting for the timeout."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description:<17}"), BarColumn(bar_width=20),
               MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    deadline = time.monotonic() + timeout_s
    with Progress(*columns, console=console) as progress:
        at_rest = progress.add_task("events at rest", total=len(plan.events), detail="")
        taken: TaskID | None = None
        counted: Counter[str] | None = None
        while True:
            now = snapshot(engine, metrics_url)
            # A scrape can time out while the worker is busy: keep the last counters read.
            now = replace(now, taken_in=now.taken_in or counted)
            counted = now.taken_in
            states = now.entities
            busy = sum(n for state, n in states.items() if state not in ("issued", "dead"))
            progress.update(at_rest, completed=now.events_at_rest,
                            detail=f"issued {states.get('issued', 0)} · busy {busy} · "
                                   f"dead {states.get('dead', 0)}")
            if now.taken_in:
                # Shown once the worker's counters are readable (absent until its first event).
                if taken is None:
                    taken = progress.add_task("messages taken in",
                                              total=len(plan.deliveries), detail="")
                progress.update(taken, completed=now.taken_in.total(),
                                detail=f"duplicates {now.taken_in['duplicate']} · "
                                       f"rejected {now.rejected}")
            if now.drained(plan):
                return True, now
            if time.monotonic() > deadline:
                return False, now
            for service in services:
                service.check_running()
            time.sleep(POLL_INTERVAL_S)
