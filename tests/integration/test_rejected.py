"""Rejected messages on the real ledger: the rejection path takes any poison, a fixed event is
resubmitted once (linked, audited), and the ``rejected`` commands show it all safely."""

from __future__ import annotations

import base64
import getpass
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import Unlimited
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.adapters.rabbitmq import topology
from worker.config import Settings
from worker.domain.errors import BrokerUnavailable, NotFound
from worker.domain.events import LoyaltyEvent, parse_event_data
from worker.domain.model import DeadMessageKind
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.entrypoints.celery import tasks
from worker.metrics import Metrics
from worker.usecases.deps import Deps
from worker.usecases.rejection import record_rejection
from worker.usecases.support import SupportDeps, resubmit_rejected

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
MAX = 65_536
FIXED = {"eventId": "tier-upgrade-566881933-2026-11-25", "customer": {"id": "566881933"},
         "seriesIds": [544770, 553379]}


def pipeline_deps(engine: Engine) -> Deps:
    uow = sql_unit_of_work_factory(engine)
    return Deps(
        uow=uow, api=FakeCapillary(), publisher=FakePublisher(), limiter=Unlimited(),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: NOW, probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test", clock=lambda: NOW)


def support_deps(engine: Engine) -> tuple[SupportDeps, FakePublisher]:
    publisher = FakePublisher()
    return SupportDeps(uow=sql_unit_of_work_factory(engine), publisher=publisher,
                       clock=lambda: NOW, sleep=lambda _s: None), publisher


def rows(engine: Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql)).mappings()]


def reject(engine: Engine, raw: bytes) -> int:
    report = tasks.handle_raw(raw, content_type="application/json", source="bus",
                              deps=pipeline_deps(engine), max_bytes=MAX)
    assert report.rejected_id is not None
    return report.rejected_id


# -- the rejection path ---------------------------------------------------------------------


def test_the_rejection_path_stores_what_postgresql_would_refuse(clean_ledger: Engine) -> None:
    raw = b"\x00\xff" + b"[" * 5000
    rejected_id = record_rejection(
        raw, "reason \x00 with \ud800 and \x1b[31m", source="bus\x00",
        deps=pipeline_deps(clean_ledger), event_id="e\x00\ud800",
        content_type="application/json\x00")
    row, = rows(clean_ledger, f"SELECT * FROM rejected_events WHERE id = {rejected_id}")
    assert bytes(row["raw"]) == raw and row["size_bytes"] == len(raw)
    assert row["reason"] == "reason \\x00 with \\ud800 and \\x1b[31m"
    assert row["event_id"] == "e\\x00\\ud800"
    assert row["content_type"] == "application/json\\x00"
    assert row["source"] == "bus\\x00"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({**FIXED, "customer": {"id": "5668\u000081933"}}, "customer.id: contains a NUL"),
        ({**FIXED, "metadata": {"notes": "gold\u0000"}}, "metadata.notes: contains a NUL"),
        ({**FIXED, "eventId": "e-\u0000"}, "eventId: contains a NUL"),
        ({**FIXED, "seriesIds": [2**31]}, "series id 2147483648 is above 2147483647"),
        ({**FIXED, "eventId": "e-\ud800"}, "eventId: contains a lone surrogate"),
        ({**FIXED, "customer": {"id": "\udc80"}}, "customer.id: contains a lone surrogate"),
    ],
)
def test_poison_that_passed_validation_before_is_now_a_rejection(
        clean_ledger: Engine, data: dict[str, Any], reason: str) -> None:
    raw = json.dumps(data).encode()
    rejected_id = reject(clean_ledger, raw)
    row, = rows(clean_ledger, f"SELECT * FROM rejected_events WHERE id = {rejected_id}")
    assert reason in row["reason"] and bytes(row["raw"]) == raw
    assert rows(clean_ledger, "SELECT * FROM events") == []


# -- resubmitting ---------------------------------------------------------------------------


def test_a_fixed_event_is_resubmitted_once_linked_and_audited(clean_ledger: Engine) -> None:
    original = json.dumps({**FIXED, "seriesIds": [544770, 2**31]}).encode()
    rejected_id = reject(clean_ledger, original)
    before, = rows(clean_ledger, "SELECT * FROM rejected_events")
    support, publisher = support_deps(clean_ledger)

    result = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="typo (SUP-1)",
                               operator="ana", os_user="ana.local", deps=support,
                               submitter=publisher, max_bytes=MAX)

    assert result.accepted and result.outcome == f"resubmitted as event {FIXED['eventId']}"
    assert publisher.events == [(parse_event_data(FIXED).to_message(), "resubmit")]
    after, = rows(clean_ledger, "SELECT * FROM rejected_events")
    assert after["resubmitted_event_id"] == FIXED["eventId"] and after["resubmitted_at"] == NOW
    assert {k: v for k, v in after.items() if not k.startswith("resubmitted")} == \
        {k: v for k, v in before.items() if not k.startswith("resubmitted")}
    audit, = rows(clean_ledger, "SELECT * FROM operator_actions")
    assert (audit["action"], audit["operator"], audit["reason"], audit["event_id"]) == (
        "rejected_resubmit", "ana", "typo (SUP-1)", FIXED["eventId"])
    assert audit["details"]["os_user"] == "ana.local"
    assert audit["details"]["rejected_id"] == rejected_id
    assert audit["details"]["payload"] == parse_event_data(FIXED).to_message()
    assert "series id 2147483648" in audit["details"]["original_reason"]

    # A second resubmission of the same rejection is refused, and audited as such
    again = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="again",
                              operator="bob", deps=support, submitter=publisher,
                              max_bytes=MAX)
    assert not again.accepted and again.outcome.startswith("refused: already resubmitted as "
                                                           f"event {FIXED['eventId']}")
    assert len(publisher.events) == 1
    assert [r["outcome"] for r in rows(clean_ledger, "SELECT outcome FROM operator_actions "
                                                     "ORDER BY id")] == [
        result.outcome, again.outcome]


def test_a_fix_goes_through_the_same_validation(clean_ledger: Engine) -> None:
    rejected_id = reject(clean_ledger, b"[" * 5000)
    support, publisher = support_deps(clean_ledger)
    still_bad = json.dumps({**FIXED, "customer": {"id": "1\u00002"}}).encode()
    result = resubmit_rejected(rejected_id, still_bad, reason="fix", operator="ana",
                               deps=support, submitter=publisher, max_bytes=MAX)
    assert not result.accepted
    assert result.outcome == ("refused: the fixed payload is not a valid event: customer.id: "
                              "contains a NUL character (U+0000), which cannot be stored")
    assert publisher.events == []
    row, = rows(clean_ledger, "SELECT * FROM rejected_events")
    assert row["resubmitted_at"] is None
    audit, = rows(clean_ledger, "SELECT * FROM operator_actions")
    assert audit["outcome"] == result.outcome and audit["details"]["payload"] is None


def test_a_dry_run_changes_nothing(clean_ledger: Engine) -> None:
    rejected_id = reject(clean_ledger, b"null")
    support, publisher = support_deps(clean_ledger)
    result = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                               operator="ana", deps=support, submitter=publisher,
                               max_bytes=MAX, dry_run=True)
    assert result.accepted and result.outcome.startswith("would be resubmitted as event")
    assert publisher.events == []
    assert rows(clean_ledger, "SELECT * FROM operator_actions") == []
    assert rows(clean_ledger, "SELECT resubmitted_at FROM rejected_events") == [
        {"resubmitted_at": None}]


def ingest(engine: Engine, event: LoyaltyEvent) -> None:
    with sql_unit_of_work_factory(engine)() as uow:
        uow.ledger.ingest(event, source="bus", now=NOW)
        uow.commit()


def test_an_event_id_already_in_the_ledger_is_linked_or_refused(clean_ledger: Engine) -> None:
    ingest(clean_ledger, parse_event_data(FIXED))
    support, publisher = support_deps(clean_ledger)
    first, second = reject(clean_ledger, b"1"), reject(clean_ledger, b"2")
    other = json.dumps({**FIXED, "seriesIds": [1]}).encode()
    refused = resubmit_rejected(first, other, reason="fix", operator="ana", deps=support,
                                submitter=publisher, max_bytes=MAX)
    assert not refused.accepted and "already in the ledger for a different event" in \
        refused.outcome
    linked = resubmit_rejected(second, json.dumps(FIXED).encode(), reason="fix",
                               operator="ana", deps=support, submitter=publisher,
                               max_bytes=MAX)
    assert linked.accepted and linked.outcome.startswith("linked: event tier-upgrade")
    assert publisher.events == [], "the ledger already has it: nothing sent"
    assert [r["resubmitted_event_id"] for r in rows(
        clean_ledger, "SELECT resubmitted_event_id FROM rejected_events ORDER BY id")] == [
        None, FIXED["eventId"]]


def test_a_broker_refusal_leaves_it_to_run_again_and_says_so_in_the_audit(
        clean_ledger: Engine) -> None:
    rejected_id = reject(clean_ledger, b"[]")
    support, _ = support_deps(clean_ledger)

    class DownBroker(FakePublisher):
        def submit_event(self, event: LoyaltyEvent, *, source: str) -> None:
            raise BrokerUnavailable("broker unavailable: connection refused")

    with pytest.raises(BrokerUnavailable, match="run the resubmission again to send it"):
        resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                          operator="ana", deps=support, submitter=DownBroker(), max_bytes=MAX)
    # The resubmission was recorded before the publish, and its failure after it
    outcomes = [r["outcome"] for r in rows(
        clean_ledger, "SELECT outcome FROM operator_actions ORDER BY id")]
    assert outcomes[0].startswith("resubmitted as event") and outcomes[1].startswith("not sent")
    # And running it again with resend sends it: the event is not in the ledger yet
    publisher = FakePublisher()
    plain = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                              operator="ana", deps=support, submitter=publisher,
                              max_bytes=MAX)
    assert not plain.accepted and "send it again with resend" in plain.outcome
    again = resubmit_rejected(rejected_id, json.dumps(FIXED).encode(), reason="fix",
                              operator="ana", deps=support, submitter=publisher,
                              max_bytes=MAX, resend=True)
    assert again.accepted and again.outcome.startswith("sent again as event")
    assert len(publisher.events) == 1


def test_an_unknown_rejection_is_not_found(clean_ledger: Engine) -> None:
    support, publisher = support_deps(clean_ledger)
    with pytest.raises(NotFound):
        resubmit_rejected(404, json.dumps(FIXED).encode(), reason="fix", operator="ana",
                          deps=support, submitter=publisher, max_bytes=MAX)


def test_the_database_keeps_the_rejected_message_as_received(clean_ledger: Engine) -> None:
    rejected_id = reject(clean_ledger, b"[]")
    for change in ("reason = 'edited'", "raw = 'x'", "event_id = 'x'", "size_bytes = 1"):
        with pytest.raises(DBAPIError, match="keeps the message as received"), \
                clean_ledger.begin() as conn:
            conn.execute(text(f"UPDATE rejected_events SET {change} WHERE id = {rejected_id}"))
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE rejected_events SET resubmitted_at = now(), "
                          f"resubmitted_event_id = 'a', dead_published_at = now() "
                          f"WHERE id = {rejected_id}"))
    with pytest.raises(DBAPIError, match="already resubmitted"), clean_ledger.begin() as conn:
        conn.execute(text(f"UPDATE rejected_events SET resubmitted_event_id = 'b' "
                          f"WHERE id = {rejected_id}"))


# -- the commands, in process ---------------------------------------------------------------


HOSTILE = json.dumps({**FIXED, "eventId": "e[bold red]\x1b[2J\x1b]0;title\x07\rforged",
                      "customer": {"id": ":thumbs_up: [link=http://x]y[/link]"}}).encode()


def test_rejected_list_and_show_never_pass_markup_or_escapes(
        cli: Callable[..., Any], clean_ledger: Engine, tmp_path: Path) -> None:
    hostile_id = reject(clean_ledger, HOSTILE)
    binary = b'{"eventId": "x"}\n\x1b[31m\xff\x00'
    binary_id = reject(clean_ledger, binary)
    listed = cli("rejected", "list")
    assert listed.exit_code == 0
    assert "\x1b" not in listed.output and "\r" not in listed.output
    assert "e[bold red]\\x1b[2J\\x1b]0;title\\x07\\rforged" in listed.output
    assert "body is not UTF-8: invalid start byte at byte 22" in listed.output

    shown = cli("rejected", "show", str(hostile_id))
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "event id (as sent): e[bold red]\\x1b[2J\\x1b]0;title\\x07\\rforged" in out
    assert ":thumbs_up: [link=http://x]y[/link]" in out, "no emoji, no link markup"
    assert "not resubmitted" in out
    out = cli("rejected", "show", str(binary_id)).output
    assert "\x1b" not in out and "\x00" not in out
    assert '  {"eventId": "x"}\n  \\x1b[31m\\xff\\x00\n' in out, "escaped, indented"

    saved = tmp_path / "raw.bin"
    cli("rejected", "show", str(binary_id), "--save", str(saved))
    assert saved.read_bytes() == binary
    as_json = json.loads(cli("rejected", "show", str(binary_id), "--json").output)
    assert base64.b64decode(as_json["raw"]) == binary
    assert cli("rejected", "show", "404").exit_code == 3


def test_rejected_resubmit_publishes_the_fixed_event_and_audits_who(
        cli: Callable[..., Any], clean_ledger: Engine, settings: Settings) -> None:
    rejected_id = reject(clean_ledger, HOSTILE)
    # The fix keeps the customer the producer sent (valid, however it reads)
    fixed = json.dumps({**FIXED, "customer": json.loads(HOSTILE)["customer"]}).encode()

    dry = cli("rejected", "resubmit", str(rejected_id), "--file", "-", "--reason", "fix",
              "--dry-run", stdin=fixed)
    assert dry.exit_code == 0 and "would be resubmitted as event" in dry.output
    bad = cli("rejected", "resubmit", str(rejected_id), "--file", "-", "--reason", "fix",
              stdin=b"[" * 5000)
    assert bad.exit_code == 1
    assert "refused: the fixed payload is not a valid event: JSON nested deeper" in bad.output

    done = cli("rejected", "resubmit", str(rejected_id), "--file", "-", "--reason",
               "SUP-7 [bold]fixed[/]", "--operator", "ana", stdin=fixed)
    assert done.exit_code == 0, done.output
    assert f"resubmitted as event {FIXED['eventId']}" in done.output
    # (no worker ever declared the task queue here: the publish did, so nothing was dropped)
    with Connection(settings.broker_url) as conn:
        message = topology.tasks_queue(settings).bind(conn.default_channel).get(no_ack=True)
    assert message is not None and message.headers["task"] == "coupons.issue"
    _args, kwargs, _embed = message.decode()
    assert kwargs == {"event": parse_event_data(json.loads(fixed)).to_message(),
                      "source": "resubmit"}

    actions = rows(clean_ledger, "SELECT operator, reason, outcome, details FROM "
                                 "operator_actions ORDER BY id")
    assert [a["outcome"].split(":")[0] for a in actions] == ["refused", "resubmitted as event "
                                                             f"{FIXED['eventId']}"]
    assert actions[-1]["operator"] == "ana" and actions[-1]["reason"] == "SUP-7 [bold]fixed[/]"
    assert actions[-1]["details"]["os_user"] == getpass.getuser()
    shown = cli("rejected", "show", str(rejected_id))
    assert f"resubmitted as event {FIXED['eventId']}" in shown.output
    assert "SUP-7 [bold]fixed[/]" in shown.output.replace("\n", "")
    again = cli("rejected", "resubmit", str(rejected_id), "--file", "-", "--reason", "x",
                stdin=fixed)
    assert again.exit_code == 1 and "refused: already resubmitted" in again.output


def test_a_dead_letter_of_ours_is_resubmitted_as_received(
        cli: Callable[..., Any], clean_ledger: Engine, settings: Settings) -> None:
    # Given a valid event that our side kept failing on, kept as an infrastructure dead letter
    raw = json.dumps(FIXED).encode()
    dead_id = record_rejection(
        raw, "infrastructure: failed 5 deliveries, the last with LedgerError: refused",
        source="bus", deps=pipeline_deps(clean_ledger), event_id=FIXED["eventId"],
        kind=DeadMessageKind.INFRASTRUCTURE)
    listed = json.loads(cli("dlq", "list", "--json").output)
    assert [(r["id"], r["error_code"]) for r in listed] == [(dead_id, "infrastructure")]
    only = json.loads(cli("dlq", "list", "--error-code", "infrastructure", "--json").output)
    assert [r["id"] for r in only] == [dead_id]
    assert json.loads(cli("dlq", "list", "--error-code", "rejected", "--json").output) == []
    shown = cli("rejected", "show", str(dead_id))
    assert "kind: infrastructure" in shown.output
    # When support resubmits it once the cause is fixed, with no file
    done = cli("rejected", "resubmit", str(dead_id), "--reason", "pooler fixed (OPS-12)")
    # Then the message as received goes through the normal intake
    assert done.exit_code == 0, done.output
    with Connection(settings.broker_url) as conn:
        message = topology.tasks_queue(settings).bind(conn.default_channel).get(no_ack=True)
    assert message is not None
    _args, kwargs, _embed = message.decode()
    assert kwargs == {"event": parse_event_data(FIXED).to_message(), "source": "resubmit"}
