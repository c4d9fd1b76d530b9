"""Retention: prune settled events, forget their ids after the window, age out the audit trail.

``prune`` runs from ``coupon-worker prune`` and, when ``COUPONS_RETENTION_DAYS`` is set, from
the workers' sweeper (``run_scheduled``): at most once per ``COUPONS_RETENTION_INTERVAL_SECONDS``
across the fleet. What is pruned, what is kept and why, and why batched deletes rather than
partitions: docs/retention.md.

- settled events (every entity issued or discarded, no late-original check due) older than
  the retention lose their entities, coupons, history and calls; the event row stays, emptied
  of the customer, metadata and payload and holding the outcome (states, coupon codes), so a
  redelivery of its id is still recognised and not issued again;
- those rows are deleted, and the id forgotten, once the event-id window has passed;
- audit rows go past their own, longer age, through the one door the trigger opens;
- dead letters, duplicates, unsettled events and rejected messages are never pruned: they are
  counted and reported as kept.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from worker.adapters.postgres.retention import RetentionLedger
from worker.config import Settings

log = logging.getLogger("worker.retention")

#: The scheduled job's name in ``maintenance_runs``.
PRUNE_JOB = "prune"
SECONDS_PER_DAY = 86_400


class PrunedCounter(Protocol):
    """Where a run's counts go (``Metrics.ledger_pruned``), by table."""

    def labels(self, *labelvalues: str) -> Any: ...


@dataclass(frozen=True)
class RetentionPolicy:
    """How old is old enough, for each kind of row, and how many rows a transaction takes."""

    older_than_s: float
    event_id_window_s: float
    audit_days: int
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.event_id_window_s < self.older_than_s:
            raise ValueError("the event-id window (COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS) must "
                             "be at least the retention (--older-than, COUPONS_RETENTION_DAYS): "
                             "an id is recognised for as long as its event is kept, and after")
        if self.audit_days * SECONDS_PER_DAY < self.older_than_s:
            raise ValueError("the audit retention (COUPONS_RETENTION_AUDIT_DAYS) must be at "
                             "least the retention (--older-than, COUPONS_RETENTION_DAYS)")
        if self.batch_size < 1:
            raise ValueError("the batch size must be at least 1")


def policy_from(settings: Settings, *, older_than_s: float | None = None,
                batch_size: int | None = None) -> RetentionPolicy:
    """The policy the settings describe; ``older_than_s`` instead of
    ``COUPONS_RETENTION_DAYS`` when given (one of the two is needed)."""
    if older_than_s is None:
        if settings.retention_days is None:
            raise ValueError("say how old: --older-than 90d, or set COUPONS_RETENTION_DAYS")
        older_than_s = float(settings.retention_days * SECONDS_PER_DAY)
    return RetentionPolicy(
        older_than_s=older_than_s,
        event_id_window_s=float(settings.retention_event_id_window_days * SECONDS_PER_DAY),
        audit_days=settings.retention_audit_days,
        batch_size=batch_size or settings.retention_batch_size)


@dataclass
class PruneReport:
    """What a run removed (or, dry, would remove), and what it kept although old, and why."""

    dry_run: bool
    events: int = 0
    entities: int = 0
    coupons: int = 0
    history: int = 0
    calls: int = 0
    #: Pruned events whose window ended: their rows deleted, their ids no longer recognised.
    event_ids_forgotten: int = 0
    audit: int = 0
    replay_jobs: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    duration_s: float = 0.0

    def removed(self) -> dict[str, int]:
        return {"events": self.events, "entities": self.entities, "coupons": self.coupons,
                "history": self.history, "calls": self.calls,
                "event_ids_forgotten": self.event_ids_forgotten, "audit": self.audit,
                "replay_jobs": self.replay_jobs}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(store: RetentionLedger, policy: RetentionPolicy, *, dry_run: bool = False,
          pruned: PrunedCounter | None = None,
          clock: Callable[[], float] = time.monotonic) -> PruneReport:
    """One full pass, in batches of ``policy.batch_size`` rows per transaction."""
    started = clock()
    report = PruneReport(dry_run=dry_run)
    kept: Counter[str] = Counter()
    after = None
    while True:
        batch = store.prune_events(older_than_s=policy.older_than_s, limit=policy.batch_size,
                                   dry_run=dry_run, after=after)
        report.batches += 1
        for name in ("events", "entities", "coupons", "history", "calls"):
            setattr(report, name, getattr(report, name) + getattr(batch, name))
        kept.update(batch.kept)
        if batch.after is None:
            break
        after = batch.after
    report.event_ids_forgotten = _drain(
        lambda: store.forget_event_ids(window_s=policy.event_id_window_s,
                                       limit=policy.batch_size, dry_run=dry_run),
        dry_run, policy.batch_size, report)
    report.audit = _drain(
        lambda: store.prune_audit(audit_days=policy.audit_days, limit=policy.batch_size,
                                  dry_run=dry_run),
        dry_run, policy.batch_size, report)
    report.replay_jobs = store.prune_replay_jobs(older_than_s=policy.older_than_s,
                                                 dry_run=dry_run)
    kept.update(store.kept(older_than_s=policy.older_than_s))
    report.kept = {reason: count for reason, count in sorted(kept.items()) if count}
    report.duration_s = round(clock() - started, 3)
    if pruned is not None and not dry_run:
        for table, count in report.removed().items():
            if count:
                pruned.labels(table).inc(count)
    log.info("retention.dry_run" if dry_run else "retention.pruned", extra={
        **report.removed(), "kept": report.kept, "batches": report.batches,
        "duration_s": report.duration_s, "older_than_s": policy.older_than_s,
        "event_id_window_s": policy.event_id_window_s, "audit_days": policy.audit_days})
    return report


def _drain(step: Callable[[], int], dry_run: bool, batch_size: int,
           report: PruneReport) -> int:
    """Run ``step`` until a batch comes back short; a dry run counts everything at once."""
    total = 0
    while True:
        done = step()
        report.batches += 1
        total += done
        if dry_run or done < batch_size:
            return total


def run_scheduled(store: RetentionLedger, policy: RetentionPolicy, *, every_s: float,
                  worker: str, pruned: PrunedCounter | None = None) -> PruneReport | None:
    """Prune if no worker of the fleet started a prune in the last ``every_s``; None if one
    did (or holds the claim right now)."""
    if not store.claim_run(PRUNE_JOB, every_s=every_s, worker=worker):
        return None
    report = prune(store, policy, pruned=pruned)
    store.finish_run(PRUNE_JOB, {**report.removed(), "kept": report.kept,
                                 "duration_s": report.duration_s, "worker": worker})
    return report
