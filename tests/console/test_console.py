"""The console over HTTP (Starlette's TestClient) on a real ledger: login, roles, CSRF, the
customer story, dead-letter groups, replay jobs stepped as a worker's sweeper would, audit."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from tests.conftest import wait_until
from tests.console.conftest import PASSWORDS, csrf_of, login, planned_ids, seed_dead
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.usecases.issue import utcnow
from worker.usecases.replay_jobs import step_replay_jobs
from worker.usecases.support import SupportDeps


def audit_rows(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(text(
            "SELECT action, operator, outcome FROM operator_actions ORDER BY id"))]


def test_pages_need_a_login_and_the_session_cookie_is_strict(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    response = client.get("/dlq")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/dlq"
    login(client, "vera")
    cookie = client.cookies.jar
    set_cookie = [c for c in cookie if c.name == "coupon_console"]
    assert set_cookie, "no session cookie"
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": "vera", "password": PASSWORDS["vera"],
                                           "csrf_token": token})
    header = response.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header


def test_wrong_passwords_are_refused_audited_then_rate_limited(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    client = make_client(login_max_failures=3, login_backoff_s=60)
    token = csrf_of(client.get("/login").text)
    codes = [client.post("/login", data={"username": "otto", "password": "nope",
                                         "csrf_token": token}).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    # Held back even with the right password, until the wait passes.
    right = client.post("/login", data={"username": "otto", "password": PASSWORDS["otto"],
                                        "csrf_token": token})
    assert right.status_code == 429
    outcomes = [o for a, who, o in audit_rows(clean_ledger) if a == "console_login"]
    assert outcomes[:3] == ["refused"] * 3 and outcomes[-1].startswith("blocked")


def test_a_login_without_the_csrf_token_is_refused(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    client.get("/login")
    response = client.post("/login", data={"username": "ada", "password": PASSWORDS["ada"]})
    assert response.status_code == 403


def test_a_viewer_reads_but_gets_403_on_every_action(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    dead = seed_dead(clean_ledger, "ev-v", "111", [700712])
    client = make_client()
    token = login(client, "vera")
    assert client.get("/dlq").status_code == 200
    assert client.get("/customer?q=111").status_code == 200
    actions = [
        client.get(f"/replay/plan?entity_id={dead[0]}"),
        client.post("/replay/start", data={"entity_id": str(dead[0]), "reason": "x",
                                           "velocity": "60", "csrf_token": token}),
        client.post("/dlq/discard", data={"entity_id": str(dead[0]), "reason": "x",
                                          "csrf_token": token}),
        client.post("/jobs/1/cancel", data={"csrf_token": token}),
        client.post("/rejected/1/resubmit", data={"payload": "{}", "reason": "x",
                                                  "csrf_token": token}),
        client.get("/audit?format=csv"),
    ]
    assert [r.status_code for r in actions] == [403] * len(actions)
    assert publisher.retries == []
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT state FROM entities")).scalar_one() == "dead"


def test_a_post_without_the_csrf_token_is_refused(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    dead = seed_dead(clean_ledger, "ev-c", "222", [700712])
    client = make_client()
    login(client, "otto")
    response = client.post("/dlq/discard", data={"entity_id": str(dead[0]), "reason": "x"})
    assert response.status_code == 403
    wrong = client.post("/dlq/discard", data={"entity_id": str(dead[0]), "reason": "x",
                                              "csrf_token": "forged"})
    assert wrong.status_code == 403
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT state FROM entities")).scalar_one() == "dead"


def test_customer_page_shows_events_entities_and_the_timeline(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    task = "0b7c4f6e-1d2a-4c8e-9f3b-5a6d7e8f9a0b"
    seed_dead(clean_ledger, "ev-cust", "566881933", [544770, 553379],
              worker=f"host:1/task:{task}")
    client = make_client()
    login(client, "vera")
    page = client.get("/customer?q=566881933").text
    assert "ev-cust" in page and "544770" in page and "553379" in page
    assert "series expired" in page and f"http://flower.test/task/{task}" in page
    assert "no event" not in client.get("/customer?q=nobody").text.lower()


def test_replay_a_group_as_a_job_that_the_sweeper_steps_to_done(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    # Given two dead letter groups
    group = seed_dead(clean_ledger, "ev-g1", "1", [700712]) + \
        seed_dead(clean_ledger, "ev-g2", "2", [700712])
    other = seed_dead(clean_ledger, "ev-o", "3", [544770], code="701", message="not found")
    client = make_client()
    token = login(client, "otto")
    dlq = client.get("/dlq").text
    assert "700712" in dlq and "series expired" in dlq
    # When the operator dry-runs and confirms a replay of the 712 group
    plan = client.get("/replay/plan?code=712&series=700712&message=series+expired")
    assert plan.status_code == 200
    assert 'id="plan-total">2<' in plan.text and 'id="plan-send">2<' in plan.text
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM replay_jobs")).scalar_one() == 0
    started = client.post("/replay/start", data={
        "ids": planned_ids(plan.text), "code": "712", "series": "700712",
        "message": "series expired", "reason": "renewed", "velocity": "600",
        "csrf_token": token})
    assert started.status_code == 303
    job_url = started.headers["location"]
    # Then a worker's sweeper runs it: the job survives the console (another app, same ledger)
    store = ReplayJobStore(clean_ledger)
    support = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,
                          clock=utcnow)
    job_id = int(job_url.rsplit("/", 1)[1])
    def stepped_to_done() -> bool:
        step_replay_jobs(support, store)
        found = store.get(job_id)
        return found is not None and found["state"] == "done"

    wait_until(stepped_to_done, timeout_s=10, message="the job to be done")
    job = store.get(job_id)
    assert job is not None and job["state"] == "done"
    assert sorted(publisher.retries) == sorted(group)
    with clean_ledger.connect() as conn:
        states = dict(conn.execute(text("SELECT id, state FROM entities")).all())
    assert {states[i] for i in group} == {"queued"} and states[other[0]] == "dead"
    # The job is the ledger's: a console started afresh shows it as it is
    restarted = make_client()
    login(restarted, "vera")
    page = restarted.get(job_url).text
    assert "done" in page and "requeued" in page and "2 / 2" in page
    # And the audit names the logged-in operator, with where they acted from
    actions = audit_rows(clean_ledger)
    assert ("replay_job_started", "otto") in [(a, w) for a, w, _ in actions]
    assert [w for a, w, _ in actions if a == "replay"] == ["otto", "otto"]
    audit_page = client.get("/audit?operator=otto").text
    assert "replay_job_started" in audit_page and "console" in audit_page
    csv = client.get("/audit?format=csv")
    assert csv.status_code == 200 and "replay_job_started" in csv.text


def test_a_job_can_be_paused_and_cancelled(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    ids = seed_dead(clean_ledger, "ev-p", "4", [1, 2, 3])
    client = make_client()
    token = login(client, "otto")
    plan = client.get("/replay/plan?event=ev-p").text
    started = client.post("/replay/start", data={"ids": planned_ids(plan), "event": "ev-p",
                                                 "reason": "r", "velocity": "1",
                                                 "csrf_token": token})
    job_id = int(started.headers["location"].rsplit("/", 1)[1])
    store = ReplayJobStore(clean_ledger)
    support = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,
                          clock=utcnow)
    assert step_replay_jobs(support, store) == 1
    assert step_replay_jobs(support, store) == 0  # one a minute: the next is not due
    client.post(f"/jobs/{job_id}/pause", data={"csrf_token": token})
    assert store.get(job_id)["state"] == "paused"  # type: ignore[index]
    client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    job = store.get(job_id)
    assert job is not None and job["state"] == "cancelled"
    assert job["counts"] == {"pending": 0, "done": 1, "cancelled": 2}
    assert len(publisher.retries) == 1 and publisher.retries[0] in ids


def test_proxy_header_identity_only_from_a_trusted_address(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(proxy_user_header="X-Forwarded-User", trusted_proxies="10.0.0.5",
                         client_address="10.0.0.5")
    page = client.get("/dlq", headers={"X-Forwarded-User": "ada"})
    assert page.status_code == 200 and "ada (admin)" in page.text
    stranger = client.get("/dlq", headers={"X-Forwarded-User": "sso-user"})
    assert "sso-user (viewer)" in stranger.text
    untrusted = make_client(proxy_user_header="X-Forwarded-User", trusted_proxies="10.0.0.5",
                            client_address="10.0.0.6")
    assert untrusted.get("/dlq", headers={"X-Forwarded-User": "ada"}).status_code == 303


def test_a_rejected_event_is_edited_and_resubmitted_the_original_kept(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    # Given a message rejected for a bad series id
    bad = b'{"eventId": "fix-1", "customer": {"id": "7"}, "seriesIds": ["x"]}'
    with sql_unit_of_work_factory(clean_ledger)() as u:
        rejected_id = u.ledger.record_rejection(raw=bad, reason="seriesIds: bad", source="bus",
                                                event_id="fix-1", content_type=None,
                                                now=utcnow())
        u.commit()
    client = make_client()
    token = login(client, "otto")
    page = client.get(f"/rejected/{rejected_id}").text
    assert "seriesIds: bad" in page and ('&#34;x&#34;' in page or '&quot;x&quot;' in page)
    # When support fixes the payload and resubmits it
    fixed = '{"eventId": "fix-1", "customer": {"id": "7"}, "seriesIds": [544770]}'
    still_bad = client.post(f"/rejected/{rejected_id}/resubmit", data={
        "payload": '{"eventId": "fix-1"}', "reason": "SUP-7", "csrf_token": token})
    assert "refused" in still_bad.text and publisher.events == []
    done = client.post(f"/rejected/{rejected_id}/resubmit", data={
        "payload": fixed, "reason": "SUP-7", "csrf_token": token})
    # Then it goes through the normal intake once; the original bytes are kept
    assert "resubmitted as event fix-1" in done.text
    assert [source for _, source in publisher.events] == ["resubmit"]
    with clean_ledger.connect() as conn:
        raw, linked = conn.execute(text(
            "SELECT raw, resubmitted_event_id FROM rejected_events")).one()
    assert bytes(raw) == bad and linked == "fix-1"
    assert ("rejected_resubmit", "otto") in [(a, w) for a, w, _ in audit_rows(clean_ledger)]


def test_discard_a_group_with_a_reason(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    ids = seed_dead(clean_ledger, "ev-d", "8", [1, 2])
    client = make_client()
    token = login(client, "ada")
    plan = client.get("/dlq/discard/plan?code=712").text
    assert sorted(int(i) for i in planned_ids(plan).split(",")) == sorted(ids)
    refused = client.post("/dlq/discard", data={"ids": planned_ids(plan), "csrf_token": token})
    assert refused.status_code == 400
    done = client.post("/dlq/discard", data={"ids": planned_ids(plan),
                                             "reason": "series retired", "csrf_token": token})
    assert done.status_code == 200 and done.text.count("discarded") >= 2
    with clean_ledger.connect() as conn:
        assert set(conn.execute(text("SELECT state FROM entities")).scalars()) == {"discarded"}
    assert [(a, w) for a, w, _ in audit_rows(clean_ledger) if a == "discard"] == \
        [("discard", "ada")] * len(ids)


def test_overview_counts_and_chart(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    seed_dead(clean_ledger, "ev-o1", "9", [1, 2])
    client = make_client()
    login(client, "vera")
    page = client.get("/").text
    assert "<svg" in page and "polyline" in page
    assert 'dead</span><b>2</b>' in page
    assert "calls to Capillary in the last minute" in page
    assert 'class="backlogs"' in page  # the test's queues may not exist: counts read "?"


def test_a_job_never_replays_what_was_issued_meanwhile(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    # Given a confirmed job over two dead entities
    first, second = seed_dead(clean_ledger, "ev-m", "10", [1, 2])
    client = make_client()
    token = login(client, "otto")
    plan = client.get("/replay/plan?event=ev-m").text
    started = client.post("/replay/start", data={"ids": planned_ids(plan), "reason": "r",
                                                 "velocity": "6000", "csrf_token": token})
    job_id = int(started.headers["location"].rsplit("/", 1)[1])
    # When one of them is issued by other means before the job reaches it
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'issued' WHERE id = :id"), {"id": first})
    store = ReplayJobStore(clean_ledger)
    support = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,
                          clock=utcnow)

    def stepped_to_done() -> bool:
        step_replay_jobs(support, store)
        found = store.get(job_id)
        return found is not None and found["state"] == "done"

    wait_until(stepped_to_done, timeout_s=10, message="the job to be done")
    # Then it is skipped, and only the other one is sent again
    outcomes = {i["entity_id"]: i["outcome"] for i in store.items(job_id)}
    assert outcomes == {first: "skipped: now issued", second: "requeued"}
    assert publisher.retries == [second]


def test_a_filter_selects_what_the_dry_run_and_the_job_cover(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    mine = seed_dead(clean_ledger, "ev-f1", "11", [1])
    seed_dead(clean_ledger, "ev-f2", "12", [1])
    client = make_client()
    token = login(client, "otto")
    listed = client.get("/dlq/group?customer=id:11&since=2000-01-01T00:00")
    assert "ev-f1" in listed.text and "ev-f2" not in listed.text
    plan = client.get("/replay/plan?customer=id:11&since=2000-01-01T00:00")
    assert 'id="plan-total">1<' in plan.text
    assert 'name="since" value="2000-01-01T00:00:00+00:00"' in plan.text
    started = client.post("/replay/start", data={
        "ids": planned_ids(plan.text), "customer": "id:11",
        "since": "2000-01-01T00:00:00+00:00", "reason": "r", "velocity": "60",
        "csrf_token": token})
    job_id = int(started.headers["location"].rsplit("/", 1)[1])
    assert [i["entity_id"] for i in ReplayJobStore(clean_ledger).items(job_id)] == mine


def test_an_entity_page_offers_replay_and_discard_to_an_operator_only(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    dead, = seed_dead(clean_ledger, "ev-e", "13", [1])
    operator = make_client()
    login(operator, "otto")
    page = operator.get(f"/entities/{dead}").text
    assert f"/replay/plan?entity_id={dead}" in page
    assert f"/dlq/discard/plan?entity_id={dead}" in page
    viewer = make_client()
    login(viewer, "vera")
    page = viewer.get(f"/entities/{dead}").text
    assert "/replay/plan" not in page and "/dlq/discard" not in page
    assert viewer.get(f"/dlq/discard/plan?entity_id={dead}").status_code == 403
    assert viewer.get("/entities/999999").status_code == 404


def test_a_coupons_warnings_and_a_codes_meaning_are_shown(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    from datetime import UTC, datetime

    from worker.adapters.postgres.records import Transition
    from worker.domain.events import parse_event_data
    from worker.domain.model import Coupon, EntityState

    # Given a coupon issued with a warning, beside a dead entity refused with 5002
    uow = sql_unit_of_work_factory(clean_ledger)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": "ev-w", "customer": {"id": "77"},
                                          "seriesIds": [1, 2]}), source="bus", now=now)
        claim = u.ledger.claim_event("ev-w", token="t", worker="w", now=now, lease_s=60,
                                     settle_window_s=120)
        issued, dead = claim.entities
        u.ledger.record(claim, calls=[], worker="w", now=now, transitions=[
            Transition(issued.entity_id, EntityState.ISSUED, "issued", 1,
                       coupon=Coupon("WARNED0001", 1, warnings=("expiry capped",)),
                       recorded_via="issue"),
            Transition(dead.entity_id, EntityState.DEAD, "dead", 1, error_code="5002",
                       error_message="Max coupons per user exceeded", dead_reason="refused")])
        u.commit()
    client = make_client()
    login(client, "vera")
    # Then the entity page and the customer page show the warning with the coupon
    assert "Capillary warned: expiry capped" in client.get(f"/entities/{issued.entity_id}").text
    customer = client.get("/customer?q=77").text
    assert "Capillary warned: expiry capped" in customer
    # And the code's meaning, from the domain's one table, where a code is shown
    assert "5002 max coupons per user" in customer
    assert "5002 max coupons per user" in client.get("/dlq").text
