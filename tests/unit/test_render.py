"""What the command line shows cannot carry rich markup, emoji codes or escape sequences."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from worker.entrypoints.cli.render import (
    render_actions,
    render_dead_letters,
    render_entity,
    render_event,
    render_rejected,
)
from worker.usecases.support import ActionResult

EVIL = "ev[bold red]il[/] :thumbs_up: \x1b[2J\x1b]8;;http://x\x07link\r\nforged\u202e\ud800"
SHOWN = "ev[bold red]il[/] :thumbs_up: \\x1b[2J\\x1b]8;;http://x\\x07link\\r\\nforged\\u202e\\ud800"


def rendered(draw: Any, *args: Any, **kwargs: Any) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=1000, force_terminal=True, color_system="standard")
    draw(console, *args, **kwargs)
    return buffer.getvalue()


def assert_safe(out: str) -> None:
    # Our own styling is the only escape sequence, and it is never a screen/title/link command
    # or a cursor move; nothing forged a line; every value is shown literally.
    for sequence in ("\x1b[2J", "\x1b]", "\x07", "\r", "\u202e", "\ud800", "👍"):
        assert sequence not in out
    assert SHOWN in out
    assert not any(line.startswith("forged") for line in out.splitlines())


def entity(**overrides: Any) -> dict[str, Any]:
    return {"id": 1, "event_id": EVIL, "customer_key": EVIL, "series_id": 544770,
            "state": "dead", "attempts": 1, "last_error_code": EVIL, "needs_reconcile": True,
            "last_error_message": EVIL, "last_request_id": EVIL, "next_attempt_at": None,
            "dead_reason": EVIL, "dead_at": "2026-11-25T10:00:00+00:00",
            "history": [{"at": "2026-11-25T10:00:00+00:00", "kind": "dead", "state": "dead",
                         "attempt": 1, "error_code": EVIL, "message": EVIL, "request_id": EVIL,
                         "worker": EVIL}],
            "calls": [{"started_at": "2026-11-25T10:00:00+00:00", "operation": "bulk_issue",
                       "http_status": 201, "latency_ms": 4.0, "outcome": EVIL,
                       "error_code": EVIL, "request_id": EVIL}],
            "coupon": {"code": EVIL, "valid_till_date_time": EVIL, "valid_till": None,
                       "recorded_via": EVIL, "series_id": 544770, "discount_type": EVIL,
                       "discount_value": "100", "issued_at": "2026-11-25T10:00:00+00:00"},
            "operator_actions": [{"at": "2026-11-25T10:00:00+00:00", "action": "replay",
                                  "operator": EVIL, "reason": EVIL, "outcome": EVIL}],
            **overrides}


def test_events_show_renders_outside_values_as_plain_text() -> None:
    one = entity()
    story = {"event_id": EVIL, "state": EVIL, "customer_key": EVIL, "source": EVIL,
             "received_at": "2026-11-25T10:00:00+00:00", "entities": [one],
             "coupons": [one["coupon"]], "resubmitted_from": [3],
             "rejections": [{"id": 1, "received_at": "x", "source": EVIL, "reason": EVIL}]}
    out = rendered(render_event, story)
    assert_safe(out)
    assert "resubmitted from rejected #3" in out


def test_dlq_views_render_outside_values_as_plain_text() -> None:
    assert_safe(rendered(render_entity, entity()))
    assert_safe(rendered(render_dead_letters, [
        {"kind": "entity", "id": 1, "event_id": EVIL, "customer": EVIL, "series_id": 1,
         "error_code": EVIL, "attempts": 1, "dead_at": None, "reason": EVIL}]))
    assert_safe(rendered(render_actions, [ActionResult(1, EVIL, EVIL, 1, EVIL, EVIL)],
                         dry_run=False))


def test_a_rejected_payload_is_shown_escaped_and_indented() -> None:
    story = {"id": 7, "source": "bus", "received_at": "2026-11-25T10:00:00+00:00",
             "size_bytes": 3, "content_type": EVIL, "event_id": EVIL, "reason": EVIL,
             "resubmitted_at": None, "resubmitted_event_id": None,
             "raw": EVIL.encode("utf-8", "surrogatepass") + b"\n\xff",
             "operator_actions": [{"at": "x", "action": "rejected_resubmit", "operator": EVIL,
                                   "os_user": EVIL, "reason": EVIL, "outcome": EVIL}]}
    out = rendered(render_rejected, story)
    assert_safe(out)
    assert "\n  \\xff" in out


def test_error_messages_quote_values_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.entrypoints.cli.output import fail

    buffer = io.StringIO()
    monkeypatch.setattr("worker.entrypoints.cli.output.err_console",
                        Console(file=buffer, force_terminal=True, width=1000))
    with pytest.raises(SystemExit):
        fail(f"no event in the ledger: {EVIL}")
    assert_safe(buffer.getvalue())
