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
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from worker.adapters.postgres.jobs import ReplayJobs
from worker.adapters.postgres.support import Selection
from worker.domain.errors import SelectionRefused, WorkerError
from worker.domain.model import EntityState
from worker.domain.pacing import even_slots, interval_of
from worker.usecases.action_plans import (
    MAX_IDS,
    ActionPlan,
    ActionPlans,
    by_ids,
    plan_action,
    too_many,
)
from worker.usecases.support import SupportDeps, replay_one

log = logging.getLogger("worker.support")

#: Items one sweep may replay for one job, however far behind its pace it is.
MAX_ITEMS_PER_STEP = 50


def selection_to_json(selection: Selection) -> dict[str, Any]:
    data = asdict(selection)
    for key in ("since", "until"):
        if data[key] is not None:
            data[key] = data[key].isoformat()
    data["entity_ids"] = list(selection.entity_ids)
    data["states"] = list(selection.states)
    return data


def plan_replay(selection: Selection, plans: ActionPlans) -> ActionPlan:
    """The dry run the operator confirms: the dead entities ``selection`` names (at most
    ``MAX_IDS``), how many need a read-back first, how many the filter finds already issued."""
    return plan_action(selection, plans, count_issued=True)


def start_replay_job(entity_ids: tuple[int, ...], *, selection: Selection, reason: str,
                     operator: str, velocity_per_min: int, deps: SupportDeps,
                     store: ReplayJobs, plans: ActionPlans,
                     max_velocity_per_min: int | None = None,
                     origin: dict[str, str] | None = None) -> int:
    """Store a replay job for the workers over exactly ``entity_ids`` (the dry run's list);
    ``selection`` is the filter the operator found them with, kept for the record.

    Each entity is re-checked under a lock when its turn comes: one no longer dead is skipped.
    """
    if not reason.strip():
        raise ValueError("a reason is required")
    if velocity_per_min < 1:
        raise ValueError("the velocity must be at least 1 call per minute")
    if not entity_ids:
        raise SelectionRefused("no entity ids: run the dry run and confirm its list")
    if len(entity_ids) > MAX_IDS:
        raise too_many(len(entity_ids))
    if max_velocity_per_min is not None:
        # Inside the global rate limit: a replay never asks for more than the fleet may send.
        velocity_per_min = min(velocity_per_min, max_velocity_per_min)
    plan = plan_action(by_ids(entity_ids, selection.states), plans)
    counts = {**plan.as_dict(), "total": len(entity_ids),
              "to_send": len(entity_ids) - plan.read_back_first}
    now = deps.clock()
    recorded = selection_to_json(selection)
    job_id = store.create(created_by=operator, reason=reason, selection=recorded, plan=counts,
                          velocity_per_min=velocity_per_min, entity_ids=entity_ids, now=now)
    with deps.uow() as uow:
        uow.ledger.audit(action="replay_job_started", operator=operator, reason=reason,
                         outcome=f"job {job_id}: {len(entity_ids)} entities at "
                                 f"{velocity_per_min}/min",
                         now=now, details={"job_id": job_id, **counts,
                                           "selection": recorded, **(origin or {})})
        uow.commit()
    log.warning("replay_job.started", extra={"job_id": job_id, "operator": operator,
                                              "total": len(entity_ids), "reason": reason})
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


def step_replay_jobs(deps: SupportDeps, store: ReplayJobs, *,
                     horizon_s: float = 1.0) -> int:
    """Replay the items of one running job that fall within the next ``horizon_s``, each at
    its own moment; how many were replayed.

    Called by every worker's sweeper, with its sweep interval as the horizon. The moments are
    evenly spaced at the job's velocity (``worker.domain.pacing``: a token bucket of one
    token), so the retry queue sees one entity every ``60 / velocity`` seconds rather than a
    burst per sweep; a job behind its pace (workers were down) resumes from now without
    catching up. At most ``MAX_ITEMS_PER_STEP`` items per step.
    """
    now = deps.clock()
    with store.lock_due(now) as locked:
        if locked is None:
            return 0
        conn, job = locked
        interval = interval_of(job.velocity_per_min)
        slots = even_slots(job.next_at, now, interval=interval,
                           horizon=timedelta(seconds=horizon_s), max_items=MAX_ITEMS_PER_STEP)
        states = tuple(job.selection.get("states") or (EntityState.DEAD.value,))
        done = 0
        for slot, (item_id, entity_id) in zip(
                slots, store.next_items(conn, job.id, len(slots)), strict=False):
            wait_s = (slot - deps.clock()).total_seconds()
            if wait_s > 0:
                deps.sleep(wait_s)
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
        next_at = slots[done - 1] + interval if done else now + interval
        store.advance(conn, job.id, next_at=next_at, now=deps.clock())
    if done:
        log.info("replay_job.step", extra={"job_id": job.id, "replayed": done})
    return done
