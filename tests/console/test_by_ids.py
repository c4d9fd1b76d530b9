"""Destructive actions by explicit ids: the dry run lists the entities, the confirmation posts
their ids, and only those are touched, whatever arrives in between."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from tests.console.conftest import login, planned_ids, seed_dead
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.plans import SqlActionPlans
from worker.adapters.postgres.support import Selection
from worker.domain.errors import SelectionRefused
from worker.usecases.action_plans import MAX_IDS, parse_ids, plan_action


def states(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {int(i): s for i, s in conn.execute(text("SELECT id, state FROM entities"))}


def test_a_discard_confirmed_for_a_and_b_touches_only_a_and_b_after_new_dead_letters_arrive(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    # Given two dead letters of a group, and the dry run of discarding the group
    a, b = seed_dead(clean_ledger, "ev-ab", "21", [700712, 700713])
    client = make_client()
    token = login(client, "otto")
    plan = client.get("/dlq/discard/plan?code=712")
    assert plan.status_code == 200
    assert [int(i) for i in planned_ids(plan.text).split(",")] == [a, b]
    assert f"/entities/{a}" in plan.text and f"/entities/{b}" in plan.text
    # When a new dead letter matching the same filter arrives before the confirmation
    late, = seed_dead(clean_ledger, "ev-late", "22", [700712])
    done = client.post("/dlq/discard", data={"ids": planned_ids(plan.text),
                                             "code": "712", "reason": "series retired",
                                             "csrf_token": token})
    # Then only A and B are discarded; the late one is still dead, and audited nowhere
    assert done.status_code == 200
    assert states(clean_ledger) == {a: "discarded", b: "discarded", late: "dead"}
    with clean_ledger.connect() as conn:
        audited = sorted(conn.execute(text(
            "SELECT entity_id FROM operator_actions WHERE action = 'discard'")).scalars())
    assert audited == [a, b]


def test_a_replay_job_covers_only_the_ids_of_its_dry_run(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    first, = seed_dead(clean_ledger, "ev-r1", "23", [700712])
    client = make_client()
    token = login(client, "otto")
    plan = client.get("/replay/plan?code=712").text
    assert planned_ids(plan) == str(first)
    seed_dead(clean_ledger, "ev-r2", "24", [700712])  # arrives after the dry run
    started = client.post("/replay/start", data={"ids": planned_ids(plan), "code": "712",
                                                 "reason": "renewed", "velocity": "60",
                                                 "csrf_token": token})
    assert started.status_code == 303
    job_id = int(started.headers["location"].rsplit("/", 1)[1])
    items = ReplayJobStore(clean_ledger).items(job_id)
    assert [i["entity_id"] for i in items] == [first]
    job = ReplayJobStore(clean_ledger).get(job_id)
    assert job is not None and job["total"] == 1 and job["selection"]["error_code"] == "712"


def test_a_confirmation_without_ids_or_with_too_many_is_refused_and_touches_nothing(
        make_client: Callable[..., TestClient], clean_ledger: Engine,
        publisher: FakePublisher) -> None:
    a, = seed_dead(clean_ledger, "ev-n", "25", [700712])
    client = make_client()
    token = login(client, "otto")
    # A filter alone no longer discards: it is a dry run's business
    blind = client.post("/dlq/discard", data={"code": "712", "reason": "r", "csrf_token": token})
    assert blind.status_code == 400 and "dry run" in blind.text
    too_many = ",".join(str(i) for i in range(1, MAX_IDS + 2))
    refused = client.post("/dlq/discard", data={"ids": too_many, "reason": "r",
                                                "csrf_token": token})
    assert refused.status_code == 400 and "narrow the filter" in refused.text
    replay = client.post("/replay/start", data={"ids": too_many, "reason": "r",
                                                "velocity": "60", "csrf_token": token})
    assert replay.status_code == 400 and "narrow the filter" in replay.text
    garbage = client.post("/dlq/discard", data={"ids": f"{a},1; DROP", "reason": "r",
                                                "csrf_token": token})
    assert garbage.status_code == 400 and "not an entity id" in garbage.text
    assert states(clean_ledger) == {a: "dead"} and publisher.retries == []


@pytest.mark.parametrize("path", ["/dlq/discard/plan?since=yesterday",
                                  "/dlq/discard/plan?code=712&series=seven",
                                  "/replay/plan?until=2026-13-45"])
def test_a_dry_run_with_a_bad_filter_value_is_a_400_naming_it(
        make_client: Callable[..., TestClient], path: str) -> None:
    client = make_client()
    login(client, "otto")
    response = client.get(path)
    assert response.status_code == 400
    assert any(name in response.text for name in ("since:", "series:", "until:"))


def test_a_dry_run_over_the_bound_is_refused_without_loading_the_matches(
        clean_ledger: Engine) -> None:
    # Given three dead letters and a bound of two (the console's is MAX_IDS)
    for n in range(3):
        seed_dead(clean_ledger, f"ev-b{n}", str(30 + n), [700712])
    plans = SqlActionPlans(clean_ledger)
    # Then the dry run counts first and refuses, asking to narrow the filter
    with pytest.raises(SelectionRefused, match=r"3 entities match.*narrow the filter"):
        plan_action(Selection(error_code="712"), plans, limit=2)
    assert plan_action(Selection(error_code="712"), plans, limit=3).total == 3


def test_ids_are_read_strictly() -> None:
    assert parse_ids("3, 1 2,3") == (3, 1, 2)
    for bad in ("", " , ", "1,-2", "1e3", "9" * 20):
        with pytest.raises(SelectionRefused):
            parse_ids(bad)
    with pytest.raises(SelectionRefused, match="narrow"):
        parse_ids(" ".join(["1"] * 3), limit=2)
