"""Replay jobs: a replay confirmed in the console, run by the workers at a chosen velocity.

The console plans (a dry run: how many will be sent, how many need a read-back first, how many
are already issued), the operator confirms with a reason, and the job is stored in PostgreSQL
with its entities frozen. Every worker's sweeper calls ``step_replay_jobs``; the job row's lock
(SKIP LOCKED) makes one of them step it. Each item goes through
``worker.usecases.support.replay_one``, the CLI's own path: the entity is locked and re-checked, so
what was issued meanwhile is skipped, and one whose last outcome was unknown is read back before
anything is sent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Any

from worker.adapters.postgres.jobs import ReplayJobs, pace
from worker.adapters.postgres.support import Selection
from worker.domain.errors import WorkerError
from worker.domain.model import EntityState
from worker.usecases.support import SupportDeps, replay, replay_one

log = logging.getLogger("worker.support")

ISSUED_STATES = (EntityState.ISSUED.value, EntityState.DUPLICATE_ISSUED.value)
#: Items one sweep may replay for one job, however far behind its pace it is.
MAX_ITEMS_PER_STEP = 50


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay of a selection would do, from a dry run that changes nothing."""

    entity_ids: tuple[int, ...]
    to_send: int
    read_back_first: int
    already_issued: int

    @property
    def total(self) -> int:
        return len(self.entity_ids)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "to_send": self.to_send,
                "read_back_first": self.read_back_first, "already_issued": self.already_issued}


def selection_to_json(selection: Selection) -> dict[str, Any]:
    data = asdict(selection)
    for key in ("since", "until"):
        if data[key] is not None:
            data[key] = data[key].isoformat()
    data["entity_ids"] = list(selection.entity_ids)
    data["states"] = list(selection.states)
    return data


def plan_replay(selection: Selection, deps: SupportDeps) -> ReplayPlan:
    """The dry run the operator confirms: the replay service's own, plus what is issued."""
    results = replay(selection, reason="dry run", operator="console", deps=deps, dry_run=True)
    with deps.uow() as uow:
        issued = uow.ledger.support_targets(replace(selection, states=ISSUED_STATES))
    read_back = sum(1 for r in results if r.outcome.startswith("would reconcile"))
    return ReplayPlan(tuple(r.entity_id for r in results), len(results) - read_back,
                      read_back, len(issued))


def start_replay_job(selection: Selection, *, reason: str, operator: str,
                     velocity_per_min: int, deps: SupportDeps, store: ReplayJobs,
                     max_velocity_per_min: int | None = None,
                     origin: dict[str, str] | None = None) -> int:
    """Store a replay job for the workers; the entities are the dry run's, as of now."""
    if not reason.strip():
        raise ValueError("a reason is required")
    if velocity_per_min < 1:
        raise ValueError("the velocity must be at least 1 call per minute")
    if max_velocity_per_min is not None:
        # Inside the global rate limit: a replay never asks for more than the fleet may send.
        velocity_per_min = min(velocity_per_min, max_velocity_per_min)
    plan = plan_replay(selection, deps)
    now = deps.clock()
    job_id = store.create(created_by=operator, reason=reason,
                          selection=selection_to_json(selection), plan=plan.as_dict(),
                          velocity_per_min=velocity_per_min, entity_ids=plan.entity_ids, now=now)
    with deps.uow() as uow:
        uow.ledger.audit(action="replay_job_started", operator=operator, reason=reason,
                         outcome=f"job {job_id}: {plan.total} entities at "
                                 f"{velocity_per_min}/min",
                         now=now, details={"job_id": job_id, **plan.as_dict(),
                                           "selection": selection_to_json(selection),
                                           **(origin or {})})
        uow.commit()
    log.warning("replay_job.started", extra={"job_id": job_id, "operator": operator,
                                              "total": plan.total, "reason": reason})
    return job_id


_TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pause": ("paused", ("running",)),
    "resume": ("running", ("paused",)),
    "cancel": ("cancelled", ("running", "paused")),
}


def control_replay_job(job_id: int, command: str, *, operator: str, reason: str,
                       deps: SupportDeps, store: ReplayJobs,
                       origin: dict[str, str] | None = None) -> bool:
    """Pause, resume or cancel a job; audited whether or not it applied."""
    to, allowed = _TRANSITIONS[command]
    now = deps.clock()
    changed = store.set_state(job_id, to=to, allowed_from=allowed, now=now)
    with deps.uow() as uow:
        uow.ledger.audit(action=f"replay_job_{command}", operator=operator,
                         reason=reason or command,
                         outcome=f"job {job_id}: {to}" if changed else f"job {job_id}: unchanged",
                         now=now, details={"job_id": job_id, **(origin or {})})
        uow.commit()
    return changed


def step_replay_jobs(deps: SupportDeps, store: ReplayJobs) -> int:
    """Replay the items that are due of one running job; how many were replayed.

    Called by every worker's sweeper. Due items: one per ``60 / velocity`` seconds since the
    job's ``next_at``, at most ``MAX_ITEMS_PER_STEP``; a job far behind (workers were down)
    restarts its pace from now rather than bursting.
    """
    now = deps.clock()
    with store.lock_due(now) as locked:
        if locked is None:
            return 0
        conn, job = locked
        interval = pace(job.velocity_per_min)
        due = min(MAX_ITEMS_PER_STEP, 1 + int((now - job.next_at) / interval))
        states = tuple(job.selection.get("states") or (EntityState.DEAD.value,))
        done = 0
        for item_id, entity_id in store.next_items(conn, job.id, due):
            try:
                result = replay_one(
                    entity_id, Selection(entity_ids=(entity_id,), states=states),
                    reason=f"{job.reason} (replay job {job.id})", operator=job.created_by,
                    deps=deps, action="replay", origin={"via": "replay_job",
                                                        "job_id": str(job.id)})
                outcome = result.outcome
            except WorkerError as exc:
                # Requeued but not announced: the sweeper's requeue_stale sends it later.
                outcome = f"failed: {exc}"
            store.record_item(conn, item_id, outcome, deps.clock())
            done += 1
        next_at = job.next_at + interval * max(done, 1)
        if next_at < now - timedelta(minutes=1):
            next_at = now + interval
        store.advance(conn, job.id, next_at=next_at, now=deps.clock())
    if done:
        log.info("replay_job.step", extra={"job_id": job.id, "replayed": done})
    return done
