"""The console's hardening: security headers, exports a spreadsheet cannot run, bad input
refused with a 400, weak secrets refused at start."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from tests.console.conftest import csrf_of, login
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.domain.errors import ConfigurationError
from worker.domain.events import parse_event_data
from worker.domain.model import Coupon, EntityState
from worker.domain.text import mask_code
from worker.entrypoints.console.config import ConsoleSettings, load_console_settings
from worker.entrypoints.console.pages.audit import spreadsheet_safe


def test_every_response_carries_the_security_headers(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for response in (client.get("/login"), client.get("/static/console.css")):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "'unsafe-inline'" not in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    login(client, "vera")
    page = client.get("/dlq")
    assert page.headers["cache-control"] == "no-store", "customer data is never cached"
    assert "<style" not in page.text and "style=" not in page.text
    assert '<link rel="stylesheet" href="/static/console.css">' in page.text
    assert client.get("/static/console.css").headers["cache-control"].startswith("public")
    # HSTS only over HTTPS
    assert "strict-transport-security" not in page.headers
    secure = make_client()
    secure.base_url = secure.base_url.copy_with(scheme="https")
    assert secure.get("/login").headers["strict-transport-security"] == "max-age=31536000"


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)",
                                  "\tcmd", "\rcmd", "|calc", "%0A"])
def test_a_cell_that_could_start_a_formula_is_neutralised(cell: str) -> None:
    assert spreadsheet_safe(cell) == "'" + cell
    assert spreadsheet_safe("plain reason") == "plain reason"
    assert spreadsheet_safe(None) == ""


def test_the_audit_export_streams_every_row_neutralised(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given 620 audit rows (more than a page of 500), one with a formula in each text field
    with clean_ledger.begin() as conn:
        conn.execute(text(
            "INSERT INTO operator_actions (at, action, operator, reason, outcome, event_id) "
            "SELECT now() - make_interval(secs => n), 'discard', 'ana', 'r' || n, 'ok', "
            "'e-' || n FROM generate_series(1, 619) AS n"))
        conn.execute(text(
            "INSERT INTO operator_actions (at, action, operator, reason, outcome, event_id) "
            "VALUES (now(), '=cmd|calc', '+ana', '-2+3', '@SUM(A1)', '=HYPERLINK(1)')"))
    client = make_client()
    login(client, "otto")
    response = client.get("/audit?format=csv")
    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(response.text)))
    # (the operator's own login is audited too)
    assert int(response.headers["x-row-count"]) == len(rows) - 1 >= 620, "no silent cap"
    planted = next(row for row in rows if row[2] == "'=cmd|calc")
    assert planted[2:6] == ["'=cmd|calc", "'+ana", "'-2+3", "'@SUM(A1)"]
    assert planted[7] == "'=HYPERLINK(1)"
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


@pytest.mark.parametrize("path", ["/audit?since=yesterday", "/dlq/group?series=abc",
                                  "/replay/plan?until=2026-13-45", "/dlq/group?entity_id=1x"])
def test_a_value_that_cannot_be_read_is_a_400_with_the_reason(
        make_client: Callable[..., TestClient], path: str) -> None:
    client = make_client()
    login(client, "otto")
    response = client.get(path)
    assert response.status_code == 400, response.text
    assert "is not a" in response.text


def test_a_weak_secret_is_refused_at_start_naming_the_setting(users_file: object) -> None:
    for weak in ("s" * 40, "ab" * 20):
        with pytest.raises(ConfigurationError, match="COUPONS_CONSOLE_SECRET is too weak"):
            load_console_settings(secret=weak, users=str(users_file))
    assert isinstance(load_console_settings(secret="a" * 8 + "0123456789abcdefghijklmn",
                                            users=str(users_file)), ConsoleSettings)


def seed_issued(engine: Engine, event_id: str, customer: str, code: str) -> int:
    uow = sql_unit_of_work_factory(engine)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": event_id, "customer": {"id": customer},
                                          "seriesIds": [544770]}), source="bus", now=now)
        claim = u.ledger.claim_event(event_id, token="t", worker="w", now=now, lease_s=60,
                                     settle_window_s=120)
        entity_id = claim.entities[0].entity_id
        u.ledger.record(claim, calls=[], worker="w", now=now, transitions=[Transition(
            entity_id, EntityState.ISSUED, "issued", 1,
            coupon=Coupon(code=code, series_id=544770))])
        u.commit()
    return entity_id


def test_a_viewer_sees_coupon_codes_masked_and_an_operator_whole(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    entity_id = seed_issued(clean_ledger, "masked-1", "566881990", "GOLD-7HQ2-9K3F")
    viewer = make_client()
    login(viewer, "vera")
    for page in (viewer.get(f"/entities/{entity_id}"), viewer.get("/customer?q=566881990")):
        assert page.status_code == 200
        assert "GOLD-7HQ2-9K3F" not in page.text and "****9K3F" in page.text
    operator = make_client()
    login(operator, "otto")
    assert "GOLD-7HQ2-9K3F" in operator.get(f"/entities/{entity_id}").text


def test_logs_never_carry_a_whole_coupon_code() -> None:
    assert mask_code("GOLD-7HQ2-9K3F") == "****9K3F"
    assert mask_code("SHORT12") == "****", "a short code shows nothing of itself"
    assert mask_code(None) is None


@pytest.mark.parametrize("name", ["ev\x00il", "=cmd|calc"])
def test_a_login_under_any_name_is_audited(
        make_client: Callable[..., TestClient], clean_ledger: Engine, name: str) -> None:
    client = make_client()
    token = csrf_of(client.get("/login").text)
    refused = client.post("/login", data={"username": name, "password": "x",
                                          "csrf_token": token})
    assert refused.status_code in (200, 401)
    with clean_ledger.connect() as conn:
        rows = conn.execute(text("SELECT operator, outcome FROM operator_actions "
                                 "WHERE action = 'console_login'")).all()
    assert len(rows) == 1 and rows[0][1] == "refused"
    assert "\x00" not in rows[0][0]


def test_support_finds_an_event_by_coupon_code_request_id_or_event_id(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given two customers' events, one with a coupon and a recorded call
    seed_issued(clean_ledger, "found-1", "566881991", "GOLD-AAAA-1111")
    seed_issued(clean_ledger, "other-2", "566881992", "GOLD-BBBB-2222")
    with clean_ledger.begin() as conn:
        conn.execute(text(
            "INSERT INTO api_calls (event_id, entity_ids, series_ids, operation, started_at, "
            "latency_ms, outcome, request_id) VALUES ('found-1', '{}', '{}', 'bulk_issue', "
            "now(), 1, 'ok', 'req-5f2c')"))
    client = make_client()
    login(client, "otto")
    # When support searches by what a customer or Capillary's support gave them
    for query in ("GOLD-AAAA-1111", "req-5f2c", "found-1", "566881991"):
        page = client.get(f"/customer?q={query}")
        # Then that event, and only it, is shown
        assert page.status_code == 200
        assert "found-1" in page.text and "other-2" not in page.text, query
