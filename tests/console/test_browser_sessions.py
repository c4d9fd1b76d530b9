"""Sessions and logins in a real headless Chromium (the system's ``chromium``, driven by
Playwright) against the console served by uvicorn on the real ledger: a cookie kept from before
logout is refused, concurrent wrong logins are limited, a user removed from the users file is
logged out on the next request."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import Engine

from tests.console.conftest import PASSWORDS, ROLES
from tests.console.test_browser import browser, log_in  # noqa: F401 (browser: a fixture)
from worker.config import Settings
from worker.entrypoints.console.app import create_app
from worker.entrypoints.console.auth import hash_password
from worker.entrypoints.console.config import ConsoleSettings

pytestmark = pytest.mark.browser



@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    """A users file of this test's own (the session's is shared)."""
    path = tmp_path / "users.json"
    write_users(path, ROLES)
    return path


def write_users(path: Path, roles: dict[str, str]) -> None:
    path.write_text(json.dumps({"users": [
        {"name": n, "role": r, "password_hash": hash_password(PASSWORDS[n])}
        for n, r in roles.items()]}))


@pytest.fixture
def serve(settings: Settings, clean_ledger: Engine,
          console_settings: Callable[..., ConsoleSettings]) -> Iterator[Callable[..., str]]:
    """Serve a console with the given settings in a thread: its base URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(**overrides: object) -> str:
        app = create_app(settings, console_settings(**overrides), engine=clean_ledger)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            thread.join(0.05)
        servers.append((server, thread, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_cookie_kept_from_before_logout_is_refused(
        serve: Callable[..., str], browser: object) -> None:  # noqa: F811
    url = serve()
    # Given an operator logged in, and another browser holding a copy of the cookies
    page = browser.new_page()  # type: ignore[attr-defined]
    log_in(page, url, "otto")
    kept = page.context.cookies()
    thief = browser.new_context().new_page()  # type: ignore[attr-defined]
    thief.context.add_cookies(kept)
    thief.goto(f"{url}/dlq")
    assert thief.url == f"{url}/dlq", "the copy works while the session lives"
    # When the operator logs out
    page.click("button:text('Log out')")
    page.wait_for_url(f"{url}/login")
    # Then the copy opens nothing: the page asks for a login
    thief.goto(f"{url}/dlq")
    assert thief.url.startswith(f"{url}/login")
    assert thief.locator("input[name=password]").count() == 1


def test_concurrent_wrong_logins_are_limited(
        serve: Callable[..., str], browser: object) -> None:  # noqa: F811
    url = serve(login_backoff_s=60)
    # The console's policy forbids scripts on its pages: the test's own fetches bypass it
    page = browser.new_context(bypass_csp=True).new_page()  # type: ignore[attr-defined]
    page.goto(f"{url}/login")
    token = page.input_value("input[name=csrf_token]")
    # When thirty wrong logins for otto are sent at once from the browser
    statuses = page.evaluate("""async ([token, n]) => {
        const tries = Array.from({length: n}, () => fetch("/login", {
            method: "POST", redirect: "manual",
            body: new URLSearchParams({username: "otto", password: "guess",
                                       csrf_token: token})}).then(r => r.status));
        return Promise.all(tries);
    }""", [token, 30])
    # Then five were checked, the rest held back
    assert Counter(statuses) == Counter({401: 5, 429: 25})
    # And the right password, typed now, waits too: the page says when to try again
    page.fill("input[name=username]", "otto")
    page.fill("input[name=password]", PASSWORDS["otto"])
    page.click("button[type=submit]")
    assert "try again in" in page.inner_text("main")
    assert page.url.startswith(f"{url}/login")


def test_a_user_removed_from_the_file_is_logged_out_on_the_next_request(
        serve: Callable[..., str], browser: object, users_path: Path) -> None:  # noqa: F811
    url = serve(users=str(users_path), users_check_s=0)
    page = browser.new_page()  # type: ignore[attr-defined]
    log_in(page, url, "vera")
    page.goto(f"{url}/dlq")
    assert "vera (viewer)" in page.inner_text("body")
    # When vera is removed from the users file (no restart)
    write_users(users_path, {n: r for n, r in ROLES.items() if n != "vera"})
    # Then her next request asks for a login, and she cannot log in again
    page.reload()
    assert page.url.startswith(f"{url}/login")
    page.fill("input[name=username]", "vera")
    page.fill("input[name=password]", PASSWORDS["vera"])
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.inner_text("main")
