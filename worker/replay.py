"""Support engineers' use cases: replay and discard dead entities, replay an event.

Safe by construction: an entity is re-run through the same retry path as any retry (claim,
reconcile when its last outcome was unknown, then issue), so a replay of something that was
issued meanwhile is a no-op and two replays never issue twice. Every action is an audit row,
written in the same transaction as the change; ``dry_run`` reads and changes nothing.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from worker.domain import EntityState
from worker.ledger.records import DueEntity
from worker.ledger.support import Selection, SupportRepository, Target
from worker.ledger.unit_of_work import SqlUnitOfWork
from worker.metrics import Metrics
from worker.services import Publisher

log = logging.getLogger("worker.support")

REPLAYABLE = (EntityState.DEAD.value,)
EVENT_REPLAYABLE = (EntityState.DEAD.value, EntityState.RETRY_WAIT.value)


def default_operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class ActionResult:
    """What a support command did (or would do) to one entity."""

    entity_id: int
    event_id: str
    series_id: int
    customer: str
    state_before: str
    outcome: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class SupportDeps:
    """What the support use cases need: the ledger, the retry queue, a clock."""

    uow: Callable[[], SqlUnitOfWork]
    publisher: Publisher
    clock: Callable[[], datetime]
    metrics: Metrics | None = None
    sleep: Callable[[float], None] = time.sleep


def _result(target: Target, outcome: str) -> ActionResult:
    return ActionResult(target.entity_id, target.event_id, target.series_id,
                        target.customer_key, target.state, outcome)


def _log(action: str, target: Target, outcome: str, operator: str, reason: str) -> None:
    log.warning(
        f"entity.{action}",
        extra={"event_id": target.event_id, "customer": target.customer_key,
               "series": target.series_id, "entity_id": target.entity_id,
               "attempt": target.attempts, "error_code": target.error_code,
               "outcome": outcome, "operator": operator, "reason": reason},
    )


def _targets(deps: SupportDeps, selection: Selection) -> list[Target]:
    with deps.uow() as uow:
        return SupportRepository(uow.session).select(selection)


def replay(selection: Selection, *, reason: str, operator: str, deps: SupportDeps,
           dry_run: bool = False, rate_per_s: float = 20.0,
           action: str = "replay") -> list[ActionResult]:
    """Send the selected entities through the retry path again, at most ``rate_per_s``."""
    if not reason.strip():
        raise ValueError("a reason is required")
    results: list[ActionResult] = []
    for n, candidate in enumerate(_targets(deps, selection)):
        if dry_run:
            plan = "would reconcile, then issue if absent" if candidate.needs_reconcile \
                else "would issue again"
            if candidate.state == EntityState.RETRY_WAIT.value:
                plan = "would retry now"
            results.append(_result(candidate, plan))
            continue
        if n and rate_per_s > 0:
            deps.sleep(1.0 / rate_per_s)
        results.append(_replay_one(candidate.entity_id, selection, reason=reason,
                                   operator=operator, deps=deps, action=action))
    return results


def _replay_one(entity_id: int, selection: Selection, *, reason: str, operator: str,
                deps: SupportDeps, action: str) -> ActionResult:
    now = deps.clock()
    with deps.uow() as uow:
        repo = SupportRepository(uow.session)
        target = repo.lock(entity_id)
        assert target is not None
        if target.state not in selection.states:
            # Changed since it was listed (issued, discarded, replayed by someone else).
            outcome = f"skipped: now {target.state}"
            repo.audit(action=action, operator=operator, reason=reason, outcome=outcome,
                       now=now, entity_id=target.entity_id, event_id=target.event_id)
            uow.commit()
            _log("replay_skipped", target, outcome, operator, reason)
            return _result(target, outcome)
        fresh_attempts = target.state == EntityState.DEAD.value
        repo.requeue(target, now=now, reset_attempts=fresh_attempts)
        outcome = "requeued (reconcile first)" if target.needs_reconcile else "requeued"
        repo.history(target, kind="replayed", state=EntityState.QUEUED.value,
                     message=f"{reason} (by {operator})", operator=operator, now=now)
        repo.audit(action=action, operator=operator, reason=reason, outcome=outcome, now=now,
                   entity_id=target.entity_id, event_id=target.event_id,
                   details={"state_before": target.state, "attempts_before": target.attempts})
        repo.refresh_events([target.event_id], now=now)
        uow.commit()
    # After the commit, so the retry finds the entity queued. If this publish fails, the
    # sweeper puts the entity back in line after COUPONS_REQUEUE_AFTER_SECONDS.
    deps.publisher.publish_retries([DueEntity(target.entity_id, target.event_id,
                                              target.series_id, target.customer_key, 0)])
    if deps.metrics is not None:
        deps.metrics.replays.labels(action).inc()
    _log("replayed", target, outcome, operator, reason)
    return _result(target, outcome)


def discard(selection: Selection, *, reason: str, operator: str, deps: SupportDeps,
            dry_run: bool = False) -> list[ActionResult]:
    """Close the selected entities without issuing."""
    if not reason.strip():
        raise ValueError("a reason is required")
    results = []
    for candidate in _targets(deps, selection):
        if dry_run:
            results.append(_result(candidate, "would discard"))
            continue
        now = deps.clock()
        with deps.uow() as uow:
            repo = SupportRepository(uow.session)
            target = repo.lock(candidate.entity_id)
            assert target is not None
            if target.state not in selection.states:
                outcome = f"skipped: now {target.state}"
            else:
                outcome = "discarded"
                repo.discard(target, now=now)
                repo.history(target, kind="discarded", state=EntityState.DISCARDED.value,
                             message=f"{reason} (by {operator})", operator=operator, now=now)
                repo.refresh_events([target.event_id], now=now)
            repo.audit(action="discard", operator=operator, reason=reason, outcome=outcome,
                       now=now, entity_id=target.entity_id, event_id=target.event_id)
            uow.commit()
        if deps.metrics is not None and outcome == "discarded":
            deps.metrics.replays.labels("discard").inc()
        _log("discarded" if outcome == "discarded" else "discard_skipped", target, outcome,
             operator, reason)
        results.append(_result(target, outcome))
    return results


def replay_event(event_id: str, *, reason: str, operator: str, deps: SupportDeps,
                 dry_run: bool = False, rate_per_s: float = 20.0) -> list[ActionResult]:
    """Re-run what an event has not issued yet: dead entities and waiting retries."""
    selection = Selection(event_id=event_id, states=EVENT_REPLAYABLE)
    results = replay(selection, reason=reason, operator=operator, deps=deps, dry_run=dry_run,
                     rate_per_s=rate_per_s, action="event_replay")
    if not results and not dry_run:
        with deps.uow() as uow:
            SupportRepository(uow.session).audit(
                action="event_replay", operator=operator, reason=reason,
                outcome="nothing to replay", now=deps.clock(), event_id=event_id)
            uow.commit()
    return results
