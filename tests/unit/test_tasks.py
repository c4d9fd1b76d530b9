"""The thin task layer maps outcomes to the broker: record bad input, requeue on outages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.exceptions import Reject, SoftTimeLimitExceeded

from tests.unit.conftest import World
from worker.domain import runtime_policy
from worker.domain.errors import LedgerError, LedgerUnavailable
from worker.entrypoints.celery import tasks
from worker.usecases.deps import Deps
from worker.usecases.rejection import record_rejection


def test_bad_input_becomes_a_recorded_rejection(world: World) -> None:
    report = tasks.handle_raw(b'{"eventId": "x", "seriesIds": []}', content_type=None,
                              source="bus", deps=world.deps, max_bytes=65536)
    assert report.rejected_id == 1
    assert "customer: Field required" in world.state.rejections[0]["reason"]
    assert world.state.rejections[0]["raw"] == b'{"eventId": "x", "seriesIds": []}'


@pytest.fixture
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_policy, "LEDGER_DOWN_PAUSE_S", 0)
    monkeypatch.setattr(runtime_policy, "FAILED_DELIVERY_PAUSE_BASE_S", 0)


@pytest.mark.usefixtures("no_pause")
def test_an_unexpected_error_goes_back_then_is_kept_as_a_dead_letter(world: World) -> None:
    # Given a bug that fails every delivery of a valid event (before it claims anything: a
    # redelivery after a claim is a no-op until the claim's lease runs out)
    data = {"eventId": "e-9", "customer": {"id": "1"}, "seriesIds": [1]}
    raw = json.dumps(data).encode()

    def deliver() -> dict[str, object]:
        return tasks._run(lambda: world.deps, _explode(RuntimeError("bug in a new code path")),
                          raw=raw, source="task", event_id="e-9", failure_limit=3)

    # When it is delivered up to the limit, then it goes back each time but the last
    for _ in range(2):
        with pytest.raises(Reject) as info:
            deliver()
        assert info.value.requeue
        assert world.state.rejections == []
    assert world.state.failures["event:e-9"]["failures"] == 2
    result = deliver()
    # and the last keeps it, as received, as a dead letter of our making: not a rejection
    assert result["dead_letter_id"] == 1
    kept = world.state.rejections[0]
    assert kept["kind"] == "internal_error"
    assert kept["reason"].startswith("internal error: failed 3 deliveries, the last with "
                                     "RuntimeError: bug in a new code path")
    assert kept["raw"] == raw
    assert world.state.failures == {}


@pytest.mark.usefixtures("no_pause")
def test_a_database_refusal_is_an_infrastructure_dead_letter_never_a_rejection(
        world: World) -> None:
    # A statement the database refuses for reasons of its own (a pooler that lost a prepared
    # statement, say) is no outage, but says nothing about the event either.
    refusal = LedgerError('database error: prepared statement "_pg3_0" does not exist')
    for _ in range(2):
        with pytest.raises(Reject):
            tasks._run(lambda: world.deps, _explode(refusal), raw=b'{"eventId": "e-2"}',
                       source="bus", event_id="e-2", failure_limit=3)
    result = tasks._run(lambda: world.deps, _explode(refusal), raw=b'{"eventId": "e-2"}',
                        source="bus", event_id="e-2", failure_limit=3)
    assert world.state.rejections[0]["kind"] == "infrastructure"
    assert world.state.rejections[0]["reason"].startswith("infrastructure: failed 3 deliveries")
    assert result["dead_letter_id"] == 1


@pytest.mark.usefixtures("no_pause")
def test_failures_without_an_event_id_are_counted_by_their_bytes(world: World) -> None:
    for raw in (b"one", b"two", b"one"):
        with pytest.raises(Reject):
            tasks._run(lambda: world.deps, _explode(RuntimeError("bug")), raw=raw,
                       source="bus", event_id=None, failure_limit=3)
    assert sorted(r["failures"] for r in world.state.failures.values()) == [1, 2]


def test_a_database_outage_puts_the_message_back(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_policy, "LEDGER_DOWN_PAUSE_S", 0)

    def down(_deps: Any) -> Any:
        raise LedgerUnavailable("database unavailable: connection refused")

    with pytest.raises(Reject) as info:
        tasks._run(lambda: world.deps, down, raw=b"{}", source="bus", event_id=None)
    assert info.value.requeue


def _explode(exc: Exception) -> Any:
    def work(_deps: Deps) -> Any:
        raise exc

    return work


@pytest.mark.usefixtures("no_pause")
def test_a_failure_a_day_after_the_last_counts_afresh(world: World) -> None:
    # Given a message whose delivery failed once, then went through
    raw = json.dumps({"eventId": "e-7", "customer": {"id": "1"}, "seriesIds": [1]}).encode()

    def deliver() -> dict[str, object]:
        return tasks._run(lambda: world.deps, _explode(RuntimeError("bug")), raw=raw,
                          source="task", event_id="e-7", failure_limit=2)

    with pytest.raises(Reject):
        deliver()
    # When it fails again more than a day later (a replay of the same event id)
    world.clock.advance(runtime_policy.FAILURE_COUNT_FORGOTTEN_AFTER_S + 60)
    # Then it goes back as a first failure would, instead of reaching the limit of two
    with pytest.raises(Reject) as info:
        deliver()
    assert info.value.requeue
    assert world.state.failures["event:e-7"]["failures"] == 1
    assert world.state.rejections == []


@pytest.mark.usefixtures("no_pause")
def test_an_error_that_cannot_be_recorded_puts_the_message_back(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The dead letter's own write fails with something other than an outage (here the ledger
    # refusing the statement): the message is the only copy left, so it must go back.
    def refuse(*_: Any, **__: Any) -> Any:
        raise LedgerError("database error: value too long")

    monkeypatch.setattr(tasks.delivery, "record_rejection", refuse)
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
    from worker.entrypoints.celery.app import TASK_INGEST, TASK_ISSUE, TASK_RETRY, app

    for name in (TASK_ISSUE, TASK_INGEST, TASK_RETRY):
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        # Celery then rejects the message with requeue=True instead of acknowledging it.
        assert task.acks_on_timeout is False, name
    assert app.conf.task_acks_on_failure_or_timeout is False


# -- poison input: recorded, never an error that loses the message --------------------------

GOOD = {"eventId": "e-1", "customer": {"id": "1"}, "seriesIds": [544770]}
POISON_BODIES = {
    b"[" * 5000: "JSON nested deeper than 32 levels",
    json.dumps({**GOOD, "eventId": "a\u0000b"}).encode(): "eventId: contains a NUL character",
    json.dumps({**GOOD, "customer": {"id": "1\u00002"}}).encode():
        "customer.id: contains a NUL character",
    json.dumps({**GOOD, "seriesIds": [2**31]}).encode(): "series id 2147483648 is above",
    json.dumps({**GOOD, "eventId": "a\ud800"}).encode(): "eventId: contains a lone surrogate",
    b"null": "event must be a JSON object, got null",
    b'{"eventId": "\xff"}': "body is not UTF-8",
}


@pytest.mark.parametrize("body", list(POISON_BODIES), ids=list(POISON_BODIES.values()))
def test_poison_bodies_are_recorded_with_their_raw_bytes(world: World, body: bytes) -> None:
    report = tasks.handle_raw(body, content_type="application/json", source="bus",
                              deps=world.deps, max_bytes=65536)
    assert report.rejected_id == 1
    rejection = world.state.rejections[0]
    assert rejection["raw"] == body
    assert POISON_BODIES[body] in rejection["reason"]
    assert world.api.bulk_calls == [] and world.state.events == {}


def test_a_rejection_whose_event_id_has_a_nul_is_still_recorded(world: World) -> None:
    rejected_id = record_rejection(
        b"{}", "reason with a NUL \x00 and \ud800", source="bus", deps=world.deps,
        event_id="a\x00b\ud800", content_type="application/json\x00")
    rejection = world.state.rejections[rejected_id - 1]
    assert rejection["event_id"] == "a\\x00b\\ud800"
    assert rejection["reason"] == "reason with a NUL \\x00 and \\ud800"
    assert rejection["content_type"] == "application/json\\x00"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({**GOOD, "eventId": "a\u0000b"}, "eventId: contains a NUL character"),
        ({**GOOD, "seriesIds": [2**31]}, "series id 2147483648 is above"),
        ({**GOOD, "metadata": {"notes": "\ud800"}}, "metadata.notes: contains a lone surrogate"),
        ([], "event must be a JSON object, got an array"),
        ("x", "event must be a JSON object, got a string"),
        (None, "event must be a JSON object, got null"),
    ],
)
def test_the_issue_task_path_records_poison_events(world: World, data: object,
                                                   reason: str) -> None:
    report = tasks.handle_event(data, source="task", deps=world.deps)
    assert report.rejected_id == 1
    assert reason in world.state.rejections[0]["reason"]
    assert json.loads(world.state.rejections[0]["raw"]) == data
    assert world.api.bulk_calls == []


def test_the_issue_task_keeps_a_payload_too_deep_to_serialise(world: World) -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    data = {**GOOD, "extra": deep}
    report = tasks.handle_event(data, source="task", deps=world.deps)
    assert report.rejected_id == 1
    assert world.state.rejections[0]["reason"] == "JSON nested deeper than 32 levels"
    assert world.state.rejections[0]["raw"].startswith(b"<")


@pytest.mark.parametrize(
    ("body", "encoding", "raw"),
    [
        ("eyJ4IjogMX0=", "base64", b'{"x": 1}'),
        ("not base64!", "base64", b"not base64!"),
        ('{"eventId": "\ud800"}', "utf-8", b'{"eventId": "\xed\xa0\x80"}'),
    ],
)
def test_a_forwarded_body_always_decodes_to_bytes(body: str, encoding: str, raw: bytes) -> None:
    assert tasks.decode_body(body, encoding) == raw


def test_a_row_the_ledger_still_refuses_is_stored_with_what_cannot_be_refused(
        world: World) -> None:
    # A fake of our own seam: this ledger refuses any rejection that carries an event id.
    from coupon_devtools.fakes.ledger import FakeUnitOfWork, InMemoryLedger
    from worker.domain.errors import LedgerError

    class Picky(InMemoryLedger):
        def record_rejection(self, **kwargs: Any) -> int:
            if kwargs["event_id"] is not None:
                raise LedgerError("database error: value too long for type")
            return super().record_rejection(**kwargs)

    def picky_uow() -> FakeUnitOfWork:
        uow = FakeUnitOfWork(world.state)
        uow.ledger = Picky(world.state)
        return uow

    world.deps.uow = picky_uow
    rejected_id = record_rejection(b"\x00raw", "bad \ud800", source="bus",
                                            deps=world.deps, event_id="e-1",
                                            content_type="application/json")
    row = world.state.rejections[rejected_id - 1]
    assert row["raw"] == b"\x00raw" and row["event_id"] is None
    assert row["reason"].startswith("bad \\ud800 (stored without its event id")
    assert row["reason"].isascii()


def test_a_tasks_result_reads_as_the_outcome_in_one_line() -> None:
    assert tasks.summary({"event_id": "e-1", "new_event": True, "claimed": 1, "issued": 1}) \
        == "event_id=e-1 new_event=True claimed=1 issued=1"
    assert tasks.summary({}) == ""
