"""The console's login limits on the real ledger: counters that hold under concurrency (threads
against the real app), per user name and per client address, a backoff that doubles rather
than a lockout, and a success that clears only its own name."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from tests.console.conftest import PASSWORDS, csrf_of
from worker.adapters.postgres.login_limits import LoginLimits, key_hash


def _attempt(client: TestClient, name: str, password: str) -> int:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": name, "password": password,
                                       "csrf_token": token}).status_code


def _concurrently(clients: list[TestClient], names: list[str], password: str) -> Counter[int]:
    """One wrong login per client, all sent at the same moment (a barrier), each from its
    own thread: the statuses counted."""
    tokens = [csrf_of(c.get("/login").text) for c in clients]
    barrier = Barrier(len(clients))

    def post(i: int) -> int:
        barrier.wait()
        return clients[i].post("/login", data={"username": names[i], "password": password,
                                                "csrf_token": tokens[i]}).status_code

    with ThreadPoolExecutor(len(clients)) as pool:
        return Counter(pool.map(post, range(len(clients))))


def test_thirty_concurrent_wrong_guesses_for_one_user_get_five_checks(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given a limit of five per user, guesses from thirty addresses at once
    clients = [make_client(client_address=f"198.51.100.{i}", login_backoff_s=60)
               for i in range(30)]
    # When they all guess otto's password at the same moment
    statuses = _concurrently(clients, ["otto"] * 30, "guess")
    # Then five were checked (and refused), the other 25 held back
    assert statuses == Counter({401: 5, 429: 25})
    with clean_ledger.connect() as conn:
        outcomes = Counter(r[0] for r in conn.execute(text(
            "SELECT outcome FROM operator_actions WHERE action = 'console_login'")))
    assert outcomes == Counter({"refused": 5, "blocked: too many failed logins": 25})


def test_thirty_concurrent_wrong_guesses_from_one_address_get_five_checks(
        make_client: Callable[..., TestClient]) -> None:
    clients = [make_client(client_address="203.0.113.9", login_backoff_s=60)
               for _ in range(30)]
    statuses = _concurrently(clients, [f"name-{i}" for i in range(30)], "guess")
    assert statuses == Counter({401: 5, 429: 25})


def test_a_held_back_attempt_says_when_to_try_again(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(login_max_failures=1, login_backoff_s=120)
    assert _attempt(client, "otto", "no") == 401
    token = csrf_of(client.get("/login").text)
    held = client.post("/login", data={"username": "otto", "password": PASSWORDS["otto"],
                                       "csrf_token": token})
    assert held.status_code == 429
    assert 100 <= int(held.headers["retry-after"]) <= 120
    assert "try again in" in held.text


def test_a_success_clears_its_own_name_but_not_what_the_address_tried_under_others(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(login_max_failures=3, login_backoff_s=60)
    # Two wrong names from this address, then a right login
    assert [_attempt(client, n, "x") for n in ("admin", "root")] == [401, 401]
    assert _attempt(client, "vera", PASSWORDS["vera"]) == 303
    # The address still has its two failures: one more is checked, then it waits
    assert _attempt(client, "oracle", "x") == 401
    assert _attempt(client, "test", "x") == 429


def test_someone_elses_failures_delay_a_user_they_never_lock_them_out(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given an attacker who spent otto's allowance from their own address
    attacker = make_client(client_address="198.51.100.66", login_max_failures=2,
                           login_backoff_s=60)
    assert [_attempt(attacker, "otto", "x") for _ in range(4)] == [401, 401, 429, 429]
    # Then otto, from his own address, waits too (the name is what is guessed) ...
    otto = make_client(client_address="192.0.2.20", login_max_failures=2, login_backoff_s=60)
    assert _attempt(otto, "otto", PASSWORDS["otto"]) == 429
    # ... but the attacker's refused attempts did not lengthen the wait, and once it has
    # passed otto logs in
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE login_attempts SET next_allowed_at = now() "
                          "WHERE key_hash = :k"), {"k": key_hash("user", "otto")})
    assert _attempt(otto, "otto", PASSWORDS["otto"]) == 303


def _wait_s(engine: Engine, key: str) -> float:
    with engine.connect() as conn:
        return float(conn.execute(text(
            "SELECT EXTRACT(EPOCH FROM next_allowed_at - last_at) FROM login_attempts "
            "WHERE key_hash = :k"), {"k": key}).scalar_one())


def _let_wait_pass(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE login_attempts SET next_allowed_at = now(), "
                          "last_at = last_at - (next_allowed_at - now())"))


def test_each_failure_past_the_limit_doubles_the_wait_up_to_the_cap(
        clean_ledger: Engine) -> None:
    limits = LoginLimits(clean_ledger, max_failures=2, window_s=300, base_s=1, cap_s=5)
    user = key_hash("user", "otto")
    assert limits.admit("otto", "192.0.2.1").allowed
    assert _wait_s(clean_ledger, user) == 0
    waits = []
    for _ in range(5):
        assert limits.admit("otto", "192.0.2.1").allowed
        waits.append(_wait_s(clean_ledger, user))
        refused = limits.admit("otto", "192.0.2.1")
        assert not refused.allowed and 0 < refused.retry_after_s <= waits[-1]
        _let_wait_pass(clean_ledger)
    assert waits == [1, 2, 4, 5, 5]


def test_failures_are_forgotten_a_window_after_the_last_wait(clean_ledger: Engine) -> None:
    limits = LoginLimits(clean_ledger, max_failures=1, window_s=60, base_s=1, cap_s=5)
    assert limits.admit("otto", "192.0.2.1").allowed
    assert not limits.admit("otto", "192.0.2.1").allowed
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE login_attempts SET next_allowed_at = now() - "
                          "interval '61 seconds'"))
    assert limits.admit("otto", "192.0.2.1").allowed
    assert _wait_s(clean_ledger, key_hash("user", "otto")) == 1, "counted from one again"
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE login_attempts SET next_allowed_at = now() - "
                          "interval '61 seconds'"))
    assert limits.prune() == 2
    # A success anywhere forgets stale counters too
    limits.admit("ana", "192.0.2.2")
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE login_attempts SET next_allowed_at = now() - "
                          "interval '61 seconds'"))
    limits.admit("bob", "192.0.2.3")
    limits.succeeded("bob", "192.0.2.3")
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM login_attempts")).scalar_one() == 1


def test_any_bytes_in_a_name_are_counted_under_a_bounded_key(clean_ledger: Engine) -> None:
    limits = LoginLimits(clean_ledger, max_failures=1, window_s=60, base_s=60, cap_s=60)
    for name in ("ev\x00il", "a" * 100_000, "\udcff"):
        assert limits.admit(name, f"192.0.2.{len(name) % 200}").allowed
        assert not limits.admit(name, "192.0.2.250").allowed
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT max(length(key_hash)) FROM login_attempts")) \
            .scalar_one() == 64
