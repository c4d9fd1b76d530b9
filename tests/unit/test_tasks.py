"""The thin task layer maps outcomes to the broker: record bad input, requeue on outages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.exceptions import Reject, SoftTimeLimitExceeded

from tests.unit.conftest import World
from worker import tasks
from worker.errors import LedgerError, LedgerUnavailable
from worker.services import Deps


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


@pytest.fixture
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "LEDGER_DOWN_PAUSE_S", 0)


def _explode(exc: Exception) -> Any:
    def work(_deps: Deps) -> Any:
        raise exc

    return work


@pytest.mark.usefixtures("no_pause")
def test_an_error_that_cannot_be_recorded_puts_the_message_back(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The rejection's own write fails with something other than an outage (here the ledger
    # refusing the statement): the message is the only copy left, so it must go back.
    def refuse(*_: Any, **__: Any) -> Any:
        raise LedgerError("database error: value too long")

    monkeypatch.setattr(tasks.services, "record_rejection", refuse)
    with pytest.raises(Reject) as info:
        tasks._run(lambda: world.deps, _explode(RuntimeError("bug")), raw=b"{}",
                   source="bus", event_id="e-1")
    assert info.value.requeue
    assert world.state.rejections == []


@pytest.mark.usefixtures("no_pause")
def test_running_out_of_time_puts_the_message_back(world: World) -> None:
    with pytest.raises(Reject) as info:
        tasks._run(lambda: world.deps, _explode(SoftTimeLimitExceeded()), raw=b"{}",
                   source="bus", event_id="e-1")
    assert info.value.requeue
    assert world.state.rejections == [], "not a rejection: the outcome is merely unknown"


@pytest.mark.usefixtures("no_pause")
def test_dependencies_that_cannot_be_built_put_the_message_back(world: World) -> None:
    def no_deps() -> Deps:
        raise LedgerUnavailable("database unavailable: connection refused")

    with pytest.raises(Reject) as info:
        tasks._run(no_deps, _explode(AssertionError("not reached")), raw=b"{}",
                   source="bus", event_id="e-1")
    assert info.value.requeue


def test_a_task_past_its_hard_time_limit_is_not_acknowledged() -> None:
    from worker.celery_app import TASK_INGEST, TASK_ISSUE, TASK_RETRY, app

    for name in (TASK_ISSUE, TASK_INGEST, TASK_RETRY):
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        # Celery then rejects the message with requeue=True instead of acknowledging it.
        assert task.acks_on_timeout is False, name
    assert app.conf.task_acks_on_failure_or_timeout is False
