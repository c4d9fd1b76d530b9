"""The Waiting view: what waits for a retry or for an unknown outcome to settle, and why; an
operator makes it due now or gives up on it (a dead letter), audited."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from tests.console.conftest import login, seed_dead, seed_waiting
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.usecases.issue import utcnow
from worker.usecases.support import SupportDeps
from worker.usecases.waiting import give_up, retry_now


def entity(engine: Engine, entity_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT state, next_attempt_at, dead_reason, dead_published_at FROM entities "
            "WHERE id = :id"), {"id": entity_id}).mappings().one())


def audits(engine: Engine) -> list[tuple[str, str, int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(  # type: ignore[misc]
            "SELECT action, operator, entity_id, outcome FROM operator_actions "
            "WHERE action IN ('retry_now', 'give_up') ORDER BY id"))]


def test_the_waiting_view_shows_retries_and_unknown_outcomes_with_why_and_when(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    retry, = seed_waiting(clean_ledger, "ev-w1", "41", [700712], in_s=600)
    unknown, = seed_waiting(clean_ledger, "ev-w2", "42", [700712], in_s=120, unknown=True)
    seed_dead(clean_ledger, "ev-w3", "43", [700712])  # dead: not waiting
    client = make_client()
    login(client, "vera")
    page = client.get("/waiting")
    assert page.status_code == 200
    html = page.text
    assert f'id="waiting-{retry}"' in html and f'id="waiting-{unknown}"' in html
    assert "ev-w3" not in html
    assert 'id="count-retry">1<' in html and 'id="count-unknown">1<' in html
    # why: the last error and its meaning; when: since, next attempt, when it settles
    assert "read_timeout" in html and "no answer within 10 s" in html
    assert "unknown outcome, settles" in html
    assert "in 9 min" in html or "in 10 min" in html  # the retry's next attempt
    # every moment a <time> with the exact UTC instant on hover; no microseconds anywhere
    assert '<time datetime="' in html and " UTC\">" in html
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", html)
    # the soonest due first; a viewer gets no buttons
    assert html.index(f'id="waiting-{unknown}"') < html.index(f'id="waiting-{retry}"')
    assert 'id="retry-now"' not in html
    only_unknown = client.get("/waiting?kind=unknown_outcome").text
    assert f'id="waiting-{unknown}"' in only_unknown and f'id="waiting-{retry}"' not in only_unknown
    assert client.get("/waiting?kind=everything").status_code == 400


def test_retry_now_makes_a_waiting_entity_due_at_once_audited(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    first, second = seed_waiting(clean_ledger, "ev-rn", "44", [1, 2], in_s=3600)
    client = make_client()
    token = login(client, "otto")
    assert 'id="retry-now"' in client.get("/waiting").text
    done = client.post("/waiting/retry", data={"id": [str(first)], "csrf_token": token})
    assert done.status_code == 200 and "due now" in done.text
    assert entity(clean_ledger, first)["next_attempt_at"] <= datetime.now(UTC)  # type: ignore[operator]
    assert entity(clean_ledger, second)["next_attempt_at"] > datetime.now(UTC)  # type: ignore[operator]
    assert entity(clean_ledger, first)["state"] == "retry_wait"  # the sweeper dispatches it
    assert audits(clean_ledger) == [("retry_now", "otto", first, "due now")]


def test_give_up_makes_a_dead_letter_with_a_clear_reason_and_needs_one(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    waiting, = seed_waiting(clean_ledger, "ev-gu", "45", [1], unknown=True)
    client = make_client()
    token = login(client, "otto")
    refused = client.post("/waiting/give-up", data={"id": [str(waiting)], "csrf_token": token})
    assert refused.status_code == 400 and entity(clean_ledger, waiting)["state"] == "retry_wait"
    done = client.post("/waiting/give-up", data={"id": [str(waiting)], "csrf_token": token,
                                                 "reason": "customer left, SUP-9"})
    assert done.status_code == 200 and "dead (given up)" in done.text
    found = entity(clean_ledger, waiting)
    assert found["state"] == "dead" and found["next_attempt_at"] is None
    assert found["dead_reason"] == "given up by otto: customer left, SUP-9"
    assert found["dead_published_at"] is None  # the sweeper announces it as a dead letter
    # it is a dead letter like any other: listed, replayable
    assert f"/replay/plan?entity_id={waiting}" in client.get(
        "/dlq/group?code=read_timeout&series=1").text
    assert "given up by otto: customer left" in client.get(f"/entities/{waiting}").text
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT state FROM events WHERE event_id = 'ev-gu'")
                            ).scalar_one() == "failed"
    assert audits(clean_ledger) == [("give_up", "otto", waiting, "dead (given up)")]


def test_a_viewer_may_not_retry_or_give_up(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    waiting, = seed_waiting(clean_ledger, "ev-wv", "46", [1])
    client = make_client()
    token = login(client, "vera")
    for path in ("/waiting/retry", "/waiting/give-up"):
        response = client.post(path, data={"id": [str(waiting)], "reason": "r",
                                           "csrf_token": token})
        assert response.status_code == 403
    assert entity(clean_ledger, waiting)["state"] == "retry_wait" and audits(clean_ledger) == []


def test_what_moved_on_meanwhile_is_skipped(
        clean_ledger: Engine, publisher: FakePublisher) -> None:
    dead, = seed_dead(clean_ledger, "ev-mv", "47", [1])
    deps = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,
                       clock=utcnow)
    assert [r.outcome for r in retry_now([dead], operator="ana", deps=deps)] == \
        ["skipped: now dead"]
    assert [r.outcome for r in give_up([dead], reason="r", operator="ana", deps=deps)] == \
        ["skipped: now dead"]
    assert entity(clean_ledger, dead)["state"] == "dead"
