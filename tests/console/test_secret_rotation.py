"""The console's session secret given as a file follows the file, with no restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from tests.console.conftest import login
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


def test_a_rotated_secret_file_signs_new_sessions_and_ends_the_old_ones(
        settings: Settings, clean_ledger: Engine, users_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a console whose session secret is a file, and a user logged in
    secret_file = tmp_path / "console-secret"
    secret_file.write_text(FIRST + "\n", encoding="utf-8")
    monkeypatch.delenv("COUPONS_CONSOLE_SECRET", raising=False)
    monkeypatch.setenv("COUPONS_CONSOLE_SECRET_FILE", str(secret_file))
    publisher = FakePublisher()
    app = create_app(settings, load_console_settings(users=str(users_file)),
                     engine=clean_ledger, submitter=publisher,
                     support=SupportDeps(uow=sql_unit_of_work_factory(clean_ledger),
                                         publisher=publisher, clock=utcnow))
    client = TestClient(app, follow_redirects=False)
    login(client, "vera")
    assert client.get("/").status_code == 200

    # When a secret too weak to sign sessions is written, it is refused: the session lives on
    _rewrite(secret_file, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    assert client.get("/").status_code == 200

    # When the file is rewritten with a new strong secret, with no restart
    _rewrite(secret_file, SECOND + "\n")
    # Then the session signed with the old secret no longer opens a page
    response = client.get("/")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    # And a new login, signed with the new secret, works
    login(client, "vera")
    assert client.get("/").status_code == 200
