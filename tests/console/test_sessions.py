"""The console's server-side sessions over HTTP (Starlette's TestClient) on a real ledger:
logout ends a session for every copy of its cookie, the users file ends the sessions of a
changed or removed user, idle and absolute timeouts, a fresh id at every login, the CSRF token
bound to its session, and proxy headers believed only from configured proxies."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from tests.console.conftest import PASSWORDS, ROLES, csrf_of, login
from worker.domain.errors import ConfigurationError
from worker.entrypoints.console.auth import hash_password
from worker.entrypoints.console.config import ConsoleSettings, load_console_settings
from worker.entrypoints.console.sessions import PRE_LOGIN_COOKIE, SESSION_COOKIE

_HASHES = {name: hash_password(password) for name, password in PASSWORDS.items()}


@pytest.fixture
def own_users(tmp_path: Path) -> Callable[..., Path]:
    """A users file of this test's own, rewritten by calling it again: ``write(vera="viewer")``
    (a password given as ``name=(role, password)``)."""
    path = tmp_path / "users.json"

    def write(**entries: str | tuple[str, str]) -> Path:
        users = []
        for name, entry in entries.items():
            role, password_hash = (entry, _HASHES[name]) if isinstance(entry, str) \
                else (entry[0], hash_password(entry[1]))
            users.append({"name": name, "role": role, "password_hash": password_hash})
        path.write_text(json.dumps({"users": users}))
        return path

    write(**ROLES)
    return write


def session_rows(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT * FROM console_sessions ORDER BY created_at"))]


def copy_of(client: TestClient, make_client: Callable[..., TestClient]) -> TestClient:
    """Another browser holding a copy of ``client``'s session cookie (a stolen cookie)."""
    thief = make_client()
    thief.cookies.set(SESSION_COOKIE, client.cookies[SESSION_COOKIE])
    return thief


def test_logout_ends_the_session_for_every_copy_of_its_cookie(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given an operator logged in, and a copy of the cookie taken before logout
    client = make_client()
    token = login(client, "otto")
    thief = copy_of(client, make_client)
    assert thief.get("/dlq").status_code == 200
    # When the operator logs out
    response = client.post("/logout", data={"csrf_token": token})
    assert response.status_code == 303
    assert f'{SESSION_COOKIE}=""' in response.headers["set-cookie"]
    # Then the session is gone server-side: the copy opens nothing and can act on nothing
    assert session_rows(clean_ledger) == []
    page = thief.get("/dlq")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    posted = thief.post("/dlq/discard", data={"entity_id": "1", "reason": "x",
                                              "csrf_token": token})
    assert posted.status_code == 403


def test_only_the_session_ids_digest_is_stored_with_who_when_and_where(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    client = make_client(client_address="192.0.2.10")
    client.headers["user-agent"] = "support-laptop/1.0"
    login(client, "ada")
    session_id = client.cookies[SESSION_COOKIE]
    [row] = session_rows(clean_ledger)
    assert row["id_hash"] == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in json.dumps(row, default=str)
    assert (row["user_name"], row["role"], row["client"], row["user_agent"]) == \
        ("ada", "admin", "192.0.2.10", "support-laptop/1.0")
    assert row["created_at"] <= row["last_seen_at"]  # type: ignore[operator]


def test_a_login_always_gets_a_new_session_id_and_ends_the_one_before(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given a visitor on the login form: the cookie it holds is not a session id
    client = make_client()
    form = client.get("/login")
    assert SESSION_COOKIE not in client.cookies and PRE_LOGIN_COOKIE in client.cookies
    planted = client.cookies[PRE_LOGIN_COOKIE]
    # When it logs in
    response = client.post("/login", data={"username": "vera", "password": PASSWORDS["vera"],
                                           "csrf_token": csrf_of(form.text)})
    # Then the session's id is new, and the pre-login cookie is dropped
    assert response.status_code == 303
    first = client.cookies[SESSION_COOKIE]
    assert first != planted and PRE_LOGIN_COOKIE not in client.cookies
    # And a pre-login cookie planted in another browser logs nobody in (session fixation)
    other = make_client()
    other.cookies.set(PRE_LOGIN_COOKIE, planted)
    other.cookies.set(SESSION_COOKIE, planted)
    assert other.get("/").status_code == 303
    # When the same browser logs in again, its old id ends
    login(client, "otto")
    assert client.cookies[SESSION_COOKIE] != first
    stale = make_client()
    stale.cookies.set(SESSION_COOKIE, first)
    assert stale.get("/").status_code == 303
    assert [r["user_name"] for r in session_rows(clean_ledger)] == ["otto"]


def test_the_csrf_token_belongs_to_its_session(
        make_client: Callable[..., TestClient]) -> None:
    first, second = make_client(), make_client()
    first_token = login(first, "otto")
    second_token = login(second, "otto")
    assert first_token != second_token
    # A token of one session is refused in another, even for the same user
    forged = second.post("/jobs/1/pause", data={"csrf_token": first_token})
    assert forged.status_code == 403 and "CSRF" in forged.text
    # A logout posted with another session's token logs nobody out
    second.post("/logout", data={"csrf_token": first_token})
    assert second.get("/dlq").status_code == 200


@pytest.mark.parametrize("change", ["removed", "role", "password"])
def test_a_change_to_a_users_entry_ends_their_sessions_at_once(
        make_client: Callable[..., TestClient], own_users: Callable[..., Path],
        clean_ledger: Engine, change: str) -> None:
    # Given otto and vera logged in, the users file checked on every request
    path = own_users(**ROLES)
    otto, vera = (make_client(users=str(path), users_check_s=0) for _ in range(2))
    login(otto, "otto")
    login(vera, "vera")
    # When otto's entry changes in the file (no restart)
    entries: dict[str, str | tuple[str, str]] = dict(ROLES)
    if change == "removed":
        del entries["otto"]
    elif change == "role":
        entries["otto"] = "viewer"
    else:
        entries["otto"] = ("operator", "a-new-password-1")
    own_users(**entries)
    # Then otto's next request is logged out and the session deleted; vera stays
    page = otto.get("/dlq")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert [r["user_name"] for r in session_rows(clean_ledger)] == ["vera"]
    assert vera.get("/dlq").status_code == 200
    if change == "role":
        # ...and logging in again gives the new role
        login(otto, "otto")
        assert "otto (viewer)" in otto.get("/dlq").text


def test_an_invalid_users_file_keeps_everyone_as_they_were(
        make_client: Callable[..., TestClient], own_users: Callable[..., Path]) -> None:
    path = own_users(**ROLES)
    client = make_client(users=str(path), users_check_s=0)
    login(client, "otto")
    path.write_text('{"users": [{"name": "otto", "role": "root"')
    page = client.get("/dlq")
    assert page.status_code == 200 and "otto (operator)" in page.text


@pytest.mark.parametrize(("column", "age"), [("last_seen_at", "31 minutes"),
                                             ("created_at", "8 hours 1 minute")])
def test_a_session_ends_after_the_idle_or_the_absolute_timeout(
        make_client: Callable[..., TestClient], clean_ledger: Engine, column: str,
        age: str) -> None:
    # Given a session (defaults: 30 minutes idle, 8 hours in all), used a moment ago
    client = make_client()
    login(client, "vera")
    assert client.get("/dlq").status_code == 200
    # When it has been idle too long, or lives past its absolute age (kept busy meanwhile)
    with clean_ledger.begin() as conn:
        conn.execute(text(f"UPDATE console_sessions SET {column} = now() - interval '{age}'"))
    # Then it is refused and deleted
    assert client.get("/dlq").status_code == 303
    assert session_rows(clean_ledger) == []


def test_each_request_moves_last_seen_and_expired_rows_go_at_the_next_login(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    client = make_client(session_idle_s=600)
    login(client, "vera")
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE console_sessions SET last_seen_at = now() - "
                          "interval '5 minutes'"))
    client.get("/dlq")
    [row] = session_rows(clean_ledger)
    assert row["last_seen_at"] > row["created_at"]  # type: ignore[operator]
    # A session left to expire without a request (its browser closed) ...
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE console_sessions SET last_seen_at = now() - "
                          "interval '11 minutes'"))
    # ... is pruned when anyone logs in
    login(make_client(session_idle_s=600), "otto")
    assert [r["user_name"] for r in session_rows(clean_ledger)] == ["otto"]


# -- proxies -------------------------------------------------------------------------------


def test_no_proxy_is_trusted_by_default_and_a_proxy_header_needs_one(
        console_settings: Callable[..., ConsoleSettings], users_file: Path) -> None:
    assert not console_settings().proxies()
    assert "127.0.0.1" not in console_settings().proxies()
    with pytest.raises(ConfigurationError, match="COUPONS_CONSOLE_TRUSTED_PROXIES is empty"):
        console_settings(proxy_user_header="X-Forwarded-User")
    with pytest.raises(ConfigurationError, match="COUPONS_CONSOLE_TRUSTED_PROXIES"):
        load_console_settings(secret="console-test-secret-0123456789abcdefghij",
                              users=str(users_file), trusted_proxies="proxy.internal")


def test_loopback_is_not_trusted_unless_configured(
        make_client: Callable[..., TestClient]) -> None:
    # A local process talking to the console directly names itself a user: refused
    local = make_client(client_address="127.0.0.1", proxy_user_header="X-Forwarded-User",
                        trusted_proxies="10.0.0.5")
    assert local.get("/dlq", headers={"X-Forwarded-User": "ada"}).status_code == 303


def login_audits(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT outcome, details->>'client' FROM operator_actions "
            "WHERE action = 'console_login' ORDER BY id"))]


def test_forwarded_headers_are_believed_from_a_trusted_proxy_only(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    forged = {"X-Forwarded-For": "198.51.100.1", "X-Forwarded-Proto": "https"}
    # Through the trusted proxy: the client's address is the forwarded one, HTTPS is known
    proxied = make_client(client_address="10.0.0.5", trusted_proxies="10.0.0.5")
    token = csrf_of(proxied.get("/login", headers=forged).text)
    assert proxied.get("/login", headers=forged).headers["strict-transport-security"]
    proxied.post("/login", headers=forged, data={"username": "otto", "password": "no",
                                                 "csrf_token": token})
    # Directly from a client: the same headers are ignored
    direct = make_client(client_address="203.0.113.7", trusted_proxies="10.0.0.5")
    token = csrf_of(direct.get("/login", headers=forged).text)
    assert "strict-transport-security" not in direct.get("/login", headers=forged).headers
    direct.post("/login", headers=forged, data={"username": "otto", "password": "no",
                                                "csrf_token": token})
    assert login_audits(clean_ledger) == [("refused", "198.51.100.1"),
                                          ("refused", "203.0.113.7")]


# -- the command line ----------------------------------------------------------------------


def test_the_cli_lists_sessions_and_revokes_a_users_at_once_audited(
        make_client: Callable[..., TestClient], cli: Callable[..., Any], clean_ledger: Engine,
        monkeypatch: pytest.MonkeyPatch, users_file: Path) -> None:
    monkeypatch.setenv("COUPONS_CONSOLE_SECRET", "console-test-secret-0123456789abcdefghij")
    monkeypatch.setenv("COUPONS_CONSOLE_USERS", str(users_file))
    otto, vera = make_client(client_address="192.0.2.30"), make_client()
    login(otto, "otto")
    login(vera, "vera")
    listed = cli("console", "sessions", "list")
    assert listed.exit_code == 0, listed.output
    # (the table wraps to the terminal's width: the address is checked in the JSON)
    assert "otto" in listed.stdout and "vera" in listed.stdout
    only = cli("console", "sessions", "list", "--user", "otto", "--json")
    assert [(s["user"], s["client"]) for s in json.loads(only.stdout)] == [("otto", "192.0.2.30")]
    # When support revokes otto's sessions
    revoked = cli("console", "sessions", "revoke", "otto", "--reason", "laptop stolen",
                  "--operator", "sec-team")
    assert revoked.exit_code == 0, revoked.output
    assert "1 console session of otto ended" in revoked.stdout
    # Then otto's next request asks for a login; vera's session lives on
    assert otto.get("/dlq").status_code == 303
    assert vera.get("/dlq").status_code == 200
    with clean_ledger.connect() as conn:
        row = conn.execute(text(
            "SELECT operator, reason, outcome, details FROM operator_actions "
            "WHERE action = 'console_sessions_revoked'")).one()
    assert row[:3] == ("sec-team", "laptop stolen", "1 ended")
    assert row[3]["user"] == "otto" and row[3]["via"] == "cli"


def test_a_reload_of_the_users_file_ends_the_changed_users_sessions_without_their_request(
        make_client: Callable[..., TestClient], own_users: Callable[..., Path],
        clean_ledger: Engine) -> None:
    path = own_users(**ROLES)
    otto, vera = (make_client(users=str(path), users_check_s=0) for _ in range(2))
    login(otto, "otto")
    login(vera, "vera")
    own_users(vera="viewer", ada="admin")
    # Any request reads the file again: otto's session goes before otto comes back
    assert vera.get("/dlq").status_code == 200
    assert [r["user_name"] for r in session_rows(clean_ledger)] == ["vera"]


def test_a_single_sign_on_user_acts_with_the_token_of_their_pages(
        make_client: Callable[..., TestClient]) -> None:
    sso = {"X-Forwarded-User": "otto"}
    client = make_client(proxy_user_header="X-Forwarded-User", trusted_proxies="10.0.0.5",
                         client_address="10.0.0.5")
    token = csrf_of(client.get("/dlq", headers=sso).text)
    assert SESSION_COOKIE not in client.cookies, "the proxy names them: no console session"
    acted = client.post("/dlq/discard", headers=sso, data={
        "ids": "999", "reason": "gone", "csrf_token": token})
    assert acted.status_code == 200, acted.text
    forged = client.post("/dlq/discard", headers=sso, data={
        "ids": "999", "reason": "gone", "csrf_token": token + "x"})
    assert forged.status_code == 403
