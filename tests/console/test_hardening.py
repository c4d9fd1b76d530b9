"""The console's hardening: security headers, exports a spreadsheet cannot run, bad input
refused with a 400, weak secrets refused at start."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from tests.console.conftest import login
from worker.console.config import ConsoleSettings, load_console_settings
from worker.console.routes import spreadsheet_safe
from worker.errors import ConfigurationError


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
