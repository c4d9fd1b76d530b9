"""Retention on a real ledger holding rows of every state: what goes, what stays, and that a
pruned event's id is still recognised (docs/retention.md)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from alembic import command
from celery import bootsteps
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from coupon_devtools.harness.databases import drop_database
from tests.conftest import PG_ADMIN_URL
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.migrate import alembic_config, ensure_database, upgrade
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.retention import RetentionStore
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import load_settings
from worker.domain.errors import EventRejected
from worker.domain.events import parse_event_data
from worker.domain.model import Coupon, EntityState
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.entrypoints.celery import sweeper as sweeper_module
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps
from worker.usecases.retention import PRUNE_JOB, RetentionPolicy, prune, run_scheduled

DAY_S = 86_400.0
POLICY = RetentionPolicy(older_than_s=30 * DAY_S, event_id_window_s=200 * DAY_S,
                         audit_days=365, batch_size=2)
SERIES = [544770, 553379]
DEAD_SERIES = 700001  # refused by the fake: 712, series expired (a dead letter)


def event(event_id: str, series: list[int] | None = None, customer: str = "566881933") -> Any:
    return parse_event_data({"eventId": event_id, "customer": {"id": customer},
                             "seriesIds": series or SERIES})


def make_deps(engine: Engine, api: FakeCapillary) -> Deps:
    uow = sql_unit_of_work_factory(engine)
    return Deps(
        uow=uow, api=api, publisher=FakePublisher(), limiter=RetryAfterGate(engine),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                            probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")


def seed(engine: Engine, event_id: str, *outcomes: Transition | None) -> list[int]:
    """An event whose entities end as ``outcomes`` say (None: claimed, still in flight)."""
    uow = sql_unit_of_work_factory(engine)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(event(event_id, list(range(1, len(outcomes) + 1))), source="bus",
                        now=now)
        claim = u.ledger.claim_event(event_id, token="t", worker="w", now=now, lease_s=600,
                                     settle_window_s=120)
        ids = [e.entity_id for e in claim.entities]
        transitions = [t.__class__(**{**t.__dict__, "entity_id": entity_id})
                       for t, entity_id in zip(outcomes, ids, strict=True) if t is not None]
        u.ledger.record(claim, calls=[], transitions=transitions, worker="w", now=now)
        u.commit()
    return ids


def issued(code: str, *, verify_s: float | None = None) -> Transition:
    return Transition(0, EntityState.ISSUED, "issued", 1,
                      coupon=Coupon(code=code, series_id=1), verify_window_s=verify_s)


def duplicate() -> Transition:
    return Transition(0, EntityState.DUPLICATE_ISSUED, "duplicate_issued", 2,
                      coupon=Coupon(code="FIRST00001", series_id=1),
                      extra_coupons=(Coupon(code="LATE000002", series_id=1),),
                      error_code="duplicate_issued", error_message="2 coupons of ours")


def waiting() -> Transition:
    return Transition(0, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                      next_attempt_at=datetime.now(UTC) + timedelta(hours=1), error_code="748")


def age(engine: Engine, event_id: str, days: float, *, updated_days: float | None = None,
        ) -> None:
    """Make an event (and its dead letters) ``days`` old."""
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE events SET received_at = now() - make_interval(secs => :r), "
            "updated_at = now() - make_interval(secs => :u) WHERE event_id = :id"),
            {"r": days * DAY_S, "u": (days if updated_days is None else updated_days) * DAY_S,
             "id": event_id})
        conn.execute(text("UPDATE entities SET dead_at = now() - make_interval(secs => :r) "
                          "WHERE event_id = :id AND dead_at IS NOT NULL"),
                     {"r": days * DAY_S, "id": event_id})


def audit(engine: Engine, *, days: float, entity_id: int | None = None) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(
            "INSERT INTO operator_actions (at, action, operator, reason, entity_id, outcome) "
            "VALUES (now() - make_interval(secs => :s), 'discard', 'ana', 'test', :e, 'ok') "
            "RETURNING id"), {"s": days * DAY_S, "e": entity_id}).scalar_one())


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def rows_of(engine: Engine, event_id: str) -> dict[str, int]:
    """How many rows of each table speak of the event."""
    return {
        "entities": count(engine, "SELECT count(*) FROM entities WHERE event_id = :e", e=event_id),
        "coupons": count(engine, "SELECT count(*) FROM coupons WHERE event_id = :e", e=event_id),
        "history": count(engine, "SELECT count(*) FROM entity_history h JOIN entities n "
                                  "ON n.id = h.entity_id WHERE n.event_id = :e", e=event_id),
        "calls": count(engine, "SELECT count(*) FROM api_calls WHERE event_id = :e", e=event_id),
    }


@pytest.fixture
def ledger(clean_ledger: Engine) -> dict[str, Any]:
    """A ledger with rows of every state, most of them old."""
    with clean_ledger.begin() as conn:
        conn.execute(text("DELETE FROM maintenance_runs"))
    api = FakeCapillary(series_errors={DEAD_SERIES: 712})
    deps = make_deps(clean_ledger, api)
    for event_id in ("old-issued-1", "old-issued-2", "old-issued-3", "young-issued"):
        assert issue.issue_event(event(event_id), source="bus", deps=deps).issued == 2
    # One coupon issued, one refused for good: a dead letter, then discarded by a person.
    issue.issue_event(event("old-discarded", [SERIES[0], DEAD_SERIES]), source="bus",
                         deps=deps)
    issue.issue_event(event("old-dead", [SERIES[0], DEAD_SERIES]), source="bus", deps=deps)
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'discarded' "
                          "WHERE event_id = 'old-discarded' AND state = 'dead'"))
        conn.execute(text("UPDATE events SET state = 'completed' "
                          "WHERE event_id = 'old-discarded'"))
    seed(clean_ledger, "old-duplicate", duplicate())
    seed(clean_ledger, "old-verifying", issued("VERIFY0001", verify_s=3600))
    seed(clean_ledger, "old-retry-wait", waiting())
    seed(clean_ledger, "old-in-flight", None)
    queued = seed(clean_ledger, "old-queued", waiting())
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'queued', queued_at = now() "
                          "WHERE id = :id"), {"id": queued[0]})
    with sql_unit_of_work_factory(clean_ledger)() as u:
        u.ledger.ingest(event("old-pending"), source="bus", now=datetime.now(UTC))
        u.commit()
    with sql_unit_of_work_factory(clean_ledger)() as u:
        u.ledger.record_rejection(raw=b"{not json", reason="not JSON", source="bus",
                                  event_id=None, content_type=None,
                                  now=datetime.now(UTC) - timedelta(days=60))
        u.commit()
    for event_id in ("old-issued-1", "old-issued-2", "old-issued-3", "old-discarded",
                     "old-dead", "old-duplicate", "old-verifying", "old-retry-wait",
                     "old-in-flight", "old-queued", "old-pending"):
        age(clean_ledger, event_id, 60)
    # Received long ago, but a person replayed it last week: not old.
    assert issue.issue_event(event("old-replayed"), source="bus", deps=deps).issued == 2
    age(clean_ledger, "old-replayed", 60, updated_days=7)
    pruned_entity = count(clean_ledger, "SELECT min(id) FROM entities "
                                        "WHERE event_id = 'old-issued-1'")
    return {"api": api, "deps": deps, "engine": clean_ledger,
            "old_audit": audit(clean_ledger, days=400, entity_id=pruned_entity),
            "young_audit": audit(clean_ledger, days=100, entity_id=pruned_entity),
            "pruned_entity": pruned_entity}


KEPT = {"dead_letters": 1, "duplicate_issued": 1, "rejected_messages": 1,
        "unsettled_events": 4, "verifying": 1}
PRUNED = ("old-issued-1", "old-issued-2", "old-issued-3", "old-discarded")
UNTOUCHED = ("young-issued", "old-dead", "old-duplicate", "old-verifying", "old-retry-wait",
             "old-in-flight", "old-queued", "old-pending", "old-replayed")


def test_a_dry_run_counts_what_would_go_and_changes_nothing(ledger: dict[str, Any]) -> None:
    engine = ledger["engine"]
    before = {e: rows_of(engine, e) for e in PRUNED + UNTOUCHED}

    report = prune(RetentionStore(engine), POLICY, dry_run=True)

    assert (report.events, report.entities, report.coupons, report.calls) == (4, 8, 7, 4)
    assert report.history == sum(before[e]["history"] for e in PRUNED)
    assert report.audit == 1
    assert report.kept == KEPT
    assert {e: rows_of(engine, e) for e in PRUNED + UNTOUCHED} == before
    assert count(engine, "SELECT count(*) FROM events WHERE pruned_at IS NOT NULL") == 0
    assert count(engine, "SELECT count(*) FROM operator_actions") == 2


def test_prune_removes_settled_old_events_and_keeps_everything_else(
        ledger: dict[str, Any]) -> None:
    engine = ledger["engine"]
    before = {e: rows_of(engine, e) for e in UNTOUCHED}
    metrics = Metrics()

    report = prune(RetentionStore(engine), POLICY, pruned=metrics.ledger_pruned)

    assert (report.events, report.entities, report.coupons, report.calls) == (4, 8, 7, 4)
    assert report.kept == KEPT
    # Batches of two: the settled events came in several transactions.
    assert report.batches > 3
    for event_id in PRUNED:
        assert rows_of(engine, event_id) == {"entities": 0, "coupons": 0, "history": 0,
                                             "calls": 0}
    assert {e: rows_of(engine, e) for e in UNTOUCHED} == before
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT pruned_at IS NOT NULL, customer, payload, metadata, outcome, fingerprint "
            "FROM events WHERE event_id = 'old-discarded'")).one()
        state = conn.execute(text("SELECT state FROM events WHERE event_id = 'old-dead'"))
    pruned, customer, payload, metadata, outcome, fingerprint = row
    assert pruned and customer == payload == metadata == {} and len(fingerprint) == 64
    # What the event ended as stays on its row: the states and the code it was issued.
    assert outcome["entities"] == {"issued": 1, "discarded": 1}
    assert [c["series_id"] for c in outcome["coupons"]] == [SERIES[0]]
    assert state.scalar_one() == "failed"
    assert metrics.registry.get_sample_value(
        "coupon_ledger_pruned_rows_total", {"table": "events"}) == 4

    # A second run finds nothing more to do.
    again = prune(RetentionStore(engine), POLICY)
    assert (again.events, again.entities, again.audit) == (0, 0, 0)


def test_a_pruned_event_published_again_is_not_issued_again(ledger: dict[str, Any]) -> None:
    engine, api, deps = ledger["engine"], ledger["api"], ledger["deps"]
    prune(RetentionStore(engine), POLICY)
    calls = len(api.bulk_calls)

    report = issue.issue_event(event("old-issued-1"), source="bus", deps=deps)

    assert (report.new_event, report.claimed, report.issued) == (False, 0, 0)
    assert report.skipped == {"pruned": 2}
    assert len(api.bulk_calls) == calls
    assert rows_of(engine, "old-issued-1")["entities"] == 0
    # The same id for other content is still refused: the fingerprint stayed.
    with pytest.raises(EventRejected):
        issue.issue_event(event("old-issued-1", customer="919999999999"), source="bus",
                             deps=deps)


def test_a_pruned_event_id_is_forgotten_once_the_window_is_over(
        ledger: dict[str, Any]) -> None:
    engine, api, deps = ledger["engine"], ledger["api"], ledger["deps"]
    prune(RetentionStore(engine), POLICY)
    age(engine, "old-issued-2", 250)

    report = prune(RetentionStore(engine), POLICY)

    assert report.event_ids_forgotten == 1
    assert count(engine, "SELECT count(*) FROM events WHERE event_id = 'old-issued-2'") == 0
    assert count(engine, "SELECT count(*) FROM events WHERE event_id = 'old-issued-3'") == 1
    # Past the window the id is new again, as configured.
    calls = len(api.bulk_calls)
    again = issue.issue_event(event("old-issued-2"), source="bus", deps=deps)
    assert again.new_event and again.issued == 2 and len(api.bulk_calls) == calls + 1


def test_audit_rows_go_only_past_their_own_age_and_keep_the_entity_id(
        ledger: dict[str, Any]) -> None:
    engine = ledger["engine"]

    report = prune(RetentionStore(engine), POLICY)

    assert report.audit == 1
    with engine.connect() as conn:
        left = conn.execute(text("SELECT id, entity_id FROM operator_actions")).all()
    # The entity it names was pruned (its foreign key would have refused or rewritten it).
    assert [tuple(r) for r in left] == [(ledger["young_audit"], ledger["pruned_entity"])]


@pytest.mark.parametrize("statement", [
    "DELETE FROM operator_actions WHERE id = :id",
    "UPDATE operator_actions SET reason = 'rewritten' WHERE id = :id",
])
def test_the_audit_trail_still_refuses_ordinary_changes(
        clean_ledger: Engine, statement: str) -> None:
    old = audit(clean_ledger, days=4000)
    with pytest.raises(DBAPIError, match="append-only"), clean_ledger.begin() as conn:
        conn.execute(text(statement), {"id": old})


@pytest.mark.parametrize(("keep_days", "row_days"), [
    (365, 100),  # the row is younger than the retention the job names
    (30, 4000),  # a retention under the database's floor of 90 days
    (None, 4000),  # the job says who it is but not the age it keeps
])
def test_the_retention_job_cannot_delete_audit_rows_within_their_age(
        clean_ledger: Engine, keep_days: int | None, row_days: float) -> None:
    row = audit(clean_ledger, days=row_days)
    with pytest.raises(DBAPIError, match="within the audit retention"), \
            clean_ledger.begin() as conn:
        conn.execute(text("SELECT set_config('coupons.retention_job', 'audit', true)"))
        if keep_days is not None:
            conn.execute(text("SELECT set_config('coupons.audit_retention_days', :d, true)"),
                         {"d": str(keep_days)})
        conn.execute(text("DELETE FROM operator_actions WHERE id = :id"), {"id": row})
    # The setting was the transaction's own: the next one is an ordinary session again.
    with pytest.raises(DBAPIError, match="append-only"), clean_ledger.begin() as conn:
        conn.execute(text("DELETE FROM operator_actions WHERE id = :id"), {"id": row})
    assert count(clean_ledger, "SELECT count(*) FROM operator_actions") == 1


def test_one_worker_of_the_fleet_runs_the_schedule_per_interval(
        ledger: dict[str, Any]) -> None:
    engine = ledger["engine"]
    store = RetentionStore(engine)

    first = run_scheduled(store, POLICY, every_s=3600, worker="w1")
    second = run_scheduled(store, POLICY, every_s=3600, worker="w2")

    assert first is not None and first.events == 4
    assert second is None
    last = store.last_run(PRUNE_JOB)
    assert last is not None and last["started_by"] == "w1" and last["finished_at"]
    assert last["result"]["events"] == 4 and last["result"]["kept"] == KEPT
    # A claim held (row locked) by another worker is skipped, never waited for.
    with engine.begin() as conn:
        conn.execute(text("UPDATE maintenance_runs SET started_at = now() - interval '2 hours'"))
    with engine.begin() as conn:
        conn.execute(text("SELECT 1 FROM maintenance_runs FOR UPDATE"))
        assert store.claim_run(PRUNE_JOB, every_s=3600, worker="w3") is False
    assert store.claim_run(PRUNE_JOB, every_s=3600, worker="w3") is True


def test_the_prune_command_reports_what_it_removed_and_what_it_kept(
        cli: Callable[..., Any], ledger: dict[str, Any]) -> None:
    assert cli("prune").exit_code == 2
    assert cli("prune", "--older-than", "2h").exit_code == 2

    dry = cli("prune", "--older-than", "30d", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and "dry run: nothing changed" in dry.output
    assert "a person replays or discards them (dlq)" in dry.output
    assert count(ledger["engine"], "SELECT count(*) FROM events WHERE pruned_at IS NOT NULL") == 0

    done = cli("prune", "--older-than", "30", "--batch-size", "3", "--json")
    assert done.exit_code == 0, done.output
    assert '"events": 4' in done.output and '"dead_letters": 1' in done.output


def test_events_show_tells_support_a_pruned_event_and_its_coupon_codes(
        cli: Callable[..., Any], ledger: dict[str, Any]) -> None:
    prune(RetentionStore(ledger["engine"]), POLICY)
    with ledger["engine"].connect() as conn:
        codes = conn.execute(text(
            "SELECT outcome -> 'coupons' FROM events WHERE event_id = 'old-issued-1'")).scalar_one()

    shown = cli("events", "show", "old-issued-1")

    assert shown.exit_code == 0, shown.output
    assert "pruned at" in shown.output and "entities were issued 2" in shown.output
    assert len(codes) == 2 and all(c["code"] in shown.output for c in codes)


def test_a_workers_sweeper_step_runs_the_scheduled_prune(
        ledger: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ledger["engine"]
    monkeypatch.setattr(sweeper_module, "RETENTION_CHECK_S", 0.01)
    container = SimpleNamespace(
        settings=load_settings(retention_days=30), engine=engine,
        deps=lambda: SimpleNamespace(worker_id="node-a", metrics=Metrics()))
    worker = SimpleNamespace(app=SimpleNamespace(coupon_container=container),
                             blueprint=SimpleNamespace(state=bootsteps.RUN))
    step = sweeper_module.Sweeper(worker)
    thread = threading.Thread(target=step._retention_loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                RetentionStore(engine).last_run(PRUNE_JOB) or {}).get("finished_at") is None:
            time.sleep(0.05)
    finally:
        step._stop.set()
        thread.join(timeout=10)

    last = RetentionStore(engine).last_run(PRUNE_JOB)
    assert last is not None and last["started_by"] == "node-a"
    assert last["result"]["events"] == 4
    assert count(engine, "SELECT count(*) FROM events WHERE pruned_at IS NOT NULL") == 4


def test_the_retention_migration_goes_down_and_up_again() -> None:
    name = f"cw_ret_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        ensure_database(url)
        upgrade(url)
        engine = create_engine(url)
        audit(engine, days=4000, entity_id=12345)  # names an entity that is not there

        command.downgrade(alembic_config(url), "0007")

        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("SELECT set_config('coupons.retention_job', 'audit', true), "
                              "set_config('coupons.audit_retention_days', '365', true)"))
            conn.execute(text("DELETE FROM operator_actions"))
        upgrade(url)
        with engine.begin() as conn:
            conn.execute(text("SELECT set_config('coupons.retention_job', 'audit', true), "
                              "set_config('coupons.audit_retention_days', '365', true)"))
            assert conn.execute(text("DELETE FROM operator_actions")).rowcount == 1
        engine.dispose()
    finally:
        drop_database(PG_ADMIN_URL, name)
