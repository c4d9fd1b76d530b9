"""Support engineers' use cases: replay and discard dead entities, replay an event, resubmit
a rejected message once fixed.

Safe by construction: an entity is re-run through the same retry path as any retry (claim,
reconcile when its last outcome was unknown, then issue), so a replay of something that was
issued meanwhile is a no-op and two replays never issue twice. A resubmitted event goes through
the same validation and the same ``coupons.issue`` task as any event, so it is issued exactly
once whatever happens to the command. Every action is an audit row, written in the same
transaction as the change; ``dry_run`` reads and changes nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from worker.adapters.postgres.circuit_store import CircuitLedger
from worker.adapters.postgres.issuing import fingerprint
from worker.adapters.postgres.records import DueEntity
from worker.adapters.postgres.support import RejectedRow, Selection, SupportLedger, Target
from worker.adapters.postgres.unit_of_work import UnitOfWorkFactory
from worker.domain import model
from worker.domain.errors import EventRejected, NotFound, WorkerError
from worker.domain.events import LoyaltyEvent, parse_event_bytes
from worker.domain.model import EntityState, check_transition
from worker.domain.resubmission import changed_valid_fields, original_fields, refusal
from worker.domain.text import printable
from worker.metrics import Metrics
from worker.usecases.deps import Publisher

log = logging.getLogger("worker.support")

RESUBMIT_SOURCE = "resubmit"
# The state machine's sets (worker.domain.model), as the ledger's selections name them.
REPLAYABLE = tuple(sorted(s.value for s in model.REPLAYABLE))
EVENT_REPLAYABLE = tuple(sorted(s.value for s in model.EVENT_REPLAYABLE))
DISCARDABLE = tuple(sorted(s.value for s in model.DISCARDABLE))


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


class OperatorLedger(SupportLedger, CircuitLedger, Protocol):
    """The parts of the ledger support engineers' actions use: their entities, rejected
    messages and audit (``SupportLedger``), and the circuit they may close by hand
    (``worker.usecases.circuit_control``)."""


@dataclass
class SupportDeps:
    """What the support use cases need: the ledger, the retry queue, a clock.

    The same unit of work and ledger protocol as the services': the SQL ledger in production,
    the in-memory fake in unit tests.
    """

    uow: UnitOfWorkFactory[OperatorLedger]
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
        return uow.ledger.support_targets(selection)


def replay(selection: Selection, *, reason: str, operator: str, deps: SupportDeps,
           dry_run: bool = False, rate_per_s: float = 20.0,
           action: str = "replay", origin: dict[str, str] | None = None) -> list[ActionResult]:
    """Send the selected entities through the retry path again, at most ``rate_per_s``.

    ``origin`` says where the operator acted from (the OS user of a CLI, the console's
    login); it is kept in each audit row's details.
    """
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
                                   operator=operator, deps=deps, action=action, origin=origin))
    return results


def replay_one(entity_id: int, selection: Selection, *, reason: str, operator: str,
               deps: SupportDeps, action: str = "replay",
               origin: dict[str, str] | None = None) -> ActionResult:
    """Replay one entity if it is still in one of ``selection.states`` (else skip it)."""
    return _replay_one(entity_id, selection, reason=reason, operator=operator, deps=deps,
                       action=action, origin=origin)


def _replay_one(entity_id: int, selection: Selection, *, reason: str, operator: str,
                deps: SupportDeps, action: str,
                origin: dict[str, str] | None = None) -> ActionResult:
    now = deps.clock()
    with deps.uow() as uow:
        repo = uow.ledger
        target = repo.lock_target(entity_id)
        if target is None:  # its event was deleted since it was listed
            raise NotFound(f"no entity {entity_id}")
        if target.state not in selection.states:
            # Changed since it was listed (issued, discarded, replayed by someone else).
            outcome = f"skipped: now {target.state}"
            repo.audit(action=action, operator=operator, reason=reason, outcome=outcome,
                       now=now, entity_id=target.entity_id, event_id=target.event_id,
                       details=dict(origin or {}))
            uow.commit()
            _log("replay_skipped", target, outcome, operator, reason)
            return _result(target, outcome)
        fresh_attempts = target.state == EntityState.DEAD.value
        check_transition(EntityState(target.state), EntityState.QUEUED)
        repo.requeue_target(target, now=now, reset_attempts=fresh_attempts)
        outcome = "requeued (reconcile first)" if target.needs_reconcile else "requeued"
        repo.operator_history(target, kind="replayed", state=EntityState.QUEUED.value,
                     message=f"{reason} (by {operator})", operator=operator, now=now)
        repo.audit(action=action, operator=operator, reason=reason, outcome=outcome, now=now,
                   entity_id=target.entity_id, event_id=target.event_id,
                   details={"state_before": target.state, "attempts_before": target.attempts,
                            **(origin or {})})
        repo.refresh_event_states([target.event_id], now=now)
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
            dry_run: bool = False, origin: dict[str, str] | None = None) -> list[ActionResult]:
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
            repo = uow.ledger
            target = repo.lock_target(candidate.entity_id)
            assert target is not None
            if target.state not in selection.states:
                outcome = f"skipped: now {target.state}"
            else:
                outcome = "discarded"
                check_transition(EntityState(target.state), EntityState.DISCARDED)
                repo.discard_target(target, now=now)
                repo.operator_history(target, kind="discarded", state=EntityState.DISCARDED.value,
                             message=f"{reason} (by {operator})", operator=operator, now=now)
                repo.refresh_event_states([target.event_id], now=now)
            repo.audit(action="discard", operator=operator, reason=reason, outcome=outcome,
                       now=now, entity_id=target.entity_id, event_id=target.event_id,
                       details=dict(origin or {}))
            uow.commit()
        if deps.metrics is not None and outcome == "discarded":
            deps.metrics.replays.labels("discard").inc()
        _log("discarded" if outcome == "discarded" else "discard_skipped", target, outcome,
             operator, reason)
        results.append(_result(target, outcome))
    return results


def replay_event(event_id: str, *, reason: str, operator: str, deps: SupportDeps,
                 dry_run: bool = False, rate_per_s: float = 20.0,
                 origin: dict[str, str] | None = None) -> list[ActionResult]:
    """Re-run what an event has not issued yet: dead entities and waiting retries."""
    selection = Selection(event_id=event_id, states=EVENT_REPLAYABLE)
    results = replay(selection, reason=reason, operator=operator, deps=deps, dry_run=dry_run,
                     rate_per_s=rate_per_s, action="event_replay", origin=origin)
    if not results and not dry_run:
        with deps.uow() as uow:
            uow.ledger.audit(
                action="event_replay", operator=operator, reason=reason,
                outcome="nothing to replay", now=deps.clock(), event_id=event_id,
                details=dict(origin or {}))
            uow.commit()
    return results


# -- resubmitting a rejected message ----------------------------------------------------------


class EventSubmitter(Protocol):
    """Sends a valid event the way a producer would (the ``coupons.issue`` task)."""

    def submit_event(self, event: LoyaltyEvent, *, source: str) -> None: ...


@dataclass(frozen=True)
class ResubmitResult:
    """What resubmitting a rejected message did (or would do)."""

    rejected_id: int
    event_id: str | None
    outcome: str
    accepted: bool  # resubmitted, or linked to the event already in the ledger

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _resubmit_plan(row: RejectedRow, event: LoyaltyEvent | None, problem: str | None,
                   payload: bytes, repo: SupportLedger, *, resend: bool) -> tuple[str, str]:
    """(what to do: submit | resend | link | refuse, the outcome in words)."""
    if event is None:
        return "refuse", _already(row) if row.resubmitted_at is not None else \
            f"refused: the fixed payload is not a valid event: {problem}"
    changed = _changed_valid_fields(row, event, payload)
    existing = repo.event_fingerprint(event.eventId)
    if changed or row.resubmitted_at is not None:
        if changed:
            return "refuse", refusal(changed)
        if not resend or existing is not None or event.eventId != row.resubmitted_event_id:
            return "refuse", _already(row)
        # On record, but its event is not in the ledger: the publish after the commit
        # failed (or the event is still on its way). Sent again: the ledger keys events by
        # eventId, so it is issued once either way.
        return "resend", f"sent again as event {event.eventId} (not in the ledger yet)"
    return _submit_or_link(event, existing)


def _submit_or_link(event: LoyaltyEvent, existing: tuple[str, str] | None) -> tuple[str, str]:
    if existing is None:
        return "submit", f"resubmitted as event {event.eventId}"
    found, state = existing
    if found != fingerprint(event):
        return "refuse", (f"refused: eventId {event.eventId} is already in the ledger for a "
                          "different event (customer, series or metadata differ)")
    return "link", f"linked: event {event.eventId} is already in the ledger ({state})"


def _audit_unsent(rejected_id: int, event_id: str, exc: WorkerError, *, operator: str,
                  deps: SupportDeps) -> None:
    log.error("rejected.resubmit_publish_failed", extra={
        "rejected_id": rejected_id, "event_id": event_id, "error": str(exc)})
    with deps.uow() as uow:
        uow.ledger.audit(action="rejected_resubmit", operator=operator,
                         reason="the publish failed", outcome=f"not sent: {exc}",
                         now=deps.clock(), event_id=event_id,
                         details={"rejected_id": rejected_id})
        uow.commit()


def _already(row: RejectedRow) -> str:
    at = row.resubmitted_at.isoformat(timespec="seconds") if row.resubmitted_at else "?"
    return (f"refused: already resubmitted as event {row.resubmitted_event_id} at {at} (if "
            "that publish failed, the event is not in the ledger: send it again with resend)")


def _changed_valid_fields(row: RejectedRow, event: LoyaltyEvent, payload: bytes) -> list[str]:
    """What the fix changes that the original sent valid (``worker.domain.resubmission``)."""
    fixed = original_fields(payload) or {}
    original = original_fields(row.raw)
    if original is None:
        # Not a JSON object: nothing of it can be compared but the eventId it was kept under.
        return ["eventId"] if row.event_id and event.eventId != row.event_id else []
    return changed_valid_fields(original, fixed)


def resubmit_rejected(rejected_id: int, payload: bytes, *, reason: str, operator: str,
                      deps: SupportDeps, submitter: EventSubmitter, max_bytes: int,
                      dry_run: bool = False, os_user: str | None = None,
                      resend: bool = False) -> ResubmitResult:
    """Send the fixed version of a rejected message through the normal intake, once.

    The payload is validated exactly as a message from the bus would be. The rejected row is
    kept as received, only linked to the event it became; a second resubmission of it is
    refused, and an event id already in the ledger is linked when the content is the same and
    refused when it differs (an idempotency key names one request). The fix keeps the
    original's eventId, customer and series: only what failed validation, and the metadata,
    may change (``worker.domain.resubmission``).

    It is recorded (committed) before it is published. Should the publish fail, ``resend``
    sends it again later, as long as its event is not in the ledger yet (the ledger keys
    events by eventId, so it is issued once).
    """
    if not reason.strip():
        raise ValueError("a reason is required")
    reason, operator = printable(reason), printable(operator)
    event: LoyaltyEvent | None = None
    problem: str | None = None
    try:
        event = parse_event_bytes(payload, max_bytes=max_bytes)
    except EventRejected as exc:
        problem = exc.reason
    now = deps.clock()
    with deps.uow() as uow:
        repo = uow.ledger
        row = repo.lock_rejected(rejected_id)
        if row is None:
            raise NotFound(f"no rejected event {rejected_id}")
        action, outcome = _resubmit_plan(row, event, problem, payload, repo, resend=resend)
        event_id = event.eventId if event is not None else None
        if dry_run:
            if action != "refuse":
                outcome = f"would be {outcome}"
            return ResubmitResult(rejected_id, event_id, outcome, action != "refuse")
        if event is not None and action in ("submit", "link"):
            # Once: the database refuses to link a rejected message a second time.
            repo.link_resubmission(rejected_id, event_id=event.eventId, now=now)
        details: dict[str, Any] = {
            "rejected_id": rejected_id, "os_user": printable(os_user or default_operator()),
            "original_event_id": row.event_id, "original_reason": row.reason,
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload": event.to_message() if event is not None else None,
        }
        repo.audit(action="rejected_resubmit", operator=operator, reason=reason,
                   outcome=outcome, now=now, event_id=event_id, details=details)
        uow.commit()
    if event is not None and action in ("submit", "resend"):
        # Sent after the commit, so what is sent is always on record first. Should the broker
        # refuse it, the failure is audited and running the resubmission again sends it
        # ("resend"): the ledger keys events by eventId, so it is issued once.
        try:
            submitter.submit_event(event, source=RESUBMIT_SOURCE)
        except WorkerError as exc:
            _audit_unsent(rejected_id, event.eventId, exc, operator=operator, deps=deps)
            raise type(exc)(f"recorded but not sent: {exc}; run the resubmission again to "
                            "send it") from exc
    if deps.metrics is not None and action != "refuse":
        deps.metrics.replays.labels("resubmit").inc()
    log.warning("rejected.resubmitted" if action != "refuse" else "rejected.resubmit_refused",
                extra={"rejected_id": rejected_id, "event_id": event_id, "outcome": outcome,
                       "operator": operator, "reason": reason})
    return ResubmitResult(rejected_id, event_id, outcome, action != "refuse")
