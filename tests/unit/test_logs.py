"""Structured logs: stable names, ids as fields, secrets redacted whatever the caller passed."""

from __future__ import annotations

import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import wait_until
from worker import logs
from worker.logs import (
    PER_TASK_LOGGERS,
    REDACTED,
    JsonFormatter,
    KeyValueFormatter,
    configure_logging,
    redact,
    redact_text,
    write_from_one_thread,
)


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("worker.pipeline", logging.INFO, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_key_value_lines_carry_the_ids() -> None:
    line = KeyValueFormatter().format(
        record("entity.issued", event_id="e 1", series=544770, request_id="abc"))
    assert " INFO entity.issued " in line
    assert 'event_id="e 1"' in line and "series=544770" in line and "request_id=abc" in line


def test_json_lines_parse() -> None:
    body = json.loads(JsonFormatter().format(record("entity.dead", error_code="712")))
    assert body["event"] == "entity.dead" and body["error_code"] == "712"


def test_secrets_are_redacted_by_key_and_in_text() -> None:
    assert redact({"password": "x", "nested": {"oauth_secret": "y"}, "ok": 1}) == {
        "password": "***", "nested": {"oauth_secret": "***"}, "ok": 1}
    assert redact_text("amqp://guest:hunter2@mq:5672//") == "amqp://guest:***@mq:5672//"
    assert "hunter2" not in redact_text('{"secret": "hunter2"}')
    line = KeyValueFormatter().format(
        record("config", url="postgresql://app:hunter2@db/x", token="hunter2"))
    assert "hunter2" not in line


# -- values from the outside cannot forge lines or reach the terminal as escapes ------------

HOSTILE = "e1\nINFO entity.issued event_id=forged\r\x1b[31mred\x1b[0m\u0000\ud800\u202e"


def test_key_value_lines_cannot_be_forged_or_carry_escapes() -> None:
    values = {"event_id": HOSTILE, "reason": "a\rb", "plain": "x\x1bx", "tag": "\u009b31m",
              "bell": "\x07", "delete": "x\x7f", "quote": 'a"b=c', "ok": "tier-1"}
    line = KeyValueFormatter().format(record("event.rejected\nINFO forged\x1b[2J", **values))
    assert "\n" not in line and "\r" not in line
    assert not any(ch in line for ch in "\x1b\x00\x07\x7f\ud800\u202e\u009b")
    line.encode("utf-8")  # writable to any UTF-8 stream: no lone surrogates
    assert " INFO event.rejected\\nINFO forged\\x1b[2J " in line
    # Every value reads back exactly, under its own key and no other.
    pairs = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)', line)
    parsed = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}
    assert parsed == values


def test_json_lines_cannot_be_forged_and_fields_decode_to_printable_text() -> None:
    line = JsonFormatter().format(record("event.rejected\n\x1b[2J", event_id=HOSTILE))
    assert "\n" not in line and "\r" not in line
    line.encode("utf-8")
    body = json.loads(line)
    assert body["event"].isprintable() and body["event_id"].isprintable()
    assert body["event_id"].startswith("e1\\nINFO entity.issued")


def test_a_traceback_keeps_its_lines_in_json_but_not_escapes() -> None:
    try:
        raise ValueError("bad \x1b[31m input\nsecond line")
    except ValueError:
        import sys

        rec = record("task.unexpected_error")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    body = json.loads(line)
    assert "\n" in body["traceback"] and "\x1b" not in body["traceback"]
    assert "\x1b" not in body["error"] and "\n" not in body["error"]
    kv = KeyValueFormatter().format(rec)
    assert "\n" not in kv and "\x1b" not in kv


def test_key_value_lines_write_values_that_are_not_text_as_json() -> None:
    line = KeyValueFormatter().format(
        record("entity.retry", error_code=None, reconcile=True, attempt=2, series=[1, 2],
               entities={"dead": 1}))
    assert "error_code=null" in line and "reconcile=true" in line and "attempt=2" in line
    assert "series=[1, 2]" in line and 'entities={"dead": 1}' in line


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``configure_logging`` changes process-wide loggers: put them back afterwards."""
    root = logging.getLogger()
    names = ("urllib3", "amqp", "kombu", "sqlalchemy.engine", "celery.bootsteps",
             *PER_TASK_LOGGERS)
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names}
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(("level", "per_task_lines"), [("INFO", False), ("DEBUG", True)])
def test_celerys_per_task_lines_show_at_debug_only_and_its_errors_always(
        level: str, per_task_lines: bool, capsys: pytest.CaptureFixture[str],
        root_logging: None) -> None:
    configure_logging(level)
    for name in PER_TASK_LOGGERS:
        logging.getLogger(name).info("Task coupons.ingest[t-1] received")
        logging.getLogger(name).error("Task coupons.ingest[t-1] raised")
    logging.getLogger("worker.services").info("event.claimed")
    lines = capsys.readouterr().err.splitlines()
    assert sum("received" in line for line in lines) == (2 if per_task_lines else 0)
    assert sum("raised" in line for line in lines) == 2
    assert sum("event.claimed" in line for line in lines) == 1


class _SlowStream:
    """stderr piped to a collector that has fallen behind: every write takes a while."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.lines: list[str] = []
        self.writers: set[str] = set()

    def write(self, text: str) -> None:
        time.sleep(self.delay_s)
        self.writers.add(threading.current_thread().name)
        self.lines.extend(line for line in text.splitlines() if line)

    def flush(self) -> None:
        pass


@pytest.fixture
def one_writer(root_logging: None) -> Iterator[None]:
    """The writer thread is process-wide too: stopped and forgotten afterwards."""
    yield
    logs._writer.stop()
    logs._writer.active = False


def test_threads_hand_their_lines_to_one_writer_and_none_waits_for_a_slow_stream(
        monkeypatch: pytest.MonkeyPatch, one_writer: None) -> None:
    # Given stderr writes that take 20 ms each, and the threads pool's one writer
    stream = _SlowStream(0.02)
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO")
    write_from_one_thread()
    log = logging.getLogger("worker.pipeline")

    # When 8 threads log 5 lines each
    def work(n: int) -> None:
        for i in range(5):
            log.info("entity.issued", extra={"event_id": f"e-{n}-{i}", "token": "s3cr3t"})

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(n,), name=f"task-{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then none of them waited for the 40 writes (0.8 s, one after the other, written directly)
    assert time.monotonic() - started < 0.4
    # And at exit every line is written, formatted and redacted, by the writer thread alone
    logs._writer.stop()
    assert len(stream.lines) == 40
    assert all(line.split()[2] == "entity.issued" and "token=***" in line
               for line in stream.lines)
    assert {f"event_id=e-3-{i}" for i in range(5)} <= {
        part for line in stream.lines for part in line.split()}
    assert stream.writers and not stream.writers & {t.name for t in threads}


def test_logging_configured_again_keeps_the_one_writer(
        capsys: pytest.CaptureFixture[str], one_writer: None) -> None:
    # Given the one writer, when Celery's setup_logging configures logging again
    configure_logging("INFO")
    write_from_one_thread()
    configure_logging("WARNING")
    # Then the root logger still hands its records to the queue, at the new level
    root = logging.getLogger()
    assert [type(h).__name__ for h in root.handlers] == ["_AsIs"]
    logging.getLogger("worker.pipeline").warning("sweep.leases_expired", extra={"count": 2})
    logging.getLogger("worker.pipeline").info("event.claimed")
    logs._writer.stop()
    err = capsys.readouterr().err
    assert "sweep.leases_expired count=2" in err and "event.claimed" not in err


@pytest.mark.parametrize("text", [
    "Authorization: hunter2", "x:y PassWord=hunter2", "TOKEN: hunter2",
    "postgresql://app:hunter2@db/x", "id:1 https://u:hunter2@h/ secret=hunter2",
    # Not ASCII: the patterns' own case folding decides (a long s matches "s")
    "pa\u017f\u017fword=hunter2", "caf\u00e9 password=hunter2",
])
def test_secrets_in_text_with_a_colon_or_equals_are_redacted_whatever_the_case(
        text: str) -> None:
    assert "hunter2" not in redact_text(text)


def test_values_with_a_colon_and_no_secret_are_kept_as_they_are() -> None:
    for text in ("id:566881933", "bench0@vm:ForkPoolWorker-1", "a=b", "caf\u00e9:1"):
        assert redact_text(text) == text


def test_line_times_are_utc_to_the_millisecond_cut_as_datetime_rounds_them() -> None:
    from datetime import UTC, datetime
    for created in (0.0, 1_764_064_800.0, 1_881_469_044.498, 667_674_380.0039997,
                    1_764_064_800.9999996, time.time()):
        rec = record("x")
        rec.created = created
        expected = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        assert KeyValueFormatter().format(rec).startswith(expected + "Z INFO x")


@pytest.mark.parametrize("header", ["Authorization: Bearer hunter2", "authorization=Basic hunter2",
                                    '"Authorization": "Token hunter2"'])
def test_an_authorization_headers_credential_is_hidden_not_its_scheme(header: str) -> None:
    hidden = redact_text(f"request failed; {header} sent")
    assert "hunter2" not in hidden and REDACTED in hidden
    scheme = header.split()[-2].strip('"').split("=")[-1]
    assert f"{scheme} {REDACTED}" in hidden


class _CountingQueue(queue.SimpleQueue[logging.LogRecord]):
    """The writer's queue, counting the times the writer waited on it for a line."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def get(self, block: bool = True, timeout: float | None = None) -> logging.LogRecord:
        if block and self.empty():
            self.waits += 1
        return super().get(block, timeout)


def test_the_writer_lets_lines_gather_rather_than_wake_for_each(
        monkeypatch: pytest.MonkeyPatch, one_writer: None) -> None:
    # Given the one writer, on a queue that counts how often the writer waited for a line
    stream = _SlowStream(0.0)
    monkeypatch.setattr(sys, "stderr", stream)
    records = _CountingQueue()
    monkeypatch.setattr(logs._writer, "queue", records)
    configure_logging("INFO")
    write_from_one_thread()
    log = logging.getLogger("worker.pipeline")

    # When 4 threads log 50 lines each, a line every millisecond
    def work(n: int) -> None:
        for i in range(50):
            log.info("entity.issued", extra={"event_id": f"e-{n}-{i}"})
            time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logs._writer.stop()
    # Then all 200 lines are written, the writer having been woken for a few of them only
    assert len(stream.lines) == 200
    assert records.waits < 40


def test_a_warning_is_written_at_once_not_after_the_lines_gather(
        monkeypatch: pytest.MonkeyPatch, one_writer: None) -> None:
    # Given the one writer, letting lines gather for 30 s once it has written all it had
    monkeypatch.setattr(logs, "GATHER_S", 30.0)
    stream = _SlowStream(0.0)
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO")
    write_from_one_thread()
    log = logging.getLogger("worker.pipeline")
    log.warning("first")
    wait_until(lambda: stream.lines, timeout_s=10, message="the first line written")
    time.sleep(0.1)  # the writer back at its gathering
    # When an info line is logged while it gathers, it waits there
    log.info("event.claimed")
    time.sleep(0.3)
    assert len(stream.lines) == 1
    # And a warning logged after it wakes the writer: both are written, in their order, well
    # before the gathering's 30 s (a SIGKILL then loses neither)
    log.warning("task.time_limit")
    wait_until(lambda: len(stream.lines) == 3, timeout_s=10, message="the warning written")
    assert [line.split()[2] for line in stream.lines] == ["first", "event.claimed",
                                                          "task.time_limit"]
