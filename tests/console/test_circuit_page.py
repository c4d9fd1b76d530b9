"""The circuit page: everyone sees the circuit, operators open it with a reason and close it,
with the CSRF token, audited; closing it lets a real worker issue again within seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import circuit, example_event, publish, wait_for_state
from tests.conftest import WorkerProcess
from tests.console.conftest import login
from worker.adapters.postgres.records import CircuitState, Transition
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState


def circuit_audit(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(text(
            "SELECT action, operator, reason FROM operator_actions "
            "WHERE action LIKE 'circuit_%' ORDER BY id"))]


def test_a_viewer_sees_the_circuit_but_cannot_move_it(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    client = make_client()
    token = login(client, "vera")
    page = client.get("/circuit")
    assert page.status_code == 200 and "closed" in page.text
    assert 'action="/circuit/open"' not in page.text, "no form offered to a viewer"
    refused = client.post("/circuit/open", data={"csrf_token": token, "minutes": "10",
                                                 "reason": "trying"})
    assert refused.status_code == 403
    assert circuit(clean_ledger)[0] == "closed" and circuit_audit(clean_ledger) == []


def test_an_operator_opens_it_with_a_reason_and_the_csrf_token(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    client = make_client()
    token = login(client, "otto")
    # Without the CSRF token, or without a reason, nothing moves
    assert client.post("/circuit/open", data={"minutes": "10", "reason": "x"}).status_code \
        == 403
    assert client.post("/circuit/open", data={"csrf_token": token, "minutes": "10",
                                              "reason": " "}).status_code == 400
    assert client.post("/circuit/open", data={"csrf_token": token, "minutes": "0",
                                              "reason": "x"}).status_code == 400
    assert circuit(clean_ledger)[0] == "closed"
    # With both, the circuit opens for the time given, audited under the operator's name
    before = datetime.now(UTC)
    done = client.post("/circuit/open", data={"csrf_token": token, "minutes": "10",
                                              "reason": "Capillary asked us to stop (INC-9)"})
    assert done.status_code == 303 and done.headers["location"] == "/circuit"
    with clean_ledger.connect() as conn:
        state, open_until, reason = conn.execute(text(
            "SELECT state, open_until, reason FROM circuit_breakers "
            "WHERE name = 'capillary'")).one()
    assert state == "open" and reason == "opened by otto: Capillary asked us to stop (INC-9)"
    assert before + timedelta(minutes=9) < open_until < before + timedelta(minutes=11)
    assert circuit_audit(clean_ledger) == [
        ("circuit_open", "otto", "Capillary asked us to stop (INC-9)")]
    # And every user sees it open, and why
    viewer = make_client()
    login(viewer, "vera")
    shown = viewer.get("/circuit").text
    assert "open" in shown and "INC-9" in shown


def test_closing_makes_the_entities_waiting_out_the_pause_due_at_once(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given a circuit opened by a 401, and the entity whose call got it waiting ten minutes
    uow = sql_unit_of_work_factory(clean_ledger)
    now = datetime.now(UTC)
    later = now + timedelta(minutes=10)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": "paused-1", "customer": {"id": "c1"},
                                          "seriesIds": [544770]}), source="bus", now=now)
        claim = u.ledger.claim_event("paused-1", token="t", worker="w", now=now, lease_s=60,
                                     settle_window_s=120)
        u.ledger.record(claim, calls=[], worker="w", now=now, transitions=[
            Transition(e.entity_id, EntityState.RETRY_WAIT, "deferred", 1, verdict="outage",
                       error_code="http_401", next_attempt_at=later) for e in claim.entities])
        u.ledger.save_circuit("capillary", CircuitState("open", 1, 1, later, "http_401: no"),
                              now=now)
        u.commit()
    client = make_client()
    token = login(client, "ada")
    page = client.get("/circuit").text
    assert "http_401" in page and 'action="/circuit/close"' in page
    # When an admin closes it
    assert client.post("/circuit/close", data={"csrf_token": token, "reason": ""}).status_code \
        == 400
    done = client.post("/circuit/close", data={"csrf_token": token,
                                               "reason": "new key deployed"})
    assert done.status_code == 303
    # Then it is closed, audited, and the waiting entity is due now
    assert circuit(clean_ledger)[0] == "closed"
    assert circuit_audit(clean_ledger) == [("circuit_close", "ada", "new key deployed")]
    with uow() as u:
        due = u.ledger.take_due(now=datetime.now(UTC) + timedelta(seconds=1), limit=10)
    assert [d.event_id for d in due] == ["paused-1"]
    assert "closed" in client.get("/circuit").text


def test_a_worker_issues_again_within_seconds_of_a_close_from_the_console(
        make_client: Callable[..., TestClient], settings: Settings, clean_ledger: Engine,
        sandbox: SandboxAdmin, start_worker: Callable[..., WorkerProcess]) -> None:
    # Given a worker, and the circuit opened from the console for an hour
    start_worker(settings)
    client = make_client()
    token = login(client, "otto")
    assert client.post("/circuit/open", data={"csrf_token": token, "minutes": "60",
                                              "reason": "maintenance"}).status_code == 303
    # When an event arrives, nothing is sent to Capillary (the event is taken in and
    # deferred, or, once the worker's guard has seen the circuit open, left on the bus)
    publish(settings, example_event("console-close", series=(544770,), customer="566886001"))
    time.sleep(3)
    assert sandbox.ledger(customer="566886001") == []
    # Then closing it from the console lets the worker issue within seconds, exactly once
    closed_at = time.monotonic()
    assert client.post("/circuit/close", data={"csrf_token": token,
                                               "reason": "maintenance over"}).status_code == 303
    wait_for_state(clean_ledger, "console-close", "completed", timeout_s=30)
    assert time.monotonic() - closed_at < 10
    assert len(sandbox.ledger(customer="566886001")) == 1
