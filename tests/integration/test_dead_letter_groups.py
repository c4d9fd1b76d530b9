"""The console's dead-letter groups, kept by a trigger (0017), equal a fresh count of the
entities after every way an entity enters or leaves the dead state, folded or not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from worker.adapters.postgres import reads
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.migrate import ensure_database, upgrade
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.retention import RetentionStore
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import queries
from worker.usecases.deps import Deps
from worker.usecases.retention import RetentionPolicy, prune
from worker.usecases.sweep import sweep

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
DAY_S = 86_400.0

# The groups as the entities say, counted afresh: what the summary must always equal.
FRESH = """
SELECT last_error_code, series_id, last_error_message, count(*), min(dead_at), max(dead_at)
FROM entities WHERE state = 'dead'
GROUP BY last_error_code, series_id, last_error_message
"""

Group = tuple[Any, ...]


@pytest.fixture(params=["postgres", "pgbouncer"])
def ledger(request: pytest.FixtureRequest) -> Engine:
    """An empty ledger, direct or through PgBouncer in transaction mode."""
    engine: Engine = request.getfixturevalue("clean_ledger")
    if request.param == "pgbouncer":
        engine = request.getfixturevalue("pooled_engine")
    return engine


def fresh(engine: Engine) -> set[Group]:
    with engine.connect() as conn:
        return {tuple(r) for r in conn.execute(text(FRESH))}


def summary(engine: Engine) -> set[Group]:
    return {(g["error_code"], g["series_id"], g["message"], g["count"], g["first"], g["last"])
            for g in reads.dead_letter_groups(engine, limit=1000)}


def assert_summary_is_fresh(engine: Engine) -> None:
    assert summary(engine) == fresh(engine)


def fold(engine: Engine) -> int:
    with sql_unit_of_work_factory(engine)() as u:
        folded = u.ledger.fold_dead_letter_groups()
        u.commit()
    return folded


def summary_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT dead, folded FROM dead_letter_groups ORDER BY id"))]


def dead_letter(engine: Engine, event_id: str, series: list[int], *, at: datetime,
                code: str | None = "712", message: str | None = "series expired") -> list[int]:
    """An event whose entities (one per series) all end dead at ``at``, through the hot
    path's outcome statement."""
    uow = sql_unit_of_work_factory(engine)
    event = parse_event_data({"eventId": event_id, "customer": {"id": "566881933"},
                              "seriesIds": series})
    with uow() as u:
        _new, claim = u.ledger.take_in(event, source="bus", token="t", worker="w", now=at,
                                       lease_s=600, settle_window_s=120)
        u.ledger.record(claim, calls=[], worker="w", now=at, transitions=[
            Transition(e.entity_id, EntityState.DEAD, "dead", 1, error_code=code,
                       error_message=message, dead_reason="permanent error")
            for e in claim.entities])
        u.commit()
    return [e.entity_id for e in claim.entities]


def test_the_groups_equal_a_fresh_count_through_every_way_in_and_out(ledger: Engine) -> None:
    engine = ledger
    # Given dead letters of several causes, series and times (NULL codes and messages too)
    a = dead_letter(engine, "e-a", [1, 2], at=T0)
    b = dead_letter(engine, "e-b", [1, 2], at=T0 + timedelta(hours=1))
    c = dead_letter(engine, "e-c", [1], at=T0 + timedelta(hours=2))
    dead_letter(engine, "e-d", [3], at=T0 + timedelta(hours=3), code=None, message=None)
    dead_letter(engine, "e-e", [3], at=T0 + timedelta(hours=4), code="707", message=None)
    assert_summary_is_fresh(engine)
    assert ("712", 1, "series expired", 3, T0, T0 + timedelta(hours=2)) in fresh(engine)
    # in the shape the console's page reads
    assert set(queries.dead_letter_groups(engine)[0]) == {
        "error_code", "series_id", "message", "count", "first", "last"}

    # When the sweeper folds them: one row per group, the same groups
    assert fold(engine) == 7
    assert sorted(summary_rows(engine)) == [(1, True), (1, True), (2, True), (3, True)]
    assert_summary_is_fresh(engine)
    assert fold(engine) == 0  # nothing new: nothing to fold

    # When support replays the oldest of a group (its first goes) ...
    uow = sql_unit_of_work_factory(engine)
    with uow() as u:
        target = u.ledger.lock_target(a[0])
        assert target is not None
        u.ledger.requeue_target(target, now=T0 + timedelta(days=1), reset_attempts=True)
        u.commit()
    assert_summary_is_fresh(engine)
    # ... and discards the newest of another (its last goes), before any fold
    with uow() as u:
        target = u.ledger.lock_target(b[1])
        assert target is not None
        u.ledger.discard_target(target, now=T0 + timedelta(days=1))
        u.commit()
    assert_summary_is_fresh(engine)
    assert ("712", 1, "series expired", 2, T0 + timedelta(hours=1),
            T0 + timedelta(hours=2)) in fresh(engine)
    assert fold(engine) > 0
    assert_summary_is_fresh(engine)

    # When a bulk update rewrites the message of one group's dead letters and replays another
    with engine.begin() as conn:
        conn.execute(text("UPDATE entities SET last_error_message = 'series retired' "
                          "WHERE state = 'dead' AND series_id = 1"))
        conn.execute(text("UPDATE entities SET state = 'queued', queued_at = now() "
                          "WHERE state = 'dead' AND last_error_code = '707'"))
    assert_summary_is_fresh(engine)
    # and the replayed one dies again, of something else, at another time
    with engine.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'in_flight' WHERE state = 'queued'"))
        conn.execute(text(
            "UPDATE entities SET state = 'dead', last_error_code = '748', dead_at = :at "
            "WHERE state = 'in_flight'"), {"at": T0 + timedelta(days=2)})
    assert_summary_is_fresh(engine)

    # When dead letters are deleted (their event deleted: the rows cascade)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE event_id = 'e-c'"))
    assert gone(engine, c)
    assert_summary_is_fresh(engine)

    # When retention prunes old settled events (the discarded dead letter's among them)
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET state = 'completed', received_at = :old, "
                          "updated_at = :old WHERE event_id = 'e-b'"),
                     {"old": T0 - timedelta(days=60)})
        conn.execute(text("UPDATE entities SET state = 'discarded' WHERE event_id = 'e-b'"))
        conn.execute(text("DELETE FROM maintenance_runs"))
    policy = RetentionPolicy(older_than_s=7 * DAY_S, event_id_window_s=200 * DAY_S,
                             audit_days=365, batch_size=10)
    report = prune(RetentionStore(engine), policy)
    assert report.entities == 2
    assert_summary_is_fresh(engine)

    # Then, folded again, the summary holds a row per group and still the same groups
    fold(engine)
    assert_summary_is_fresh(engine)
    assert len(summary_rows(engine)) == len(fresh(engine))
    assert fold(engine) == 0

    # And emptying the entities empties the summary
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE entities CASCADE"))
    assert summary_rows(engine) == [] and fresh(engine) == set()


def gone(engine: Engine, entity_ids: list[int]) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM entities WHERE id = ANY(:ids)"),
                            {"ids": entity_ids}).scalar_one() == 0  # type: ignore[no-any-return]


def test_a_storm_of_dead_letters_into_one_group_waits_for_nobody(clean_ledger: Engine) -> None:
    # Given two entities in flight, of the same series, dead-lettered for the same cause
    uow = sql_unit_of_work_factory(clean_ledger)
    ids = []
    for event_id in ("storm-1", "storm-2"):
        event = parse_event_data({"eventId": event_id, "customer": {"id": "7"},
                                  "seriesIds": [1]})
        with uow() as u:
            ids += [e.entity_id for e in u.ledger.take_in(
                event, source="bus", token="t", worker="w", now=T0, lease_s=600,
                settle_window_s=120)[1].entities]
            u.commit()
    dead = ("UPDATE entities SET state = 'dead', last_error_code = '712', "
            "last_error_message = 'series expired', dead_at = now() WHERE id = :id")
    # When one transaction has dead-lettered its entity and not yet committed
    with clean_ledger.connect() as first, clean_ledger.connect() as second:
        first.execute(text(dead), {"id": ids[0]})
        # Then another dead-lettering into the same group does not wait for it
        second.execute(text("SET LOCAL lock_timeout = '1s'"))
        try:
            second.execute(text(dead), {"id": ids[1]})
        except OperationalError as exc:  # pragma: no cover - the failure this test guards
            pytest.fail(f"the second dead-lettering waited for the first: {exc}")
        second.commit()
        first.commit()
    assert_summary_is_fresh(clean_ledger)
    assert {g[3] for g in fresh(clean_ledger)} == {2}


def test_the_console_page_and_the_groups_agree_after_a_fold_racing_new_deltas(
        clean_ledger: Engine) -> None:
    # A dead-lettering committed while a fold runs is left for the next fold, not lost.
    dead_letter(clean_ledger, "race-1", [1], at=T0)
    with sql_unit_of_work_factory(clean_ledger)() as u:
        u.ledger.fold_dead_letter_groups()
        dead_letter(clean_ledger, "race-2", [1], at=T0 + timedelta(hours=1))
        u.commit()
    assert_summary_is_fresh(clean_ledger)
    assert sorted(summary_rows(clean_ledger)) == [(1, False), (1, True)]
    fold(clean_ledger)
    assert summary_rows(clean_ledger) == [(2, True)]
    assert_summary_is_fresh(clean_ledger)


def test_the_sweepers_cycle_folds_the_deltas(clean_ledger: Engine) -> None:
    # Given dead letters and a replay not yet folded
    ids = dead_letter(clean_ledger, "sweep-1", [1, 2], at=T0)
    with clean_ledger.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'queued' WHERE id = :id"), {"id": ids[0]})
    assert sorted(summary_rows(clean_ledger)) == [(-1, False), (1, False), (1, False)]
    # When the sweeper runs its cycle
    uow = sql_unit_of_work_factory(clean_ledger)
    deps = Deps(uow=uow, api=FakeCapillary(), publisher=FakePublisher(),
                limiter=RetryAfterGate(clean_ledger),
                circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                                    probe_timeout_s=60),
                retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")
    sweep(deps)
    # Then a row per group is left, and the same groups
    assert summary_rows(clean_ledger) == [(1, True)]
    assert_summary_is_fresh(clean_ledger)


# -- the migration's backfill ------------------------------------------------------------------


def test_the_migration_counts_the_dead_letters_already_there(fresh_url: str) -> None:
    # Given a ledger at 0016 with dead letters of several groups, and entities not dead
    ensure_database(fresh_url)
    upgrade(fresh_url, "0016")
    engine = create_engine(fresh_url)
    try:
        dead_letter(engine, "old-1", [1, 2], at=T0)
        dead_letter(engine, "old-2", [1], at=T0 + timedelta(hours=5))
        dead_letter(engine, "old-3", [4], at=T0, code=None, message=None)
        with engine.begin() as conn:
            conn.execute(text("UPDATE entities SET state = 'queued' "
                              "WHERE event_id = 'old-1' AND series_id = 2"))
        before = fresh(engine)
        assert len(before) == 2
        # When migrated to 0017
        upgrade(fresh_url)
        # Then every dead letter already there is counted, in one folded row per group
        assert summary(engine) == before
        assert ("712", 1, "series expired", 2, T0, T0 + timedelta(hours=5)) in before
        assert sorted(summary_rows(engine)) == [(1, True), (2, True)]
        # and what happens after is counted by the trigger
        dead_letter(engine, "new-1", [4], at=T0 + timedelta(days=1), code=None, message=None)
        assert summary(engine) == fresh(engine)
        assert (None, 4, None, 2, T0, T0 + timedelta(days=1)) in fresh(engine)
    finally:
        engine.dispose()
