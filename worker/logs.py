"""Structured logs: one stable event name per line plus ids, as key=value or JSON.

Call sites log ``log.info("entity.issued", extra={"event_id": ..., "series": ...})``. Anything
that looks like a credential is redacted on the way out, whatever a caller passed.

Values often come from the outside (event ids, reasons, Capillary's messages): neither format
lets one forge a line (newline, carriage return) or reach a terminal as an escape sequence, and
no lone surrogate makes the stream's UTF-8 encoder drop the line.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import logging.handlers
import math
import queue
import re
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any, Literal

from worker.domain.text import printable

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
_SECRET_KEYS = re.compile(r"(password|secret|token|authorization|api[_-]?key)", re.IGNORECASE)
# An HTTP scheme word (``Authorization: Bearer <token>``) is kept and the credential after it
# hidden, not the scheme.
_SECRET_IN_TEXT = re.compile(
    r"(?i)(password|secret|token|authorization)(\"?\s*[:=]\s*\"?(?:(?:bearer|basic|token)\s+)?)"
    r"([^\s\",}&]+)"
)
# The words ``_SECRET_IN_TEXT`` looks for; a text without any of them has no match.
_SECRET_WORDS = ("password", "secret", "token", "authorization")
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@\s]+)(@)")
REDACTED = "***"
# Celery's loggers of the per-task "received" and "succeeded" lines (see configure_logging).
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
_URL_PASSWORD_HIDDEN = rf"\1{REDACTED}\3"
_SECRET_HIDDEN = rf"\1\2{REDACTED}"
# A key=value value is written bare only when it is plainly one token.
_BARE = re.compile(r"[^\s\"=\\]+")
# The one control character json.dumps leaves as it is.
_DEL, _DEL_ESCAPED = "\x7f", "\\u007f"


def redact_text(text: str) -> str:
    """Hide credentials in free text: URL passwords and ``secret=...`` style pairs."""
    # Both patterns need a ':' or a '=': most values (ids, codes, names) have neither, and
    # every worker writes a few lines per event.
    if ":" not in text and "=" not in text:
        return text
    if text.isascii():
        # Values with a ':' are common too (customer keys "id:...", worker names): in ASCII,
        # where lower() is exactly the patterns' case folding, a pattern that cannot match is
        # skipped without running it.
        lowered = text.lower()
        if "://" in text:
            text = _URL_PASSWORD.sub(_URL_PASSWORD_HIDDEN, text)
        if any(word in lowered for word in _SECRET_WORDS):
            text = _SECRET_IN_TEXT.sub(_SECRET_HIDDEN, text)
        return text
    text = _URL_PASSWORD.sub(_URL_PASSWORD_HIDDEN, text)
    return _SECRET_IN_TEXT.sub(_SECRET_HIDDEN, text)


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    return bool(_SECRET_KEYS.search(key))


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secrets hidden (by key name, and inside strings)."""
    if key and _secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _printable(value: Any, key: str = "") -> Any:
    """Strings (nested too) with control characters and lone surrogates escaped.

    A traceback keeps its line breaks: it is one field, and JSON encodes them.
    """
    if isinstance(value, str):
        return printable(value, keep="\n" if key == "traceback" else "")
    if isinstance(value, dict):
        return {printable(str(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        key: redact(value, key)
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields["error"] = redact_text(f"{type(exc).__name__}: {exc}")
        # One field, escaped onto the line, so a traceback never breaks one-line-per-event.
        fields["traceback"] = redact_text("".join(traceback.format_exception(exc)))
    return fields


def _message(record: logging.LogRecord) -> str:
    return printable(redact_text(record.getMessage()))


# json.dumps(value, default=str), its encoder built once rather than for every value.
_VALUE_ENCODER = json.JSONEncoder(default=str)


def _json_text(value: Any) -> str:
    # Numbers and null are most of the non-text values: written without the JSON encoder.
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return _VALUE_ENCODER.encode(value)


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(created: float) -> str:
    """``2026-11-25T10:00:00.123Z``: UTC, to the millisecond (truncated)."""
    # The second's text is worked out once a second (datetime and strftime took 2.2 of a
    # line's 16 us of CPU, this 0.6). Rounded to the microsecond first, as datetime does,
    # then cut to the millisecond.
    fraction, whole = math.modf(created)
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``2026-11-25T10:00:00Z INFO entity.issued event_id=... series=544770``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record.created), record.levelname, _message(record)]
        for key, value in _fields(record).items():
            text = value if isinstance(value, str) else _json_text(value)
            if isinstance(value, str) and not (text.isprintable() and _BARE.fullmatch(text)):
                # Quoted, JSON-escaped (ASCII only: controls, surrogates and bidi characters
                # become \uXXXX), so the value reads back exactly and stays on its line.
                text = json.dumps(text)
            parts.append(f"{key}={text.replace(_DEL, _DEL_ESCAPED)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "event": _message(record),
            "logger": record.name,
            **{key: _printable(value, key) for key, value in _fields(record).items()},
        }
        return json.dumps(body, default=str)


class _AsIs(logging.handlers.QueueHandler):
    """Hands the record itself to the writer thread, formatted there, not in the caller.

    The queue never leaves the process, so nothing needs pickling; QueueHandler's own
    ``prepare`` would format the line in the calling thread. A warning or an error wakes the
    writer at once (``urgent``) rather than waiting for the lines to gather: those are the
    lines that say why a process is about to be killed, and a SIGKILL loses what is queued.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord],
                 urgent: threading.Event) -> None:
        super().__init__(records)
        self.urgent = urgent

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        super().enqueue(record)
        if record.levelno >= logging.WARNING:
            self.urgent.set()


#: How long the writer lets lines gather once it has written all it had.
GATHER_S = 0.01


class _Gathering(logging.handlers.QueueListener):
    """A listener that, having emptied the queue, lets lines gather for ``GATHER_S``.

    Handing a record to a thread that waits on the queue wakes it: under threads x 64 that was
    a context switch for every line. Records queued while the writer sleeps wake nobody; they
    are written together, a few milliseconds later.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord],
                 handler: logging.Handler, urgent: threading.Event) -> None:
        super().__init__(records, handler, respect_handler_level=True)
        self.records = records
        self.urgent = urgent

    def dequeue(self, block: bool) -> logging.LogRecord:
        try:
            return self.records.get_nowait()
        except queue.Empty:
            # A wake-up left by a warning already written is dropped; one queued meanwhile
            # is found by the second look, its wake-up having been dropped with the other.
            self.urgent.clear()
            try:
                return self.records.get_nowait()
            except queue.Empty:
                self.urgent.wait(GATHER_S)
        return self.records.get(block)

    def enqueue_sentinel(self) -> None:
        # The stop's marker, then the wake-up: a writer gathering goes straight to it.
        super().enqueue_sentinel()
        self.urgent.set()


class _Writer:
    """The thread that formats and writes the lines the process's threads hand it."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.urgent = threading.Event()
        self.listener: logging.handlers.QueueListener | None = None
        self.active = False

    def start(self, handler: logging.Handler) -> logging.Handler:
        self.stop()
        self.listener = _Gathering(self.queue, handler, self.urgent)
        self.listener.start()
        return _AsIs(self.queue, self.urgent)

    def stop(self) -> None:
        """Write what is queued, then end the thread (at exit: no line is left behind)."""
        if self.listener is not None:
            self.listener.stop()
            self.listener = None


_writer = _Writer()


def write_from_one_thread() -> None:
    """From now on, this process's lines are formatted and written by one thread of its own.

    For the threads pool: with every thread writing to stderr itself, the handler's lock was
    held across the write and the formatting, and 64 threads queued on it for 13 ms an event
    on average (more than the two ledger commits together). Handing a record to a queue takes
    no lock that a write holds. The lines still go out in the order they were logged; those
    queued when the process ends are written at exit. Applies to ``configure_logging``'s
    handler, now and when it is configured again.
    """
    if not _writer.active:
        _writer.active = True
        atexit.register(_writer.stop)
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, _AsIs)]
    if handlers:
        root.handlers[:] = [_writer.start(handlers[0])]


def configure_logging(level: str = "INFO", fmt: Literal["kv", "json"] = "kv") -> None:
    """Route every logger (ours, Celery's, kombu's) through one structured handler."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    if _writer.active:
        handler = _writer.start(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO would drown the pipeline's own lines.
    for noisy in ("urllib3", "amqp", "kombu", "sqlalchemy.engine", "celery.bootsteps"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Celery's two lines per task ("received" in the main process, "succeeded" in the pool)
    # repeat what event.claimed (which names the task in `worker`) and the entity.* lines say,
    # and cost a formatted line per event in each of the two busiest processes: DEBUG shows
    # them. Celery's warnings and errors (a failed or rejected task) still show at any level.
    for per_task in PER_TASK_LOGGERS:
        logging.getLogger(per_task).setLevel(
            logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING)
