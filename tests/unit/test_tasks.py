"""The thin task layer maps outcomes to the broker: record bad input, requeue on outages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.exceptions import Reject

from tests.unit.conftest import World
from worker import tasks
from worker.errors import LedgerUnavailable


def test_bad_input_becomes_a_recorded_rejection(world: World) -> None:
    report = tasks.handle_raw(b'{"eventId": "x", "seriesIds": []}', content_type=None,
                              source="bus", deps=world.deps, max_bytes=65536)
    assert report.rejected_id == 1
    assert "customer: Field required" in world.state.rejections[0]["reason"]
    assert world.state.rejections[0]["raw"] == b'{"eventId": "x", "seriesIds": []}'


def test_an_unexpected_error_keeps_the_payload(world: World) -> None:
    def explode(*_: Any) -> Any:
        raise RuntimeError("bug in a new code path")

    world.api.bulk_issue = explode  # type: ignore[method-assign]
    data = {"eventId": "e-9", "customer": {"id": "1"}, "seriesIds": [1]}
    raw = json.dumps(data).encode()
    result = tasks._run(lambda: world.deps,
                        lambda d: tasks.handle_event(data, source="task", deps=d),
                        raw=raw, source="task", event_id="e-9")
    assert result["rejected_id"] == 1
    assert world.state.rejections[0]["reason"].startswith("internal error: RuntimeError")
    assert world.state.rejections[0]["raw"] == raw


def test_a_database_outage_puts_the_message_back(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "LEDGER_DOWN_PAUSE_S", 0)

    def down(_deps: Any) -> Any:
        raise LedgerUnavailable("database unavailable: connection refused")

    with pytest.raises(Reject) as info:
        tasks._run(lambda: world.deps, down, raw=b"{}", source="bus", event_id=None)
    assert info.value.requeue
