"""The console's users (and their file re-read on change), roles, trusted proxies and CSRF
tokens, without I/O beyond a temp file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from worker.domain.errors import ConfigurationError
from worker.entrypoints.console import csrf
from worker.entrypoints.console.auth import Role, UserDirectory, hash_password
from worker.entrypoints.console.config import TrustedProxies
from worker.entrypoints.console.proxies import forwarded_client


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


def test_csrf_tokens_are_per_session_and_compared_exactly() -> None:
    session: dict[str, object] = {}
    token = csrf.token(session)
    assert csrf.token(session) == token
    assert csrf.valid(session, token)
    assert not csrf.valid(session, token + "x")
    assert not csrf.valid(session, None)
    assert not csrf.valid({}, token)


def _write_users(path: Path, **roles: str) -> None:
    path.write_text(json.dumps({"users": [
        {"name": n, "role": r, "password_hash": _HASHES[n]} for n, r in roles.items()]}))


_HASHES = {"ana": hash_password("pw-ana"), "bob": hash_password("pw-bob")}


def test_the_users_file_is_re_read_when_it_changes_at_most_every_few_seconds(
        tmp_path: Path) -> None:
    # Given a users file read with a check every 5 s
    path = tmp_path / "users.json"
    _write_users(path, ana="admin", bob="viewer")
    now = [100.0]
    users = UserDirectory.load(str(path), check_every_s=5, clock=lambda: now[0])
    before = users.fingerprint("bob")
    # When bob is made an operator and ana removed
    _write_users(path, bob="operator")
    # Then nothing changes until the next check is due
    assert users.get("ana") is not None
    now[0] += 5
    # ...and then the file's new content applies, without a restart
    assert users.get("ana") is None
    bob = users.get("bob")
    assert bob is not None and bob.role is Role.OPERATOR
    assert users.fingerprint("bob") != before, "a role change changes the entry's fingerprint"
    assert users.fingerprint("ana") is None


def test_a_password_change_changes_the_fingerprint_and_the_same_entry_keeps_it(
        tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    _write_users(path, ana="admin")
    users = UserDirectory.load(str(path), check_every_s=0)
    first = users.fingerprint("ana")
    _write_users(path, ana="admin")
    assert users.fingerprint("ana") == first
    path.write_text(json.dumps({"users": [{"name": "ana", "role": "admin",
                                           "password_hash": hash_password("new")}]}))
    assert users.fingerprint("ana") != first
    assert users.authenticate("ana", "new") is not None


@pytest.mark.parametrize("broken", ['{"users": [', '{"users": [{"name": "x", "role": "root"}]}',
                                    '{"users": [{"role": "admin"}]}', None])
def test_an_invalid_users_file_keeps_the_last_good_list_and_says_so_loudly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None) -> None:
    path = tmp_path / "users.json"
    _write_users(path, ana="admin")
    users = UserDirectory.load(str(path), check_every_s=0)
    if broken is None:
        path.unlink()
    else:
        path.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="worker.console"):
        ana = users.get("ana")
    assert ana is not None and ana.role is Role.ADMIN
    assert [r.message for r in caplog.records] == ["console.users_unreadable"]
    # Fixed: read again
    _write_users(path, ana="viewer")
    fixed = users.get("ana")
    assert fixed is not None and fixed.role is Role.VIEWER


def test_trusted_proxies_are_addresses_or_networks_and_empty_by_default() -> None:
    proxies = TrustedProxies.parse("10.0.0.5, 192.168.1.0/24,::1")
    assert "10.0.0.5" in proxies and "192.168.1.77" in proxies and "::1" in proxies
    assert "10.0.0.6" not in proxies and "testclient" not in proxies
    assert not TrustedProxies.parse("")
    assert "127.0.0.1" not in TrustedProxies.parse("")
    with pytest.raises(ValueError, match="COUPONS_CONSOLE_TRUSTED_PROXIES"):
        TrustedProxies.parse("proxy.example")


def test_x_forwarded_for_is_read_from_the_right_up_to_the_first_untrusted_hop() -> None:
    proxies = TrustedProxies.parse("10.0.0.0/24")
    # The client put a lie on the left; the trusted proxy appended the real peer
    assert forwarded_client(["1.2.3.4, 203.0.113.9"], proxies, "10.0.0.5") == "203.0.113.9"
    # Two trusted hops
    assert forwarded_client(["203.0.113.9, 10.0.0.7"], proxies, "10.0.0.5") == "203.0.113.9"
    # A hop that is not an address ends the walk at the last believed one
    assert forwarded_client(["<script>, 10.0.0.7"], proxies, "10.0.0.5") == "10.0.0.7"
    assert forwarded_client([], proxies, "10.0.0.5") == "10.0.0.5"
