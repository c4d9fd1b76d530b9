"""The support actions in a real headless Chromium (Playwright, Debian's ``chromium``): discard
by the ids of a dry run while new dead letters arrive, the Waiting view's "retry now", a
replay job's progress. Screenshots go to docs/screenshots/ with COUPONS_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect
from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from tests.console.conftest import seed_dead, seed_waiting
from tests.console.test_browser import (  # noqa: F401  (fixtures)
    browser,
    console_url,
    log_in,
    shot,
    shots_dir,
)
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.usecases.issue import utcnow
from worker.usecases.replay_jobs import step_replay_jobs
from worker.usecases.support import SupportDeps

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def states(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(i): s for i, s in conn.execute(text("SELECT id, state FROM entities"))}


def test_a_discard_confirmed_in_the_browser_touches_only_the_dry_runs_ids(
        clean_ledger: Engine, console_url: str, browser: object,  # noqa: F811
        shot: Callable[[object, str], None]) -> None:  # noqa: F811
    # Given two dead letters A, B of one cause
    a, b = seed_dead(clean_ledger, "gold-566881933", "566881933", [700712, 700713],
                     message="series expired")
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    log_in(page, console_url, "otto")
    page.goto(f"{console_url}/dlq/group?code=712")
    # When the operator opens the discard's dry run: it lists A and B, by id
    page.click("#discard-group")
    assert page.inner_text("#plan-total") == "2"
    assert page.locator("table.planned tr").count() == 3
    assert page.get_attribute("#confirm-ids", "value") == f"{a},{b}"
    page.fill("input[name=reason]", "series 700712 retired, ticket SUP-51")
    shot(page, "discard-dry-run")
    # and new dead letters of the same cause arrive before the confirmation
    late = seed_dead(clean_ledger, "gold-566881999", "566881999", [700712])
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Discarded')")
    shot(page, "discard-done")
    # Then only A and B are discarded; the late ones are still dead letters
    assert states(clean_ledger) == {a: "discarded", b: "discarded", late[0]: "dead"}
    assert page.locator("table tr").count() == 3


def test_the_waiting_view_shows_a_waiting_entity_and_retry_now_makes_it_due(
        clean_ledger: Engine, console_url: str, browser: object,  # noqa: F811
        shot: Callable[[object, str], None]) -> None:  # noqa: F811
    # Given one entity waiting an hour for a retry and one whose outcome is unknown
    waiting, = seed_waiting(clean_ledger, "points-566881933", "566881933", [544770],
                            code="http_503", message="503 Service Unavailable")
    unknown, = seed_waiting(clean_ledger, "tier-566881934", "566881934", [553379], in_s=90,
                            unknown=True, code="read_timeout",
                            message="no answer within 10 s: it may have been issued")
    page = browser.new_page(viewport={"width": 1280, "height": 700})  # type: ignore[attr-defined]
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    log_in(page, console_url, "otto")
    page.click("nav >> text=Waiting")
    row = page.locator(f"#waiting-{waiting}")
    assert "retry" in row.inner_text() and "in 59 min" in row.inner_text()
    assert "unknown outcome, settles" in page.locator(f"#waiting-{unknown}").inner_text()
    # the exact UTC moment on hover
    title = row.locator("td.next time").get_attribute("title")
    assert title is not None and title.endswith(" UTC")
    shot(page, "waiting")
    # When the operator ticks it and asks to retry it now
    page.check(f"input[name=id][value='{waiting}']")
    page.click("#retry-now")
    page.wait_for_selector("h1:text('Retry now')")
    assert "due now" in page.inner_text("main")
    # Then it is due at once (the sweeper dispatches it within a sweep); the other still waits
    with clean_ledger.connect() as conn:
        due = dict(conn.execute(text("SELECT id, next_attempt_at FROM entities")).all())
    assert due[waiting] <= datetime.now(UTC) < due[unknown]
    page.goto(f"{console_url}/waiting")
    assert "due" in page.locator(f"#waiting-{waiting} td.next").inner_text()
    assert violations == []  # styled by the style sheet alone, under the strict policy


def test_a_replay_job_shows_its_progress_and_rate(
        clean_ledger: Engine, console_url: str, browser: object,  # noqa: F811
        shot: Callable[[object, str], None]) -> None:  # noqa: F811
    ids = seed_dead(clean_ledger, "gold-566881940", "566881940", [700712, 700713, 700714])
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    log_in(page, console_url, "otto")
    page.goto(f"{console_url}/replay/plan?event=gold-566881940")
    assert page.get_attribute("#confirm-ids", "value") == ",".join(map(str, ids))
    page.fill("input[name=reason]", "series renewed, ticket SUP-52")
    page.fill("input[name=velocity]", "6")
    shot(page, "replay-dry-run")
    page.click("button[type=submit]")
    page.wait_for_url(f"{console_url}/jobs/*")
    # a worker's sweeper steps it: one item every ten seconds at 6 a minute (so that a step
    # made late on a busy machine still finds only one item due in its half second)
    support = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger),
                          publisher=FakePublisher(), clock=utcnow)
    assert step_replay_jobs(support, ReplayJobStore(clean_ledger), horizon_s=0.5) == 1
    # The page refreshes itself every second while the job runs: wait for that refresh rather
    # than reload by hand (a reload racing the page's own was aborted by the browser).
    expect(page.locator("#job-progress")).to_have_text("1 / 3", timeout=10_000)
    expect(page.locator("#job-rate")).to_contain_text("6 calls/min")
    expect(page.locator("main")).to_contain_text("2 to go, about 20 s")
    shot(page, "replay-job-progress")
