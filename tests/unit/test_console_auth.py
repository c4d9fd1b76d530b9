"""The console's users, roles, login limiter and CSRF tokens, without I/O beyond a temp file."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.domain.errors import ConfigurationError
from worker.entrypoints.console import csrf
from worker.entrypoints.console.auth import LoginLimiter, Role, UserDirectory, hash_password


def test_users_from_a_toml_file_or_inline_json(tmp_path: Path) -> None:
    hashed = hash_password("pw")
    toml = tmp_path / "users.toml"
    toml.write_text(f'[[users]]\nname = "ana"\nrole = "admin"\npassword_hash = \'{hashed}\'\n')
    for source in (str(toml), f'{{"users": [{{"name": "ana", "role": "admin", '
                              f'"password_hash": "{hashed}"}}]}}'):
        users = UserDirectory.load(source)
        user = users.authenticate("ana", "pw")
        assert user is not None and user.role is Role.ADMIN
        assert users.authenticate("ana", "wrong") is None
        assert users.authenticate("nobody", "pw") is None


def test_a_user_without_a_hash_cannot_log_in_and_bad_roles_are_refused() -> None:
    assert UserDirectory.load('{"users": [{"name": "sso", "role": "viewer"}]}') \
        .authenticate("sso", "") is None
    with pytest.raises(ConfigurationError, match="unknown console role"):
        UserDirectory.load('{"users": [{"name": "x", "role": "root"}]}')
    with pytest.raises(ConfigurationError, match="COUPONS_CONSOLE_USERS"):
        UserDirectory.load("/nonexistent/users.json")


def test_roles_are_ordered() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN


def test_the_limiter_blocks_after_max_failures_per_key_and_forgets_on_success() -> None:
    limiter = LoginLimiter(max_failures=2, window_s=60)
    limiter.failed("user:a", "ip:1")
    assert not limiter.blocked("user:a", "ip:1")
    limiter.failed("user:a", "ip:1")
    assert limiter.blocked("user:a") and limiter.blocked("ip:1")
    assert not limiter.blocked("user:b", "ip:2")
    limiter.succeeded("user:a", "ip:1")
    assert not limiter.blocked("user:a", "ip:1")


def test_the_limiter_window_passes() -> None:
    now = [100.0]
    limiter = LoginLimiter(max_failures=1, window_s=60, clock=lambda: now[0])
    limiter.failed("user:a")
    assert limiter.blocked("user:a")
    now[0] += 60.5
    assert not limiter.blocked("user:a")


def test_csrf_tokens_are_per_session_and_compared_exactly() -> None:
    session: dict[str, object] = {}
    token = csrf.token(session)
    assert csrf.token(session) == token
    assert csrf.valid(session, token)
    assert not csrf.valid(session, token + "x")
    assert not csrf.valid(session, None)
    assert not csrf.valid({}, token)


def test_the_limiter_forgets_keys_whose_failures_left_the_window() -> None:
    # A client trying a new user name each time, then again after the window
    now = [100.0]
    limiter = LoginLimiter(max_failures=3, window_s=60, clock=lambda: now[0])
    for i in range(5_000):
        limiter.failed(f"user:{i}")
    now[0] += 61
    for i in range(5_000, 10_000):
        limiter.failed(f"user:{i}")
    # Then what it holds is about the last window's names, not every name ever tried
    assert len(limiter) <= 6_000
    assert not limiter.blocked("user:0")
    # ...while a name failing within the window is still counted
    for _ in range(3):
        limiter.failed("user:x")
    assert limiter.blocked("user:x")


def test_a_huge_user_name_is_limited_under_a_key_of_bounded_size() -> None:
    limiter = LoginLimiter(max_failures=2, window_s=60)
    name = "user:" + "a" * 1_000_000
    limiter.failed(name)
    limiter.failed(name)
    assert limiter.blocked(name)
    # Kept under its first characters: another name sharing them shares the count
    assert limiter.blocked(name[:LoginLimiter.KEY_MAX_CHARS] + "b" * 10)
    assert not limiter.blocked("user:" + "b" * 1_000)
    limiter.succeeded(name)
    assert not limiter.blocked(name)
