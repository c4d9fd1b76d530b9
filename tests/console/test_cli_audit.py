"""The command line's side of the console's identity story: the OS user next to --operator,
and the password hashes of the users file."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import Engine, text

from tests.console.conftest import seed_dead


def test_the_cli_audits_the_os_user_next_to_the_operator_it_was_told(
        cli: Callable[..., Any], clean_ledger: Engine) -> None:
    dead = seed_dead(clean_ledger, "ev-cli", "5", [1])
    result = cli("dlq", "discard", str(dead[0]), "--reason", "churned", "--operator", "someone")
    assert result.exit_code == 0, result.output
    with clean_ledger.connect() as conn:
        operator, details = conn.execute(text(
            "SELECT operator, details FROM operator_actions WHERE action = 'discard'")).one()
    assert operator == "someone"
    assert details == {"via": "cli", "os_user": getpass.getuser()}


def test_hash_password_prints_an_argon2_hash_that_verifies(cli: Callable[..., Any]) -> None:
    result = cli("console", "hash-password", "--password", "correct horse")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "correct horse")


def test_flower_refuses_every_interface_without_authentication(
        cli: Callable[..., Any], monkeypatch: Any) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_AUTH", raising=False)
    result = cli("flower", "--address", "0.0.0.0")  # noqa: S104 (what is refused)
    assert result.exit_code == 2 and "without authentication" in result.output
