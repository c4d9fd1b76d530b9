"""A message that fails for a reason not its own: back to its queue, then a dead letter.

Only a message's own bytes make it *rejected* (``EventRejected``). An unexpected error in our
code, or a dependency refusing it (a database error that is not an outage, say), says nothing
about the event: the message goes back to its queue after a growing pause, its failures
counted in the ledger, and past ``COUPONS_MESSAGE_FAILURE_LIMIT`` it is kept as received in
``rejected_events`` with the kind of failure (``internal_error`` or ``infrastructure``). That
is a dead letter: ``rejected resubmit ID`` sends it again as received, once the cause is fixed.
Redelivering an event is safe: the ledger keys it by event id, and claims already taken make a
redelivery a no-op for their entities until their lease runs out.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

from worker.domain.errors import LedgerError
from worker.domain.model import DeadMessageKind
from worker.domain.runtime_policy import (
    FAILURE_COUNT_FORGOTTEN_AFTER_S,
    KeepAsDeadLetter,
    Requeue,
    after_failed_delivery,
    failure_kind,
)
from worker.domain.text import printable
from worker.usecases.deps import Deps
from worker.usecases.rejection import record_rejection

log = logging.getLogger("worker.pipeline")

FAILURE_TEXT_MAX_CHARS = 1000


def failure_key(event_id: str | None, raw: bytes) -> str:
    """The key a message's failures are counted under: its event id, else its bytes' digest."""
    if event_id:
        return f"event:{event_id}"
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def after_failure(raw: bytes, error: BaseException, *, source: str, event_id: str | None,
                  content_type: str | None, deps: Deps, limit: int) -> Requeue | int:
    """Count one failed delivery of ``raw``: a ``Requeue`` to carry out, or the id of the
    dead letter it became. Raises ``LedgerUnavailable`` when nothing could be counted (the
    message then goes back as for any ledger outage)."""
    key = failure_key(printable(event_id, limit=200) if event_id else None, raw)
    kind = failure_kind(error)
    text = printable(f"{type(error).__name__}: {error}", limit=FAILURE_TEXT_MAX_CHARS)
    now = deps.clock()
    with deps.uow() as uow:
        failures = uow.ledger.count_message_failure(
            key, kind=kind, error=text, now=now,
            forget_before=now - timedelta(seconds=FAILURE_COUNT_FORGOTTEN_AFTER_S))
        uow.commit()
    decision = after_failed_delivery(failures, error, limit=limit)
    if isinstance(decision, Requeue):
        log.warning("event.delivery_failed", extra={
            "event_id": event_id, "source": source, "kind": str(kind), "failures": failures,
            "limit": limit, "pause_s": decision.pause_s, "error": text})
        return decision
    return _keep(decision, key, raw, text, failures, source=source, event_id=event_id,
                 content_type=content_type, deps=deps)


def _keep(decision: KeepAsDeadLetter, key: str, raw: bytes, text: str, failures: int, *,
          source: str, event_id: str | None, content_type: str | None, deps: Deps) -> int:
    label = "internal error" if decision.kind is DeadMessageKind.INTERNAL_ERROR \
        else "infrastructure"
    dead_id = record_rejection(
        raw, f"{label}: failed {failures} deliveries, the last with {text}", source=source,
        deps=deps, event_id=event_id, content_type=content_type, kind=decision.kind)
    # The count is only for deciding; a message dead-lettered again later starts afresh. The
    # dead letter is committed: a count left behind by an outage now costs nothing but a row.
    try:
        with deps.uow() as uow:
            uow.ledger.forget_message_failure(key)
            uow.commit()
    except LedgerError as exc:
        log.warning("event.failure_count_kept", extra={"event_id": event_id,
                                                        "error": str(exc)})
    return dead_id
