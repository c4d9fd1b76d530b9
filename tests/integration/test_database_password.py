"""COUPONS_DATABASE_PASSWORD(_FILE): each new ledger connection asks for the password now."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import event, text

from worker.adapters.postgres.unit_of_work import make_engine
from worker.config import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("COUPONS_", "CAPILLARY_")) and name != "COUPONS_ENV_FILE":
            monkeypatch.delenv(name)


def test_new_connections_use_the_rotated_password_file(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the ledger's password as a file (the test server trusts local connections, so
    # what is checked is the password each connection is opened with)
    password_file = tmp_path / "ledger-password"
    password_file.write_text("first-password\n", encoding="utf-8")
    monkeypatch.setenv("COUPONS_DATABASE_URL", database_url)
    monkeypatch.setenv("COUPONS_DATABASE_PASSWORD_FILE", str(password_file))
    settings = load_settings()
    engine = make_engine(settings.database_url, pool_size=1,
                         password=settings.database_secret())
    sent: list[object] = []

    @event.listens_for(engine, "do_connect")
    def seen(dialect: object, record: object, cargs: object,
             cparams: dict[str, object]) -> None:
        sent.append(cparams.get("password"))

    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        # When the file is rewritten, and the pool opens a new connection
        staged = tmp_path / "staged"
        staged.write_text("second-password\n", encoding="utf-8")
        staged.replace(password_file)
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
    # Then the first connection was opened with the first password, the new one with the new
    assert sent == ["first-password", "second-password"]
    # And the commands that connect once get the password in their URL
    assert ":second-password@" in settings.ledger_url()
