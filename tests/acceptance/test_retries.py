"""Retries, dead letters, reconciliation, the circuit and replay, with the real worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection
from sqlalchemy import Engine, text

from coupon_devtools.sandbox import BackgroundSandbox, SandboxAdmin
from tests.acceptance.helpers import (
    circuit,
    example_event,
    publish,
    story,
    wait_for_circuit_opened,
    wait_for_consumers,
    wait_for_every_delivery,
    wait_for_state,
)
from tests.conftest import WorkerProcess, run_cli, wait_until
from worker.adapters.rabbitmq import topology
from worker.config import Settings


def entity_states(engine: Engine, event_id: str) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT series_id, state FROM entities WHERE event_id = :e"),
                            {"e": event_id})
        return {r[0]: r[1] for r in rows}


def history_kinds(engine: Engine, event_id: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT h.kind FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = :e ORDER BY h.id"), {"e": event_id})]


def cli(settings: Settings, *args: str, check: bool = True) -> Any:
    result = run_cli(settings, *args)
    if check:
        assert result.exit_code == 0, result.output
    return result


def dead_queue_messages(settings: Settings) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    with Connection(settings.broker_url) as conn:
        queue = topology.dead_queue(settings)(conn.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(json.loads(message.body))
    return messages


def test_retryable_faults_end_issued_after_retries(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    sandbox.add_fault(kind="error_before", status=503, times=2, series=553379)
    sandbox.add_fault(kind="busy_521", times=1, series=600001)
    publish(settings, example_event("retry-me", series=(544770, 553379, 600001)))
    # Any 5xx is an unknown outcome: each is read back, and sent again only once the settle
    # window says the original can no longer land.
    done = wait_for_state(clean_ledger, "retry-me", "completed", timeout_s=60)
    # The first call failed whole (503); each series was then retried alone: 553379 met its
    # second 503, 600001 its 521, 544770 went through.
    by_series = {e["series_id"]: e["attempts"] for e in done["entities"]}
    assert by_series == {544770: 2, 553379: 3, 600001: 3}
    calls = [c["seriesIds"] for c in sandbox.calls() if c["path"] == "bulk"]
    assert calls[0] == [544770, 553379, 600001]
    assert sorted(map(tuple, calls[1:])) == [
        (544770,), (553379,), (553379,), (600001,), (600001,)]
    assert len(sandbox.ledger()) == 3


def test_a_partial_answer_retries_only_the_failed_series(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    sandbox.set_series(5005, behaviour="error", error_code=5005)
    publish(settings, example_event("partial", series=(544770, 5005)))

    def second_call() -> bool:
        return len([c for c in sandbox.calls() if c["path"] == "bulk"]) >= 2

    wait_until(second_call, message="the retry of the failed series")
    sandbox.set_series(5005, behaviour="valid")
    wait_for_state(clean_ledger, "partial", "completed")
    calls = [c["seriesIds"] for c in sandbox.calls() if c["path"] == "bulk"]
    assert sorted(calls[0]) == [5005, 544770]
    assert all(c == [5005] for c in calls[1:])
    assert len(sandbox.ledger(series=544770)) == 1


def test_permanent_errors_go_straight_to_dead_with_a_dead_letter_message(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    sandbox.set_series(700712, behaviour="expired")
    sandbox.set_customer("404404", exists=False)
    publish(settings, example_event("expired", series=(544770, 700712)),
            example_event("unknown-customer", series=(544770,), customer="404404"))
    failed = wait_for_state(clean_ledger, "expired", "failed")
    dead = next(e for e in failed["entities"] if e["series_id"] == 700712)
    assert (dead["state"], dead["last_error_code"], dead["attempts"]) == ("dead", "712", 1)
    assert wait_for_state(clean_ledger, "unknown-customer", "failed")["entities"][0][
        "last_error_code"] == "701"
    messages: list[dict[str, Any]] = []

    def both_announced() -> bool:
        messages.extend(dead_queue_messages(settings))
        return len(messages) >= 2

    wait_until(both_announced, message="dead-letter messages")
    codes = sorted(m["errorCode"] for m in messages)
    assert codes == ["701", "712"]
    assert all(m["eventId"] and m["customer"] and m["seriesId"] for m in messages)


def test_ambiguous_faults_end_with_exactly_one_coupon_per_entity(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings, concurrency=3)
    faults = {
        "stall": {"kind": "stall_after", "delay_seconds": 5},
        "after500": {"kind": "error_after"},
        "reset": {"kind": "reset_after"},
        "empty500": {"kind": "empty_500_before"},
    }
    for n, fault in enumerate(faults.values()):
        sandbox.add_fault(customer=f"90000{n}", **fault)
    sandbox.set_series(748748, behaviour="error", error_code=748, issue_on_error=True)
    events = [example_event(f"ambiguous-{name}", series=(544770,), customer=f"90000{n}")
              for n, name in enumerate(faults)]
    events.append(example_event("ambiguous-748", series=(748748,), customer="900009"))
    publish(settings, *events)
    for event in events[:-1]:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    for n in range(len(faults)):
        assert len(sandbox.ledger(customer=f"90000{n}")) == 1, f"customer 90000{n}"
    # 748 keeps answering 748 while it issues: the first coupon is found by reconciliation
    # and the worker never sends a second request.
    done_748 = wait_for_state(clean_ledger, "ambiguous-748", "completed", timeout_s=60)
    assert done_748["coupons"][0]["recorded_via"] == "reconcile"
    assert len(sandbox.ledger(customer="900009")) == 1
    reconciled = [e for e in events
                  if (s := story(clean_ledger, e["eventId"])) and s["coupons"][0]["recorded_via"]
                  == "reconcile"]
    assert len(reconciled) >= 4


def test_answers_that_hide_an_issued_coupon_never_lead_to_a_second(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Five unknown outcomes in a row open the circuit: a short pause keeps the test short.
    settings = settings_factory(circuit_open_s=2.0)
    # Given a stand-in that issues and then answers in ways our old rule read as "failed"
    start_worker(settings, concurrency=3)
    faults: dict[str, dict[str, Any]] = {
        "json500": {"kind": "error_json_after"},
        "json503": {"kind": "error_json_after", "status": 503},
        "proxy502": {"kind": "html_after", "status": 502},
        # Lands after the client's 2 s read timeout, inside the 4 s settle window.
        "slow": {"kind": "slow_original", "delay_seconds": 3},
        # A gateway's redirect to the same URL: following it would send the call again.
        "redirect307": {"kind": "redirect_after"},
        "redirect308": {"kind": "redirect_after", "status": 308},
        # Bytes from a middlebox instead of the answer.
        "garbled": {"kind": "garbled_after"},
    }
    for n, fault in enumerate(faults.values()):
        sandbox.add_fault(customer=f"91000{n}", **fault)
    # And a read-back that is unreadable, then fails inside a 200, before it answers
    sandbox.add_fault(customer="910009", kind="reset_after")
    sandbox.add_fault(customer="910009", kind="readback_unreadable", path="readback")
    sandbox.add_fault(customer="910009", kind="readback_failure_status", path="readback")
    events = [example_event(f"hidden-{name}", series=(544770,), customer=f"91000{n}")
              for n, name in enumerate(faults)]
    events.append(example_event("hidden-readback", series=(544770,), customer="910009"))
    publish(settings, *events)
    # Then every entity ends issued once, and no second issue call was ever made
    for event in events:
        done = wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
        assert len(done["coupons"]) == 1
    for customer in [*(f"91000{n}" for n in range(len(faults))), "910009"]:
        assert len(sandbox.ledger(customer=customer)) == 1, customer
        bulk = [c for c in sandbox.calls() if c["path"] == "bulk" and c["customerId"] == customer]
        assert len(bulk) == 1, f"{customer} was sent {len(bulk)} issue calls"


def test_a_tls_stream_broken_after_the_call_is_read_back_not_sent_again(
    settings_factory: Callable[..., Settings], clean_ledger: Engine,
    tls_sandbox_server: BackgroundSandbox, tls_sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a worker that reaches Capillary over HTTPS
    settings = settings_factory(capillary_base_url=tls_sandbox_server.url)
    start_worker(settings, env={"REQUESTS_CA_BUNDLE": str(tls_sandbox_server.ca_file)})
    # And a middlebox that mangles the TLS stream once Capillary has issued (requests raises
    # the same SSLError as for a handshake that failed before anything was sent)
    tls_sandbox.add_fault(kind="garbled_after")
    publish(settings, example_event("tls-garbled", series=(544770,)))
    # Then the coupon is found by reading back, and the issue call is never sent again
    done = wait_for_state(clean_ledger, "tls-garbled", "completed", timeout_s=60)
    assert done["coupons"][0]["recorded_via"] == "reconcile"
    assert len(tls_sandbox.ledger()) == 1
    assert len([c for c in tls_sandbox.calls() if c["path"] == "bulk"]) == 1


def test_a_late_original_beyond_the_window_is_found_and_listed_as_a_duplicate(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given an original that lands after the settle window (2 s timeout + 4 s window < 9 s)
    start_worker(settings)
    sandbox.add_fault(customer="920001", kind="slow_original", delay_seconds=9)
    publish(settings, example_event("late-original", series=(544770,), customer="920001"))
    # When the worker re-sends once the window is over, and the original lands after that
    wait_until(lambda: len(sandbox.ledger(customer="920001")) == 2, timeout_s=30,
               message="the re-send and then the late original to land")

    def flagged() -> bool:
        return entity_states(clean_ledger, "late-original") == {544770: "duplicate_issued"}

    # Then the check after the re-send finds both coupons, records them, and lists them
    wait_until(flagged, timeout_s=30, message="the duplicate to be detected")
    done = story(clean_ledger, "late-original")
    assert done is not None
    assert {c["code"] for c in done["coupons"]} == {c["code"] for c in sandbox.ledger()}
    listed = json.loads(cli(settings, "duplicates", "--json").stdout)
    assert [d["event_id"] for d in listed["duplicates"]] == ["late-original"]
    assert len(listed["duplicates"][0]["codes"]) == 2 and "revoke" in listed["advice"]


def test_auth_failure_pauses_instead_of_dead_lettering(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    wrong = settings_factory(capillary_password="wrong-password", circuit_open_s=2.0)
    worker = start_worker(wrong)
    publish(wrong, example_event("auth-1", series=(544770,)))
    wait_for_circuit_opened(clean_ledger)
    wait_for_consumers(wrong, wrong.tasks_queue, lambda n: n == 0,
                       what="fresh events to stop being consumed")
    publish(wrong, example_event("auth-2", series=(553379,)))
    wait_until(lambda: "deferred" in history_kinds(clean_ledger, "auth-1"),
               message="auth-1 to be deferred")
    assert "dead" not in history_kinds(clean_ledger, "auth-1"), "deferred, not dead"
    assert sandbox.ledger() == []
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM entities WHERE state = 'dead'")).scalar() \
            == 0
    # Fix the credentials: a worker with the right password probes, closes, drains everything.
    worker.stop()
    start_worker(settings_factory(circuit_open_s=2.0))
    wait_for_state(clean_ledger, "auth-1", "completed", timeout_s=60)
    wait_for_state(clean_ledger, "auth-2", "completed", timeout_s=60)
    assert len(sandbox.ledger()) == 2


def test_configuration_error_pauses_then_resumes_once_fixed(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(circuit_open_s=1.0)
    start_worker(settings)
    sandbox.set_series(777001, behaviour="error", error_code=777)
    publish(settings, example_event("config-777", series=(777001,)))
    wait_for_circuit_opened(clean_ledger)
    # The circuit opens while the call's outcome is being recorded: wait for the record.
    wait_until(lambda: "deferred" in history_kinds(clean_ledger, "config-777"),
               message="the entity to be deferred")
    assert "dead" not in history_kinds(clean_ledger, "config-777")
    sandbox.set_series(777001, behaviour="valid")
    wait_for_state(clean_ledger, "config-777", "completed", timeout_s=60)
    wait_until(lambda: circuit(clean_ledger)[0] == "closed", message="the circuit to close")
    assert len(sandbox.ledger()) == 1


def test_retries_pending_when_the_worker_is_killed_are_not_lost(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # A retry the sweeper had marked queued but not yet published when the worker died is
    # dispatched again once requeue_after_s has passed: 5 s here, not 5 minutes.
    settings = settings_factory(retry_base_s=1.0, retry_max_s=2.0, max_attempts=20,
                                requeue_after_s=5.0)
    worker = start_worker(settings)
    sandbox.set_series(730730, behaviour="error", error_code=730)
    events = [example_event(f"pending-{n}", series=(730730,), customer=f"8000{n}")
              for n in range(10)]
    publish(settings, *events)

    def waiting() -> bool:
        with clean_ledger.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM entities WHERE attempts >= 1 AND state <> 'pending'")
            ).scalar() == 10

    wait_until(waiting, message="ten retries pending")
    worker.kill()
    sandbox.set_series(730730, behaviour="valid")
    start_worker(settings)
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    wait_for_every_delivery(settings)  # the killed worker's messages, delivered again, too
    assert len(sandbox.ledger(series=730730)) == 10


def test_replay_after_fixing_a_series_issues_exactly_once(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    sandbox.set_series(707001, behaviour="invalid")
    publish(settings, example_event("replay-me", series=(544770, 707001)))
    wait_for_state(clean_ledger, "replay-me", "failed")
    listed = json.loads(cli(settings, "dlq", "list", "--event", "replay-me", "--json").stdout)
    assert [(r["series_id"], r["error_code"]) for r in listed] == [(707001, "707")]
    entity_id = str(listed[0]["id"])
    summary = json.loads(cli(settings, "dlq", "summary", "--json").stdout)
    assert summary[0]["error_code"] == "707" and summary[0]["count"] == 1

    # A dry run changes nothing and writes no audit row.
    dry = json.loads(cli(settings, "dlq", "replay", entity_id, "--reason", "series fixed",
                         "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["results"][0]["outcome"] == "would issue again"
    assert entity_states(clean_ledger, "replay-me")[707001] == "dead"
    assert _audit_rows(clean_ledger) == []
    # A replay without a reason is refused.
    assert cli(settings, "dlq", "replay", entity_id, check=False).exit_code != 0

    sandbox.set_series(707001, behaviour="valid")
    cli(settings, "dlq", "replay", entity_id, "--reason", "series fixed", "--operator", "ana")
    wait_for_state(clean_ledger, "replay-me", "completed")
    assert len(sandbox.ledger(series=707001)) == 1

    second = json.loads(cli(settings, "dlq", "replay", entity_id, "--reason", "again",
                             "--json").stdout)
    assert second["results"] == [], "nothing dead matches any more"
    forced = json.loads(cli(settings, "events", "replay", "replay-me", "--reason", "again",
                            "--json").stdout)
    assert forced["results"] == []
    assert len(sandbox.ledger(series=707001)) == 1, "a second replay issues nothing"
    audit = _audit_rows(clean_ledger)
    assert ("replay", "ana", "series fixed", "requeued") in audit
    assert ("event_replay", "nothing to replay") in [(a[0], a[3]) for a in audit]
    shown = json.loads(cli(settings, "dlq", "show", entity_id, "--json").stdout)
    assert [h["kind"] for h in shown["history"]] == [
        "claimed", "dead", "replayed", "claimed", "issued"]
    assert shown["operator_actions"][0]["reason"] == "series fixed"
    assert shown["attempts"] == 1, "a replay starts a fresh round of attempts"
    table = cli(settings, "dlq", "show", entity_id).stdout
    assert "operator actions" in table


def _audit_rows(engine: Engine) -> list[tuple[str, str, str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(  # type: ignore[misc]
            "SELECT action, operator, reason, outcome FROM operator_actions ORDER BY id"))]


def test_audit_rows_cannot_be_changed_or_deleted(clean_ledger: Engine) -> None:
    with clean_ledger.begin() as conn:
        conn.execute(text("INSERT INTO operator_actions (action, operator, reason, outcome) "
                          "VALUES ('discard', 'ana', 'why', 'discarded')"))
    for statement in ("UPDATE operator_actions SET reason = 'edited'",
                      "DELETE FROM operator_actions"):
        with clean_ledger.connect() as conn:
            try:
                conn.execute(text(statement))
            except Exception as exc:  # the trigger's refusal
                assert "append-only" in str(exc)
            else:
                raise AssertionError(f"{statement} was allowed")


def test_an_operator_opens_the_circuit_by_hand_then_closes_it_and_the_fleet_resumes(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    start_worker(settings)
    # Given Capillary asked us to stop: an operator opens the circuit for ten minutes
    opened = run_cli(settings, "circuit", "open", "--for", "10m", "--reason",
                     "Capillary maintenance (INC-7)", "--operator", "ops")
    assert opened.exit_code == 0, opened.output
    status = run_cli(settings, "circuit", "status", "--json")
    assert json.loads(status.stdout)["state"] == "open"
    # When an event arrives, nothing is sent to Capillary
    publish(settings, example_event("circuit-by-hand", customer="566884001"))
    wait_until(lambda: story(clean_ledger, "circuit-by-hand") is not None,
               message="the event to be taken in")
    time.sleep(2)
    assert sandbox.ledger(customer="566884001") == []
    # Then closing it by hand lets the fleet call again, long before the ten minutes
    closed_at = time.monotonic()
    closed = run_cli(settings, "circuit", "close", "--reason", "maintenance over",
                     "--operator", "ops")
    assert closed.exit_code == 0, closed.output
    wait_for_state(clean_ledger, "circuit-by-hand", "completed", timeout_s=60)
    assert time.monotonic() - closed_at < 10, "issuance resumes within seconds of the close"
    assert len(sandbox.ledger(customer="566884001")) == 2
    with clean_ledger.connect() as conn:
        actions = conn.execute(text(
            "SELECT action, operator FROM operator_actions ORDER BY id")).all()
    assert [tuple(a) for a in actions] == [("circuit_open", "ops"), ("circuit_close", "ops")]
