"""What waits, put right by a person: "retry now" and "give up".

An entity waits in ``retry_wait`` for its next attempt: after a failure worth retrying, or
after a call whose outcome is unknown (it is read back before anything is sent again, and only
sent once its settle window has passed). "Retry now" makes it due at once: the sweeper sends
it through the ordinary retry path within a sweep, read-back first when its outcome is
unknown, so it is never issued twice. "Give up" makes it a dead letter, with who and why as
its reason, announced on the dead-letter queue like any other; it can be replayed or discarded
from there. Each is locked and re-checked (one that moved on meanwhile is skipped) and audited
in the same transaction as its change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from worker.adapters.postgres.support import Target
from worker.domain.errors import NotFound
from worker.domain.model import WAITING, EntityState, check_transition
from worker.domain.text import printable
from worker.usecases.action_plans import MAX_IDS, too_many
from worker.usecases.support import ActionResult, SupportDeps

log = logging.getLogger("worker.support")

_WAITING = frozenset(s.value for s in WAITING)


def _result(target: Target, outcome: str) -> ActionResult:
    return ActionResult(target.entity_id, target.event_id, target.series_id,
                        target.customer_key, target.state, outcome)


def retry_now(entity_ids: Sequence[int], *, operator: str, deps: SupportDeps,
              reason: str = "", origin: dict[str, str] | None = None) -> list[ActionResult]:
    """Make these waiting entities due now; those no longer waiting are skipped."""
    return [_act("retry_now", entity_id, operator=operator, reason=reason or "retry now",
                 deps=deps, origin=origin) for entity_id in _bounded(entity_ids)]


def give_up(entity_ids: Sequence[int], *, reason: str, operator: str, deps: SupportDeps,
            origin: dict[str, str] | None = None) -> list[ActionResult]:
    """Make these waiting entities dead letters, ``reason`` (required) saying why."""
    if not reason.strip():
        raise ValueError("a reason is required to give up")
    return [_act("give_up", entity_id, operator=operator, reason=reason, deps=deps,
                 origin=origin) for entity_id in _bounded(entity_ids)]


def _bounded(entity_ids: Sequence[int]) -> Sequence[int]:
    if not entity_ids:
        raise ValueError("choose at least one waiting entity")
    if len(entity_ids) > MAX_IDS:
        raise too_many(len(entity_ids))
    return entity_ids


def _act(action: str, entity_id: int, *, operator: str, reason: str, deps: SupportDeps,
         origin: dict[str, str] | None) -> ActionResult:
    reason, operator = printable(reason), printable(operator)
    now = deps.clock()
    with deps.uow() as uow:
        repo = uow.ledger
        target = repo.lock_target(entity_id)
        if target is None:
            raise NotFound(f"no entity {entity_id}")
        if target.state not in _WAITING:
            outcome = f"skipped: now {target.state}"
        elif action == "retry_now":
            repo.make_due(target, now=now)
            outcome = "due now"
            repo.operator_history(target, kind="retry_now", state=target.state,
                                  message=f"{reason} (by {operator})", operator=operator,
                                  now=now)
        else:
            check_transition(EntityState(target.state), EntityState.DEAD)
            why = f"given up by {operator}: {reason}"
            repo.give_up(target, reason=why, now=now)
            outcome = "dead (given up)"
            repo.operator_history(target, kind="given_up", state=EntityState.DEAD.value,
                                  message=why, operator=operator, now=now)
            repo.refresh_event_states([target.event_id], now=now)
        repo.audit(action=action, operator=operator, reason=reason, outcome=outcome, now=now,
                   entity_id=target.entity_id, event_id=target.event_id,
                   details={"state_before": target.state, "attempts": target.attempts,
                            "unknown_outcome": target.needs_reconcile, **(origin or {})})
        uow.commit()
    log.warning(f"entity.{action}", extra={
        "event_id": target.event_id, "customer": target.customer_key,
        "series": target.series_id, "entity_id": target.entity_id, "outcome": outcome,
        "operator": operator, "reason": reason})
    return _result(target, outcome)
