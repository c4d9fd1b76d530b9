"""Poison input never stops the fleet: a real worker records every bad message as a rejection
(raw bytes, precise reason), acknowledges it, and goes on issuing the valid events behind it;
support fixes one and resubmits it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu import Connection, Producer
from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    example_event,
    publish,
    publish_raw,
    story,
    wait_for_every_delivery,
    wait_for_state,
)
from tests.conftest import WorkerProcess, run_cli, wait_until
from worker.adapters.rabbitmq import topology
from worker.config import Settings

OVERSIZE_PAD = 70_000


def body(data: Any) -> bytes:
    return json.dumps(data).encode()  # ASCII: NULs and surrogates travel as \u escapes


def bus_poison(max_bytes: int) -> dict[bytes, str]:
    """Raw bus bodies and the reason each must be recorded with."""
    huge = body({**example_event("poison-huge"), "pad": "x" * OVERSIZE_PAD})
    return {
        b"[" * 5000: "JSON nested deeper than 32 levels",
        body(example_event("poison-\u0000-nul")):
            "eventId: contains a NUL character (U+0000), which cannot be stored",
        body(example_event("poison-nul-customer", customer="5668\u000081933")):
            "customer.id: contains a NUL character (U+0000), which cannot be stored",
        body(example_event("poison-series", series=(544770, 2**31))):
            "seriesIds: series id 2147483648 is above 2147483647, the largest series id the "
            "ledger stores",
        body(example_event("poison-\ud800")):
            "eventId: contains a lone surrogate (U+D800), which is not valid Unicode",
        body(example_event("poison-\x1b[31m\nforged line")):
            "eventId: eventId must be printable with no leading or trailing spaces",
        b"[]": "event must be a JSON object, got an array",
        b'"x"': "event must be a JSON object, got a string",
        b"42": "event must be a JSON object, got a number",
        b"null": "event must be a JSON object, got null",
        huge: f"body is {len(huge)} bytes, over the {max_bytes}-byte limit",
        b'{"eventId": "poison-\xff"}': "body is not UTF-8: invalid start byte at byte 20",
    }


TASK_POISON: list[tuple[dict[str, Any], str]] = [
    (example_event("poison-task-\u0000"), "eventId: contains a NUL character (U+0000)"),
    (example_event("poison-task-series", series=(2**31,)), "series id 2147483648 is above"),
    ({**example_event("poison-task-notes"), "metadata": {"notes": "gold \ud800"}},
     "metadata.notes: contains a lone surrogate (U+D800)"),
]
GOOD = [example_event("poison-good-1", customer="566881001"),
        example_event("poison-good-2", customer="566881002")]
GOOD_TASK = example_event("poison-good-task", customer="566881003")


# A coupons.issue task message whose event is nested past what Celery's decoder can read.
UNDECODABLE_TASK = b'[[], {"event": ' + b"[" * 5000 + b"]" * 5000 + b'}, {}]'


def publish_task_body(settings: Settings, raw: bytes, *, task: str | None = "coupons.issue",
                      ) -> None:
    """A Celery protocol 2 message made by hand, as a foreign producer could send it."""
    headers = {"id": str(uuid.uuid4()), "lang": "py", "argsrepr": "()", "kwargsrepr": "deep"}
    if task is not None:
        headers["task"] = task
    with Connection(settings.broker_url) as conn:
        queue = topology.tasks_queue(settings)
        Producer(conn.default_channel).publish(
            raw, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
            headers=headers)


def rejections(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT * FROM rejected_events ORDER BY id")).mappings()]


def test_poison_is_recorded_and_the_events_behind_it_are_issued(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    worker = start_worker(settings)
    poison = bus_poison(settings.max_event_bytes)
    # Given poison on both ways in, ahead of valid events
    publish_raw(settings, *poison)
    publish(settings, *(event for event, _reason in TASK_POISON), via="task")
    publish_task_body(settings, UNDECODABLE_TASK)
    publish(settings, *GOOD)
    publish(settings, GOOD_TASK, via="task")

    # Then the valid events behind the poison are issued, as the sandbox itself recorded them
    for event in [*GOOD, GOOD_TASK]:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    expected = len(poison) + len(TASK_POISON) + 1
    rows = wait_until(lambda: len(rejections(clean_ledger)) == expected
                      and rejections(clean_ledger), timeout_s=60,
                      message=f"{expected} rejections to be recorded")
    with clean_ledger.connect() as conn:
        ours = sorted(conn.execute(text("SELECT series_id, code FROM coupons")).all())
    theirs = sorted((c["seriesId"], c["code"]) for c in sandbox.ledger())
    assert [tuple(r) for r in ours] == theirs and len(theirs) == 6

    # And every bad bus message is a rejection holding its exact bytes and the precise reason
    by_raw = {bytes(r["raw"]): r for r in rows if r["source"] == "bus"}
    assert set(by_raw) == set(poison)
    for raw, reason in poison.items():
        assert by_raw[raw]["reason"] == reason or by_raw[raw]["reason"].startswith(reason), \
            (raw[:60], by_raw[raw]["reason"])
        assert by_raw[raw]["size_bytes"] == len(raw)
    assert by_raw[body(example_event("poison-\u0000-nul"))]["event_id"] == "poison-\\x00-nul"
    assert by_raw[body(example_event("poison-\ud800"))]["event_id"] == "poison-\\ud800"
    # (the oversize body was recorded by the bridge, never forwarded: the pool saw no task)
    assert by_raw[max(poison, key=len)]["event_id"] == "poison-huge"
    # And so is every bad task, its payload kept as JSON
    task_rows = [r for r in rows if r["source"] == "task"]
    undecodable, = (r for r in task_rows if bytes(r["raw"]) == UNDECODABLE_TASK)
    assert undecodable["reason"] == ("task message cannot be decoded: JSON nested deeper than "
                                     "32 levels")
    for event, reason in TASK_POISON:
        row = next(r for r in task_rows if bytes(r["raw"]) != UNDECODABLE_TASK
                   and json.loads(bytes(r["raw"])) == event)
        assert reason in row["reason"]

    # And the worker is alive and well: nothing escaped a handler, no line was forged
    assert worker.process.poll() is None
    log = worker.log()
    for trouble in ("RecursionError", "bridge.forward_error", "task.unexpected_error",
                    "Logging error", "\x1b[31m"):
        assert trouble not in log, trouble
    assert not any(line.startswith("forged line") for line in log.splitlines())
    publish(settings, example_event("poison-after", customer="566881004"))
    wait_for_state(clean_ledger, "poison-after", "completed")

    # When support fixes the event with the oversized series id and resubmits it
    series_row = by_raw[body(example_event("poison-series", series=(544770, 2**31)))]
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(example_event("poison-series", series=(544770, 553379))))
    shown = run_cli(settings, "rejected", "show", str(series_row["id"]))
    assert "series id 2147483648 is above" in shown.stdout
    done = run_cli(settings, "rejected", "resubmit", str(series_row["id"]), "--file", str(fixed),
                   "--reason", "series id typo fixed (SUP-4712)", "--operator", "ana")
    assert done.exit_code == 0, done.output
    # Then the worker issues it through the normal path, and the rejection links to it
    wait_for_state(clean_ledger, "poison-series", "completed")
    assert len(sandbox.ledger(customer="566881933")) == 2
    linked = next(r for r in rejections(clean_ledger) if r["id"] == series_row["id"])
    assert linked["resubmitted_event_id"] == "poison-series"
    assert bytes(linked["raw"]) == bytes(series_row["raw"])
    assert linked["reason"] == series_row["reason"]

    # And a poison message never reaches the terminal as an escape sequence
    escaped = by_raw[body(example_event("poison-\x1b[31m\nforged line"))]
    shown = run_cli(settings, "rejected", "show", str(escaped["id"]))
    assert "\x1b" not in shown.stdout and "forged line" in shown.stdout
    assert not any(line.startswith("forged line") for line in shown.stdout.splitlines())


def test_bad_input_through_both_ways_in_is_refused_and_the_events_behind_it_issued(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings)
    # Given an event already taken in
    original = example_event("reused-id", series=(544770,), customer="566882001")
    publish(settings, original)
    wait_for_state(clean_ledger, "reused-id", "completed")
    # When its id comes again with other content, both ways in, with other poison on both
    # ways (not UTF-8, a JSON array), and valid events behind all of it
    reused = {**original, "seriesIds": [553379]}
    publish(settings, reused, via="bus")
    publish(settings, reused, via="task")
    publish_raw(settings, b'{"eventId": "bad-\xff-bus"}', b"[]")
    publish_task_body(settings, b'[[], {"event": "bad-\xff-task"}, {}]')
    publish_task_body(settings, b'[[], {"event": []}, {}]')
    behind = [example_event(f"behind-{via}", customer=f"56688201{n}")
              for n, via in enumerate(("bus", "task"))]
    publish(settings, behind[0], via="bus")
    publish(settings, behind[1], via="task")
    # Then the valid events behind are issued and every bad message is a rejection
    for event in behind:
        wait_for_state(clean_ledger, event["eventId"], "completed")
    wait_for_every_delivery(settings)
    rows = rejections(clean_ledger)
    reasons = sorted((r["source"], r["reason"]) for r in rows)
    refused = "eventId 'reused-id' was already used for a different event"
    assert [s for s, r in reasons if r.startswith(refused)] == ["bus", "task"], reasons
    assert ("bus", "body is not UTF-8: invalid start byte at byte 17") in reasons
    assert ("bus", "event must be a JSON object, got an array") in reasons
    assert ("task", "event must be a JSON object, got an array") in reasons
    assert ("task", "task message cannot be decoded: 'utf-8' codec can't decode byte 0xff in "
            "position 20: invalid start byte") in reasons
    assert len(rows) == 6
    # And the reused id changed nothing: one coupon, of the original series
    assert [c["seriesId"] for c in sandbox.ledger(customer="566882001")] == [544770]
    assert story(clean_ledger, "reused-id")["entities"][0]["series_id"] == 544770  # type: ignore[index]
    assert worker.process.poll() is None


def test_a_task_sent_with_the_wrong_call_is_recorded_and_listed_as_a_dead_letter(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    from worker.adapters.rabbitmq.celery_config import producer_app

    worker = start_worker(settings)
    # Given coupons.issue sent by a Python producer with an argument the task does not take,
    # and with one positional argument too many, then a valid event behind them
    producer = producer_app(settings)
    extra_keyword = example_event("wrong-call-keyword", customer="566883001")
    extra_positional = example_event("wrong-call-positional", customer="566883002")
    try:
        producer.send_task("coupons.issue", kwargs={"event": extra_keyword, "priority": 7},
                           queue=settings.tasks_queue)
        producer.send_task("coupons.issue", args=[extra_positional, "task", "surplus"],
                           queue=settings.tasks_queue)
    finally:
        producer.close()
    # and a message naming a task this worker does not run, and one naming no task at all
    publish_task_body(settings, b'[[], {"event": {"eventId": "x"}}, {}]', task="coupons.nope")
    publish_task_body(settings, b'{"no": "task"}', task=None)
    behind = example_event("wrong-call-behind", customer="566883003")
    publish(settings, behind, via="task")

    # Then the event behind them is issued, and neither wrong call vanished: each is in
    # `dlq list` with its arguments as sent and a reason naming the mismatch
    wait_for_state(clean_ledger, "wrong-call-behind", "completed")
    rows = wait_until(lambda: len(rejections(clean_ledger)) == 4 and rejections(clean_ledger),
                      timeout_s=30, message="the four wrong messages to be recorded")
    listed = run_cli(settings, "dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    dead = {r["event_id"]: r for r in json.loads(listed.stdout)
            if r["kind"] == "rejected" and r["event_id"]}
    assert set(dead) == {"wrong-call-keyword", "wrong-call-positional"}
    reasons = sorted(r["reason"] for r in rows if not r["event_id"])
    assert reasons == ["no such task: 'coupons.nope' (this worker runs coupons.issue, "
                       "coupons.ingest and coupons.retry)",
                       "not a task message: no task name in its headers"]
    rows = [r for r in rows if r["event_id"]]
    assert "unexpected keyword argument 'priority'" in dead["wrong-call-keyword"]["message"]
    assert "too many positional arguments" in dead["wrong-call-positional"]["message"]
    kept = {json.loads(bytes(r["raw"]))["kwargs"].get("priority") for r in rows}
    assert kept == {7, None}
    # And nothing was issued for them, and the worker goes on
    assert sandbox.ledger(customer="566883001") == []
    assert sandbox.ledger(customer="566883002") == []
    assert worker.process.poll() is None
