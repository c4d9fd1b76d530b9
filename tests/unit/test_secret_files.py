"""Secrets from ``<NAME>_FILE`` files, and secrets that follow their file without a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest
import requests
from pydantic import SecretStr

from worker.adapters.capillary.auth import BasicAuth, OAuthTokens, basic_auth_header
from worker.adapters.capillary.client import build_auth
from worker.config import load_settings
from worker.domain.errors import ConfigurationError
from worker.entrypoints.console.config import load_console_settings
from worker.secret_files import Secret, read_secret_file

STRONG = "3f9c2b7e1a5d4c8b9e0f6a2d7c1b5e4a"
OTHER_STRONG = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("COUPONS_", "CAPILLARY_")) and name != "COUPONS_ENV_FILE":
            monkeypatch.delenv(name)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_file_variable_gives_the_setting_without_its_trailing_newline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the Capillary credentials and the ledger's URL as files (echo adds a newline)
    monkeypatch.setenv("CAPILLARY_USERNAME_FILE", str(_write(tmp_path / "u", "store.server\n")))
    monkeypatch.setenv("CAPILLARY_PASSWORD_FILE", str(_write(tmp_path / "p", "s3cret\r\n")))
    monkeypatch.setenv("COUPONS_DATABASE_URL_FILE",
                       str(_write(tmp_path / "db", "postgresql://w:pw@db:5432/ledger\n")))
    monkeypatch.setenv("COUPONS_DATABASE_PASSWORD_FILE", str(_write(tmp_path / "dbp", "pw2\n")))
    # When the settings are read
    settings = load_settings()
    # Then each holds the file's content, the newline dropped
    assert settings.capillary_username == "store.server"
    assert settings.capillary_password is not None
    assert settings.capillary_password.get_secret_value() == "s3cret"
    assert settings.database_url == "postgresql+psycopg://w:pw@db:5432/ledger"
    assert settings.ledger_url() == "postgresql+psycopg://w:pw2@db:5432/ledger"
    assert settings.auth_scheme == "basic"


def test_setting_both_the_value_and_its_file_is_an_error_naming_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPILLARY_OAUTH_KEY", "k")
    monkeypatch.setenv("CAPILLARY_OAUTH_SECRET", "s")
    monkeypatch.setenv("CAPILLARY_OAUTH_SECRET_FILE", str(_write(tmp_path / "s", "s2")))
    with pytest.raises(ConfigurationError,
                       match="CAPILLARY_OAUTH_SECRET and CAPILLARY_OAUTH_SECRET_FILE"):
        load_settings()


def test_a_dotenv_value_and_a_file_conflict_too(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _write(tmp_path / ".env", "COUPONS_BROKER_URL=amqp://u:p@mq:5672//\n")
    monkeypatch.setenv("COUPONS_ENV_FILE", str(env_file))
    monkeypatch.setenv("COUPONS_BROKER_URL_FILE", str(_write(tmp_path / "b", "amqp://x//")))
    with pytest.raises(ConfigurationError, match="COUPONS_BROKER_URL_FILE are both set"):
        load_settings()


def test_an_unreadable_or_empty_file_is_named(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPILLARY_USERNAME", "u")
    monkeypatch.setenv("CAPILLARY_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="CAPILLARY_PASSWORD_FILE: cannot read"):
        load_settings()
    monkeypatch.setenv("CAPILLARY_PASSWORD_FILE", str(_write(tmp_path / "empty", "\n")))
    with pytest.raises(ConfigurationError, match=r"CAPILLARY_PASSWORD_FILE: the file .* empty"):
        load_settings()


def test_the_console_secret_comes_from_a_file_too(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COUPONS_CONSOLE_SECRET_FILE", str(_write(tmp_path / "c", STRONG + "\n")))
    assert load_console_settings().secret.get_secret_value() == STRONG
    monkeypatch.setenv("COUPONS_CONSOLE_SECRET", STRONG)
    with pytest.raises(ConfigurationError, match="COUPONS_CONSOLE_SECRET_FILE are both set"):
        load_console_settings()


def test_a_secret_follows_its_file_when_the_file_changes(tmp_path: Path) -> None:
    # Given a secret read from a file
    path = _write(tmp_path / "key", "old\n")
    ticks = Ticks()
    secret = Secret(read_secret_file(path, variable="K_FILE"), path=path, variable="K_FILE",
                    check_s=60, clock=ticks)
    assert (secret.get(), secret.version) == ("old", 0)
    # When the file is rewritten (a new inode, as Kubernetes' symbolic link swap makes)
    replacement = _write(tmp_path / "key.new", "new\n")
    replacement.replace(path)
    # Then the next use reads the new value, long before check_s, and the version grows
    assert (secret.get(), secret.version) == ("new", 1)
    # And a moment without the file keeps the last value instead of failing
    path.unlink()
    ticks.now += 61
    assert (secret.get(), secret.version) == ("new", 1)
    _write(path, "newer")
    assert secret.get() == "newer"
    assert "newer" not in repr(secret)


def test_a_fixed_secret_never_changes() -> None:
    secret = Secret(SecretStr("v"))
    assert (secret.get(), secret.refresh(force=True), secret.from_file) == ("v", 0, False)


def _request() -> requests.PreparedRequest:
    return requests.Request("POST", "http://capillary.test/x").prepare()


def test_basic_auth_sends_the_rotated_password_from_the_next_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a worker whose Capillary password is a file
    monkeypatch.setenv("CAPILLARY_USERNAME", "store.server")
    password = _write(tmp_path / "password", "wrong\n")
    monkeypatch.setenv("CAPILLARY_PASSWORD_FILE", str(password))
    auth = build_auth(load_settings(), requests.Session)
    assert isinstance(auth, BasicAuth)
    before = auth.versions
    assert auth(_request()).headers["Authorization"] == \
        basic_auth_header("store.server", SecretStr("wrong"))
    # When the file is rewritten with the right password
    _write(tmp_path / "p2", "server123\n").replace(password)
    # Then the next call carries it, and the credentials' versions tell that they changed
    assert auth(_request()).headers["Authorization"] == \
        basic_auth_header("store.server", SecretStr("server123"))
    assert auth.versions != before


class TokenEndpoint(requests.Session):
    """Capillary's token endpoint, answering a token named after the secret it was given."""

    secrets: ClassVar[list[str]] = []

    def post(self, url: str | bytes, data: object = None, json: object = None,
             **kwargs: object) -> requests.Response:
        assert isinstance(json, dict)
        self.secrets.append(json["secret"])
        response = requests.Response()
        response.status_code = 200
        response._content = (b'{"data": {"accessToken": "token-for-' + json["secret"].encode()
                             + b'", "ttlSeconds": 3600}}')
        return response


def test_oauth_renews_its_token_at_once_when_the_secret_file_changes(tmp_path: Path) -> None:
    path = _write(tmp_path / "secret", "one\n")
    TokenEndpoint.secrets = []
    auth = OAuthTokens("http://capillary.test", "key",
                       Secret("one", path=path, variable="CAPILLARY_OAUTH_SECRET_FILE"),
                       session_factory=TokenEndpoint, timeout_s=(1.0, 1.0))
    assert auth.token() == "token-for-one"
    assert auth.token() == "token-for-one"
    _write(tmp_path / "s2", "two\n").replace(path)
    assert auth.token() == "token-for-two"
    assert TokenEndpoint.secrets == ["one", "two"]
