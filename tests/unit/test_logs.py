"""Structured logs: stable names, ids as fields, secrets redacted whatever the caller passed."""

from __future__ import annotations

import json
import logging

from worker.logs import JsonFormatter, KeyValueFormatter, redact, redact_text


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
