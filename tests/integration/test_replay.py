"""Support actions on the real ledger: replay, discard, event replay, dry runs, audit rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.support import Selection
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState
from worker.usecases.support import SupportDeps, _replay_one, discard, replay, replay_event

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def seed(engine: Engine, event_id: str, *states: EntityState) -> list[int]:
    """An event whose entities end in ``states`` (dead with code 707, or retry_wait)."""
    uow = sql_unit_of_work_factory(engine)
    series = list(range(1, len(states) + 1))
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": event_id, "customer": {"id": "9"},
                                          "seriesIds": series}), source="bus", now=NOW)
        claim = u.ledger.claim_event(event_id, token="t", worker="w", now=NOW,
                                     lease_s=60, settle_window_s=120)
        u.ledger.record(claim, calls=[], worker="w", now=NOW, transitions=[
            Transition(e.entity_id, state, "dead" if state is EntityState.DEAD else "retry",
                       1, error_code="707", dead_reason="refused",
                       next_attempt_at=NOW + timedelta(hours=1))
            for e, state in zip(claim.entities, states, strict=True)])
        u.commit()
    return [e.entity_id for e in claim.entities]


def deps(engine: Engine) -> tuple[SupportDeps, FakePublisher]:
    publisher = FakePublisher()
    return SupportDeps(uow=sql_unit_of_work_factory(engine),
                       publisher=publisher, clock=lambda: NOW, sleep=lambda _s: None), publisher


def states(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, state FROM entities")).all())


def audit(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(  # type: ignore[misc]
            "SELECT action, outcome FROM operator_actions ORDER BY id"))]


def test_dry_runs_change_nothing(clean_ledger: Engine) -> None:
    dead, = seed(clean_ledger, "e-1", EntityState.DEAD)
    support, publisher = deps(clean_ledger)
    before = states(clean_ledger)
    assert [r.outcome for r in replay(Selection(entity_ids=(dead,)), reason="r",
                                      operator="ana", deps=support, dry_run=True)] == [
        "would issue again"]
    assert [r.outcome for r in discard(Selection(event_id="e-1"), reason="r",
                                       operator="ana", deps=support, dry_run=True)] == [
        "would discard"]
    assert states(clean_ledger) == before and audit(clean_ledger) == []
    assert publisher.retries == []


def test_discard_closes_and_audits_and_a_second_discard_skips(clean_ledger: Engine) -> None:
    dead, = seed(clean_ledger, "e-1", EntityState.DEAD)
    support, _ = deps(clean_ledger)
    first = discard(Selection(entity_ids=(dead,)), reason="customer churned", operator="ana",
                    deps=support)
    assert [r.outcome for r in first] == ["discarded"]
    assert states(clean_ledger)[dead] == "discarded"
    assert discard(Selection(entity_ids=(dead,)), reason="again", operator="ana",
                   deps=support) == []
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT state FROM events")).scalar() == "completed"
    assert audit(clean_ledger) == [("discard", "discarded")]


def test_replay_requeues_with_fresh_attempts_once(clean_ledger: Engine) -> None:
    dead, = seed(clean_ledger, "e-1", EntityState.DEAD)
    support, publisher = deps(clean_ledger)
    assert [r.outcome for r in replay(Selection(entity_ids=(dead,)), reason="fixed",
                                      operator="ana", deps=support)] == ["requeued"]
    assert publisher.retries == [dead]
    assert states(clean_ledger)[dead] == "queued"
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT attempts FROM entities")).scalar() == 0
    # A second replay finds nothing dead; one that listed it just before the first replay
    # changed it finds it queued once it holds the lock, and only writes an audit row.
    assert replay(Selection(entity_ids=(dead,)), reason="again", operator="bob",
                  deps=support) == []
    raced = _replay_one(dead, Selection(entity_ids=(dead,)), reason="again", operator="bob",
                        deps=support, action="replay")
    assert raced.outcome == "skipped: now queued"
    assert publisher.retries == [dead]
    assert audit(clean_ledger) == [("replay", "requeued"), ("replay", "skipped: now queued")]


def test_event_replay_re_runs_dead_and_waiting_but_not_issued(clean_ledger: Engine) -> None:
    dead, waiting = seed(clean_ledger, "e-1", EntityState.DEAD, EntityState.RETRY_WAIT)
    support, publisher = deps(clean_ledger)
    results = replay_event("e-1", reason="customer called", operator="ana", deps=support)
    assert sorted(r.entity_id for r in results) == [dead, waiting]
    assert sorted(publisher.retries) == [dead, waiting]
    with clean_ledger.connect() as conn:
        attempts = dict(conn.execute(text("SELECT id, attempts FROM entities")).all())
    assert attempts == {dead: 0, waiting: 1}, "a waiting retry keeps its attempts"
    assert replay_event("e-1", reason="again", operator="ana", deps=support) == []
    assert audit(clean_ledger)[-1] == ("event_replay", "nothing to replay")


def test_dead_letter_views_filter_and_group(clean_ledger: Engine) -> None:
    from worker.usecases.queries import dead_letter_summary, dead_letters

    seed(clean_ledger, "e-1", EntityState.DEAD, EntityState.DEAD)
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET last_error_code = '712' WHERE series_id = 2"))
        # Received when the entities died, not whenever the test happens to run.
        conn.execute(text("INSERT INTO rejected_events (source, reason, raw, size_bytes, "
                          "received_at) VALUES ('bus', 'invalid JSON', 'x', 1, :at)"),
                     {"at": NOW})

    def listed(**filters: object) -> list[tuple[str, object]]:
        return [(r["kind"], r.get("series_id"))
                for r in dead_letters(clean_ledger, Selection(**filters))]  # type: ignore[arg-type]

    assert sorted(listed(), key=str) == sorted(
        [("entity", 1), ("entity", 2), ("rejected", None)], key=str)
    assert listed(series_id=2) == [("entity", 2)]
    assert listed(error_code="712") == [("entity", 2)]
    assert sorted(listed(customer="9", event_id="e-1"), key=str) == [("entity", 1), ("entity", 2)]
    assert listed(customer="404") == []
    assert listed(since=NOW + timedelta(days=1)) == []
    summary = dead_letter_summary(clean_ledger, Selection())
    assert {(r["error_code"], r["series_id"], r["count"]) for r in summary} == {
        ("707", 1, 1), ("712", 2, 1)}
