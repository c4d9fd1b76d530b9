"""The console's secret given as a file follows the file, with no restart: it signs the cookie
that carries the login form's CSRF token (sessions themselves are kept in PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from tests.console.conftest import PASSWORDS, csrf_of, login
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.entrypoints.console.app import create_app
from worker.entrypoints.console.config import load_console_settings
from worker.usecases.issue import utcnow
from worker.usecases.support import SupportDeps

FIRST = "3f9c2b7e1a5d4c8b9e0f6a2d7c1b5e4a"
SECOND = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def _rewrite(path: Path, text: str) -> None:
    # As a secrets volume does: a new file moved into place.
    staged = path.with_suffix(".new")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)


def _log_in_with(client: TestClient, token: str, name: str = "vera") -> int:
    return client.post("/login", data={"username": name, "password": PASSWORDS[name],
                                       "csrf_token": token}).status_code


def test_a_rotated_secret_file_signs_the_login_form_from_the_next_request(
        settings: Settings, clean_ledger: Engine, users_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a console whose secret is a file, a user logged in and another at the login form
    secret_file = tmp_path / "console-secret"
    secret_file.write_text(FIRST + "\n", encoding="utf-8")
    monkeypatch.delenv("COUPONS_CONSOLE_SECRET", raising=False)
    monkeypatch.setenv("COUPONS_CONSOLE_SECRET_FILE", str(secret_file))
    publisher = FakePublisher()
    app = create_app(settings, load_console_settings(users=str(users_file)),
                     engine=clean_ledger, submitter=publisher,
                     support=SupportDeps(uow=sql_unit_of_work_factory(clean_ledger),
                                         publisher=publisher, clock=utcnow))
    logged_in = TestClient(app, follow_redirects=False, client=("10.0.0.1", 50000))
    login(logged_in, "vera")
    at_the_form = TestClient(app, follow_redirects=False, client=("10.0.0.2", 50000))
    old_form = csrf_of(at_the_form.get("/login").text)

    # When a secret too weak to sign is written, it is refused: a form shown meanwhile is
    # still signed with the first one (taken, it would fail once the first is back)
    _rewrite(secret_file, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    still = TestClient(app, follow_redirects=False, client=("10.0.0.3", 50000))
    form = csrf_of(still.get("/login").text)
    _rewrite(secret_file, FIRST + "\n")
    assert _log_in_with(still, form) == 303

    # When the file is rewritten with a new strong secret, with no restart
    _rewrite(secret_file, SECOND + "\n")
    # Then the session kept in PostgreSQL lives on
    assert logged_in.get("/").status_code == 200
    # And a form signed with the old secret no longer logs in; a reloaded one does
    assert _log_in_with(at_the_form, old_form) == 403
    assert _log_in_with(at_the_form, csrf_of(at_the_form.get("/login").text)) == 303
    assert at_the_form.get("/").status_code == 200
