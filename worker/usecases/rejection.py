"""Keep a message that is not a valid event (or that our side kept failing on), with why.

The last line for poison input: it must not fail on it (``record_rejection``).
"""

from __future__ import annotations

import logging

from worker.domain.errors import LedgerError, LedgerUnavailable
from worker.domain.model import DeadMessageKind
from worker.domain.text import printable
from worker.usecases.deps import Deps

log = logging.getLogger("worker.pipeline")

REJECTION_REASON_MAX_CHARS = 4000
REJECTION_LABEL_MAX_CHARS = 200


def record_rejection(raw: bytes, reason: str, *, source: str, deps: Deps,
                     event_id: str | None = None, content_type: str | None = None,
                     kind: DeadMessageKind = DeadMessageKind.INVALID) -> int:
    """Keep a message that is not a valid event, with the precise reason; returns its id.

    ``kind`` says whose fault: ``INVALID`` (its own bytes: a rejection) unless
    ``worker.usecases.delivery`` keeps a message that our side kept failing on (a dead letter).

    This is the last line for poison input, so it must not fail on it: text that PostgreSQL
    refuses (NUL, lone surrogates) is escaped, the raw bytes are kept as they are (bytea), and
    a row the database still refuses is stored once more with only what cannot be refused.
    """
    reason = printable(reason, limit=REJECTION_REASON_MAX_CHARS)
    source = printable(source, limit=REJECTION_LABEL_MAX_CHARS)
    event_id = printable(event_id, limit=REJECTION_LABEL_MAX_CHARS) if event_id else None
    content_type = (printable(content_type, limit=REJECTION_LABEL_MAX_CHARS)
                    if content_type else None)
    try:
        rejected_id = _insert_rejection(raw, reason, source, event_id, content_type, kind, deps)
    except LedgerUnavailable:
        raise
    except LedgerError as exc:
        log.error("event.rejection_refused", extra={"event_id": event_id, "error": str(exc)})
        reason = printable(f"{reason} (stored without its event id and content type: "
                           f"{exc})".encode("ascii", "backslashreplace").decode("ascii"),
                           limit=REJECTION_REASON_MAX_CHARS)
        event_id = content_type = None
        rejected_id = _insert_rejection(raw, reason, source, None, None, kind, deps)
    invalid = kind is DeadMessageKind.INVALID
    deps.metrics.events_received.labels("rejected" if invalid else "dead_lettered").inc()
    log.warning(
        "event.rejected" if invalid else "event.dead_lettered",
        extra={"rejected_id": rejected_id, "event_id": event_id, "source": source,
               "reason": reason, "size_bytes": len(raw), "kind": str(kind)},
    )
    return rejected_id


def _insert_rejection(raw: bytes, reason: str, source: str, event_id: str | None,
                      content_type: str | None, kind: DeadMessageKind, deps: Deps) -> int:
    with deps.uow() as uow:
        rejected_id = uow.ledger.record_rejection(
            raw=raw, reason=reason, source=source, event_id=event_id,
            content_type=content_type, now=deps.clock(), kind=kind,
        )
        uow.commit()
    return rejected_id
