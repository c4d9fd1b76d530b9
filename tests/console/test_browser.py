"""The console in a real headless Chromium (the system's ``chromium``, driven by Playwright),
against a real worker, broker, ledger and sandbox: the support engineer's whole story.

Screenshots go to the test's directory, or to docs/screenshots/ (which docs/console.md shows) with
``COUPONS_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import Engine, text

from coupon_devtools.sandbox.admin import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import REPO_ROOT, WorkerProcess
from tests.console.conftest import PASSWORDS
from worker.config import Settings
from worker.entrypoints.console.app import create_app
from worker.entrypoints.console.config import ConsoleSettings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.slow


@pytest.fixture
def shots_dir(tmp_path: Path) -> Path:
    if os.environ.get("COUPONS_UPDATE_SCREENSHOTS") == "1":
        return REPO_ROOT / "docs" / "screenshots"
    return tmp_path / "screenshots"


@pytest.fixture
def console_url(settings: Settings, clean_ledger: Engine,
                console_settings: Callable[..., ConsoleSettings]) -> Iterator[str]:
    """The real console app (real support services: retries go to the test broker), served by
    uvicorn in a thread on a port of its own."""
    app = create_app(settings, console_settings(), engine=clean_ledger)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    # Fails rather than skips: CI installs it (.ci/run), and a skipped test proves nothing.
    assert Path(CHROMIUM).exists(), "needs the system's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        # The distribution's Chromium; Playwright never downloads a browser here.
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def shot(shots_dir: Path) -> Callable[[object, str], None]:
    def take(page: object, name: str) -> None:
        shots_dir.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots_dir / f"{name}.png"),  # type: ignore[attr-defined]
                        full_page=True)

    return take


def log_in(page: object, url: str, name: str) -> None:
    page.goto(f"{url}/login")  # type: ignore[attr-defined]
    page.fill("input[name=username]", name)  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORDS[name])  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/")  # type: ignore[attr-defined]


def test_find_a_dead_lettered_customer_and_replay_its_group_in_the_browser(
        settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
        start_worker: Callable[..., WorkerProcess], console_url: str, browser: object,
        shot: Callable[[object, str], None]) -> None:
    # Given a series that had expired: three customers' coupons of it are dead (712)
    sandbox.set_series(700712, behaviour="expired")
    start_worker(settings)
    customers = ["566881933", "566881934", "566881935"]
    for c in customers:
        publish(settings, example_event(f"gold-{c}", series=(544770, 700712), customer=c))
    for c in customers:
        wait_for_state(clean_ledger, f"gold-{c}", "failed", timeout_s=60)
    sandbox.set_series(700712, behaviour="valid")  # the loyalty team renewed the series

    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    log_in(page, console_url, "otto")
    # the worker declared its queues: the overview reads their backlogs from the broker
    assert "?" not in page.inner_text("table.backlogs")
    shot(page, "overview")
    page.click("nav >> text=Dead letters")
    assert page.locator("tr.group").count() == 1  # one cause: 712 x 700712 x its message
    shot(page, "dead-letters")
    # When support finds the customer and opens the group of its dead letter
    page.click("nav >> text=Customer")
    page.fill("input[name=q]", "566881933")
    page.press("input[name=q]", "Enter")
    page.wait_for_url("**/customer?q=566881933")
    assert page.locator(".event").count() == 1
    # each attempt links to its task in Flower (the worker records its Celery task id)
    assert page.locator("a.flower-task").count() >= 2
    assert page.locator("a.flower-task").first.get_attribute("href").startswith(  # type: ignore[union-attr]
        "http://flower.test/task/")
    assert "series expired" in page.inner_text(".event").lower() or "712" in page.inner_text(
        ".event")
    shot(page, "customer")
    page.click("text=its group")
    assert page.locator("table tr").count() == 1 + len(customers)
    shot(page, "dead-letter-group")
    # dry run
    page.click("#replay-group")
    assert page.inner_text("#plan-total") == "3" and page.inner_text("#plan-send") == "3"
    assert page.inner_text("#plan-issued") == "0"
    shot(page, "replay-dry-run")
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM replay_jobs")).scalar_one() == 0
    # confirm at a set velocity; the worker's sweeper runs the job
    page.fill("input[name=reason]", "series 700712 renewed, ticket SUP-42")
    page.fill("input[name=velocity]", "120")
    page.click("button[type=submit]")
    page.wait_for_url(f"{console_url}/jobs/*")
    page.wait_for_selector("#job-state:text('done')", timeout=60_000)

    def all_issued() -> bool:
        with clean_ledger.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM entities WHERE series_id = 700712 AND state = 'issued'"
            )).scalar_one() == len(customers)

    from tests.conftest import wait_until

    wait_until(all_issued, timeout_s=60, message="the replayed entities to be issued")
    page.reload()
    assert page.inner_text("#job-progress") == "3 / 3"
    shot(page, "replay-job-done")
    # Then the sandbox's ground truth: each entity issued exactly once
    for c in customers:
        truth = sandbox.ledger(customer=c)
        assert sorted(coupon["seriesId"] for coupon in truth) == [544770, 700712], truth
    # And the audit page shows who acted
    page.goto(f"{console_url}/audit?operator=otto")
    assert "replay_job_started" in page.inner_text("table.audit")
    assert page.locator("td.who:text('otto')").count() >= 4
    shot(page, "audit")


def test_a_viewer_is_refused_every_action_and_a_post_needs_the_csrf_token(
        clean_ledger: Engine, console_url: str, browser: object,
        shot: Callable[[object, str], None]) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    log_in(page, console_url, "vera")
    response = page.goto(f"{console_url}/replay/plan?entity_id=1")
    assert response.status == 403
    assert "needs operator" in page.inner_text("main")
    shot(page, "viewer-forbidden")
    posted = page.request.post(f"{console_url}/dlq/discard",
                               form={"entity_id": "1", "reason": "x"})
    assert posted.status == 403
    # An operator without the token is refused too
    operator = browser.new_page()  # type: ignore[attr-defined]
    log_in(operator, console_url, "otto")
    forged = operator.request.post(f"{console_url}/dlq/discard",
                                   form={"entity_id": "1", "reason": "x"})
    assert forged.status == 403 and "CSRF" in forged.text()


def test_the_console_refuses_to_be_framed_and_styles_itself_without_inline_css(
    console_url: str, browser: object, shot: Callable[[object, str], None], tmp_path: Path,
) -> None:
    # Given another site that frames the console's login page (clickjacking)
    attacker = tmp_path / "attacker.html"
    attacker.write_text(f'<html><body><iframe id="victim" src="{console_url}/login" '
                        'width="800" height="400"></iframe></body></html>')
    page = browser.new_page()  # type: ignore[attr-defined]
    try:
        page.goto(attacker.as_uri())
        page.wait_for_timeout(1500)
        # Then Chromium shows nothing of it: the frame never gets the login form
        frame = page.frame_locator("#victim")
        assert frame.locator("input[name=username]").count() == 0
        # And the console itself renders styled under its strict policy (no CSP violation)
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        page.goto(f"{console_url}/login")
        color = page.eval_on_selector("body", "b => getComputedStyle(b).fontFamily")
        assert "system-ui" in color
        assert violations == []
        shot(page, "login")
    finally:
        page.close()
