"""Thin Celery tasks: decode the message, call one service, map the outcome to the broker.

No SQL and no HTTP here. The three tasks:
- ``coupons.issue(event)``: an event from a Python producer (Celery protocol);
- ``coupons.ingest(body, ...)``: a raw message from the plain-JSON bus, forwarded by the bridge;
- ``coupons.retry(entity_id)``: one entity whose retry is due.

Outcome mapping: a bad event is recorded as rejected and the message acknowledged (never
requeued in a loop); a database outage or stall (statement/lock timeout) puts the message back
(``Reject(requeue=True)``) after the pause ``worker.domain.policy.requeue`` decides, since nothing
was recorded, and so does the soft time limit; an unexpected error is recorded as a rejection
with the error, so the payload is kept and can be replayed once the bug is fixed, and if even
that cannot be recorded the message goes back. Nothing a sender puts in a message may raise
before that mapping: the raw bytes are computed defensively.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded

from worker.adapters.rabbitmq.names import TASK_INGEST, TASK_ISSUE, TASK_MARK, TASK_RETRY
from worker.domain.errors import EventRejected, LedgerUnavailable
from worker.domain.events import EVENT_ID_MAX_CHARS, parse_event_bytes, parse_event_data
from worker.domain.runtime_policy import Requeue, requeue
from worker.domain.text import printable
from worker.entrypoints.celery.context import container_of
from worker.usecases import delivery
from worker.usecases.deps import Deps, Report
from worker.usecases.issue import issue_event, retry_entity
from worker.usecases.rejection import record_rejection

log = logging.getLogger(__name__)


def raw_json(data: object) -> bytes:
    """The bytes kept for an event that came decoded (a Celery task), whatever it holds.

    ASCII JSON, so lone surrogates and NULs are escapes rather than bytes. What JSON cannot
    write (nesting past the interpreter's recursion limit, cycles) is kept as a marker.
    """
    try:
        return json.dumps(data, default=str).encode("ascii")
    except (ValueError, TypeError, RecursionError) as exc:
        return f"<not serialisable as JSON: {type(exc).__name__}>".encode("ascii")


def handle_event(data: object, *, source: str, deps: Deps) -> Report:
    """Validate event data and issue it; a bad event becomes a recorded rejection."""
    try:
        event = parse_event_data(data)
        return issue_event(event, source=source, deps=deps)
    except EventRejected as exc:
        rejected = record_rejection(
            raw_json(data), exc.reason, source=source, deps=deps, event_id=exc.event_id,
            content_type="application/json")
        return Report(exc.event_id, rejected_id=rejected)


def handle_raw(body: bytes, *, content_type: str | None, source: str, deps: Deps,
               max_bytes: int) -> Report:
    """Decode and validate a raw bus message and issue it; bad input is recorded."""
    try:
        event = parse_event_bytes(body, max_bytes=max_bytes)
        return issue_event(event, source=source, deps=deps)
    except EventRejected as exc:
        rejected = record_rejection(
            body, exc.reason, source=source, deps=deps, event_id=exc.event_id,
            content_type=content_type)
        return Report(exc.event_id, rejected_id=rejected)


def _requeue(exc: BaseException, decision: Requeue) -> Reject:
    """Carry out a ``Requeue``: the message goes back, nothing about it is recorded yet."""
    time.sleep(decision.pause_s)
    return Reject(str(exc), requeue=True)


def _run(deps_of: Callable[[], Deps], work: Callable[[Deps], Report], *, raw: bytes | None,
         source: str, event_id: str | None, content_type: str | None = None,
         failure_limit: int = 1) -> dict[str, object]:
    """Run one use case; ``raw`` is kept as a dead letter if it keeps failing unexpectedly.

    Every way out either returns (the outcome, or a rejection, or a dead letter, is committed)
    or raises ``Reject(requeue=True)``: the message is never acknowledged without a record. Only
    the message's own bytes make it rejected; any other failure sends it back
    (``worker.usecases.delivery``) until ``failure_limit`` deliveries have failed.
    """
    try:
        deps = deps_of()
        return work(deps).as_dict()
    except LedgerUnavailable as exc:
        log.error("ledger.unavailable", extra={"event_id": event_id, "error": str(exc)})
        raise _requeue(exc, requeue(ledger_down=True)) from exc
    except SoftTimeLimitExceeded as exc:
        # Out of time with the outcome uncommitted; claims already taken make the redelivery
        # a no-op and come back through their lease.
        log.error("task.time_limit", extra={"event_id": event_id, "error": repr(exc)})
        raise _requeue(exc, requeue(ledger_down=False)) from exc
    except Exception as exc:
        log.exception("task.unexpected_error", extra={"event_id": event_id})
        if raw is None:
            # A retry holds no payload: its entity keeps its claim, whose lease expiry sends
            # it back through the sweeper.
            return {"internal_error": str(exc)}
        try:
            outcome = delivery.after_failure(
                raw, exc, source=source, event_id=event_id, content_type=content_type,
                deps=deps_of(), limit=failure_limit)
        except Exception as uncounted:
            # Not even the failure could be counted (database down or stalled, or out of
            # time): the message is the only copy left.
            log.error("task.failure_unrecorded",
                      extra={"event_id": event_id, "error": repr(uncounted)})
            raise _requeue(uncounted, requeue(ledger_down=True)) from uncounted
        if isinstance(outcome, Requeue):
            raise _requeue(exc, outcome) from exc
        return {"event_id": event_id, "dead_letter_id": outcome, "internal_error": str(exc)}


def _event_id_of(data: object) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("eventId"), str):
        return printable(str(data["eventId"]), limit=EVENT_ID_MAX_CHARS)
    return None


def _label(value: object) -> str | None:
    return printable(str(value), limit=EVENT_ID_MAX_CHARS) if value is not None else None


def decode_body(body: object, encoding: str) -> bytes:
    """The bytes the bridge forwarded, or, from any other sender, the closest bytes there are.

    Never raises: undecodable base64 is kept as the text it is, and lone surrogates are kept
    as the bytes they would be (invalid UTF-8, which validation then names).
    """
    if not isinstance(body, str):
        return raw_json(body)
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            pass
    return body.encode("utf-8", "surrogatepass")


def register(app: Celery) -> None:
    """Register the tasks on ``app`` (tasks are bound to the app that runs them)."""
    def deps() -> Deps:
        base = container_of(app).deps()
        task = app.current_worker_task
        if task is None or not task.request.id:
            return base
        # Who recorded each call and transition: this process and this task, so that the
        # support console links an attempt to its task in Flower.
        return replace(base, worker_id=f"{base.worker_id}{TASK_MARK}{task.request.id}")

    def failure_limit() -> int:
        return container_of(app).settings.message_failure_limit

    def issue_call(event: dict[str, Any], source: str = "task") -> dict[str, object]:
        source = _label(source) or "task"
        return _run(deps, lambda d: handle_event(event, source=source, deps=d),
                    raw=raw_json(event), source=source, event_id=_event_id_of(event),
                    failure_limit=failure_limit())

    def ingest_call(body: str, encoding: str = "utf-8", content_type: str | None = None,
                    source: str = "bus", event_id: str | None = None) -> dict[str, object]:
        raw = decode_body(body, encoding)
        # The bridge sends these as text; any other sender's are labels, never trusted as-is.
        source = _label(source) or "bus"
        content_type, event_id = _label(content_type), _label(event_id)
        max_bytes = container_of(app).settings.max_event_bytes
        return _run(deps, lambda d: handle_raw(raw, content_type=content_type, source=source,
                                               deps=d, max_bytes=max_bytes),
                    raw=raw, source=source, event_id=event_id, content_type=content_type,
                    failure_limit=failure_limit())

    def retry_call(entity_id: int) -> dict[str, object]:
        return _run(deps, lambda d: retry_entity(entity_id, deps=d), raw=None,
                    source="retry", event_id=None)

    # The tasks take whatever a message holds and match it against their call themselves: a
    # message whose arguments do not fit would otherwise fail inside Celery, before any of
    # our code, and be acknowledged with nothing recorded.
    @app.task(name=TASK_ISSUE, ignore_result=True, shared=False)
    def issue(*args: Any, **kwargs: Any) -> str:
        """Issue the coupons of one event sent by a Python producer: ``(event, source)``."""
        return _call(issue_call, TASK_ISSUE, args, kwargs)

    @app.task(name=TASK_INGEST, ignore_result=True, shared=False)
    def ingest(*args: Any, **kwargs: Any) -> str:
        """Issue the coupons of one raw bus message (validated here, in the pool):
        ``(body, encoding, content_type, source, event_id)``."""
        return _call(ingest_call, TASK_INGEST, args, kwargs)

    @app.task(name=TASK_RETRY, ignore_result=True, shared=False)
    def retry(*args: Any, **kwargs: Any) -> str:
        """Run the due retry of one entity: ``(entity_id)``."""
        return _call(retry_call, TASK_RETRY, args, kwargs)

    # Worked out once, not for every task (10 us of CPU each time).
    signatures = {call: inspect.signature(call) for call in (issue_call, ingest_call, retry_call)}

    def _call(call: Callable[..., dict[str, object]], name: str, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> str:
        signature = signatures[call]
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raw = raw_json({"task": name, "args": list(args), "kwargs": kwargs})
            reason = f"task {name}{signature} called with arguments that do not fit: {exc}"
            event_id = _event_id_of(args[0]) if args else _event_id_of(kwargs.get("event"))
            outcome = _run(deps, lambda d: _rejected(raw, reason, event_id, d), raw=raw,
                           source="task", event_id=event_id, failure_limit=failure_limit())
        else:
            outcome = call(*args, **kwargs)
        return summary(outcome)


def summary(outcome: dict[str, object]) -> str:
    """A task's result as Flower shows it: ``event_id=e-1 new_event=True issued=1``.

    Text rather than the dict: Celery writes every result out with its ``saferepr``, which
    took 30 us of CPU an event for a dict of four keys, and 5 us for this line.
    """
    return " ".join(f"{key}={value}" for key, value in outcome.items())


def _rejected(raw: bytes, reason: str, event_id: str | None, deps: Deps) -> Report:
    rejected = record_rejection(raw, reason, source="task", deps=deps, event_id=event_id,
                                content_type="application/json")
    return Report(event_id, rejected_id=rejected)
