"""The ledger's rules, run against PostgreSQL and the in-memory fake side by side."""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from coupon_devtools.fakes.ledger import fake_unit_of_work_factory
from worker.adapters.capillary.answers import MAX_CODE_CHARS, parse_coupon
from worker.adapters.capillary.api import CallInfo
from worker.adapters.postgres import models as m
from worker.adapters.postgres.records import CircuitState, Claim, RecordedCall, Transition
from worker.adapters.postgres.repository import Ledger
from worker.adapters.postgres.unit_of_work import UnitOfWork, sql_unit_of_work_factory
from worker.domain.errors import EventRejected, LedgerError
from worker.domain.events import LoyaltyEvent, parse_event_data
from worker.domain.model import Coupon, DeadMessageKind, EntityState, EntryError, Verdict, issue_ref

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
LEASE = NOW + timedelta(seconds=60)
LEASE_S = 60.0
SETTLE_S = 120.0
# Leases live on the database's clock: tests that need one to run out use a short lease and
# let real time pass (the fake takes the ``now`` it is given as its database clock).
SHORT_LEASE_S = 0.3
EVENT = parse_event_data({"eventId": "e-1", "customer": {"id": "7"}, "seriesIds": [1, 2]})

UowFactory = Callable[[], UnitOfWork[Ledger]]


@pytest.fixture(params=["postgres", "pgbouncer", "fake"])
def uow(request: pytest.FixtureRequest) -> UowFactory:
    """The ledger on PostgreSQL, on PostgreSQL through PgBouncer in transaction mode (the
    worker's engine, as ``COUPONS_DB_POOLER=transaction`` makes it), and in memory."""
    if request.param in ("postgres", "pgbouncer"):
        engine: Engine = request.getfixturevalue("clean_ledger")
        if request.param == "pgbouncer":
            engine = request.getfixturevalue("pooled_engine")
        return sql_unit_of_work_factory(engine)
    _state, factory = fake_unit_of_work_factory()
    return factory  # type: ignore[no-any-return]


def ingest_and_claim(uow: UowFactory, token: str = "t1", now: datetime = NOW,
                     lease_s: float = LEASE_S) -> Claim:
    with uow() as u:
        _new, claim = u.ledger.take_in(EVENT, source="bus", token=token, worker="w", now=now,
                                       lease_s=lease_s, settle_window_s=SETTLE_S)
        u.commit()
    return claim


def real_now() -> datetime:
    return datetime.now(UTC)


def outlive_short_lease() -> datetime:
    time.sleep(SHORT_LEASE_S + 0.2)
    return real_now()


def record(uow: UowFactory, claim: Claim, *transitions: Transition) -> int:
    with uow() as u:
        lost = u.ledger.record(claim, calls=[], transitions=list(transitions), worker="w",
                               now=NOW)
        u.commit()
    return lost


def issued(entity_id: int, attempt: int = 1, code: str = "C1") -> Transition:
    return Transition(entity_id, EntityState.ISSUED, "issued", attempt,
                      coupon=Coupon(code=code, series_id=1))


def retry_wait(entity_id: int, at: datetime) -> Transition:
    return Transition(entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                      next_attempt_at=at, verdict="retryable", error_code="730")


def test_ingest_is_idempotent_and_claims_once(uow: UowFactory) -> None:
    first = ingest_and_claim(uow)
    assert [e.series_id for e in first.entities] == [1, 2]
    assert all(e.attempts == 1 and not e.needs_reconcile for e in first.entities)
    second = ingest_and_claim(uow, token="t2")
    assert second.entities == ()
    assert second.skipped == {"in_flight": 2}


def test_an_id_reused_for_other_content_is_refused(uow: UowFactory) -> None:
    ingest_and_claim(uow)
    other = parse_event_data({"eventId": "e-1", "customer": {"id": "8"}, "seriesIds": [1, 2]})
    with pytest.raises(EventRejected), uow() as u:
        u.ledger.ingest(other, source="bus", now=NOW)


def test_take_in_says_whether_the_event_is_new(uow: UowFactory) -> None:
    # Given nothing, when the event is taken in twice
    with uow() as u:
        first = u.ledger.take_in(EVENT, source="bus", token="t1", worker="w", now=NOW,
                                 lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    with uow() as u:
        again = u.ledger.take_in(EVENT, source="bus", token="t2", worker="w", now=NOW,
                                 lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    # Then the first is new and claims both series, with the event's data; the second not
    assert first[0] is True and [e.series_id for e in first[1].entities] == [1, 2]
    assert first[1].customer == {"id": "7"} and first[1].customer_key == EVENT.customer.key
    assert first[1].skipped == {}
    assert again[0] is False and again[1].entities == ()
    assert again[1].issue_ref == first[1].issue_ref


def test_take_in_hands_out_the_ledgers_entities_as_claimed(uow: UowFactory) -> None:
    # Series ids that no entity id can equal, so that one is never read for the other
    event = parse_event_data({"eventId": "e-ids", "customer": {"id": "7"},
                              "seriesIds": [553379, 544770]})
    with uow() as u:
        new, claim = u.ledger.take_in(event, source="bus", token="t", worker="w", now=NOW,
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert new
    assert [e.series_id for e in claim.entities] == [544770, 553379]
    assert [(e.attempts, e.needs_reconcile, e.first_attempt_at, e.settled, e.settles_in_s)
            for e in claim.entities] == [(1, False, NOW, True, 0.0)] * 2
    ids = [e.entity_id for e in claim.entities]
    assert len(set(ids)) == 2 and not set(ids) & {544770, 553379}
    # ...ids an outcome can be recorded by
    assert record(uow, claim, *(issued(e.entity_id, code=f"C{e.series_id}")
                                for e in claim.entities)) == 0
    with uow() as u:
        assert u.ledger.take_in(event, source="bus", token="t2", worker="w", now=NOW,
                                lease_s=LEASE_S, settle_window_s=SETTLE_S)[1].skipped == {
            "issued": 2}


def test_take_in_of_other_content_claims_nothing(uow: UowFactory) -> None:
    # Given an event whose entities were never tried
    with uow() as u:
        u.ledger.ingest(EVENT, source="bus", now=NOW)
        u.commit()
    other = parse_event_data({"eventId": "e-1", "customer": {"id": "8"}, "seriesIds": [1, 2]})
    # When another event with the same id is taken in, it is refused, saying why and which
    with pytest.raises(EventRejected, match="'e-1' was already used for a different event "
                       r"\(customer, series or metadata differ\)") as refused, uow() as u:
        u.ledger.take_in(other, source="bus", token="t-other", worker="w", now=NOW,
                         lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert refused.value.event_id == "e-1"
    # Then it claimed nothing: the right event still claims both
    assert [e.attempts for e in ingest_and_claim(uow).entities] == [1, 1]


def test_nothing_is_kept_without_commit(uow: UowFactory) -> None:
    with uow() as u:
        u.ledger.ingest(EVENT, source="bus", now=NOW)
    assert ingest_and_claim(uow).entities != ()


def test_an_expired_lease_is_claimed_again_and_must_reconcile(uow: UowFactory) -> None:
    first = ingest_and_claim(uow, now=real_now(), lease_s=SHORT_LEASE_S)
    assert all(e.settled for e in first.entities)
    again = ingest_and_claim(uow, token="t2", now=outlive_short_lease())
    assert [e.needs_reconcile for e in again.entities] == [True, True]
    assert [e.attempts for e in again.entities] == [2, 2]
    # ...and is known to have been first tried by the dead worker, not now
    assert [e.first_attempt_at for e in again.entities] == \
        [e.first_attempt_at for e in first.entities]
    # The dead worker's call may still land for a window after its lease ran out.
    assert not any(e.settled for e in again.entities)
    assert all(SETTLE_S - 5 < e.settles_in_s <= SETTLE_S for e in again.entities)


def test_a_live_lease_is_not_taken_by_a_host_whose_clock_runs_ahead(
    clean_ledger: Engine,
) -> None:
    # PostgreSQL only: the fake has one clock, the one it is given.
    uow = sql_unit_of_work_factory(clean_ledger)
    ingest_and_claim(uow, now=real_now())
    skewed = real_now() + timedelta(seconds=LEASE_S + 3600)
    again = ingest_and_claim(uow, token="t2", now=skewed)
    assert again.entities == (), "a lease is judged on the database's clock"
    with uow() as u:
        assert u.ledger.expire_leases(now=skewed, retry_at=skewed, limit=10,
                                      settle_window_s=SETTLE_S) == []


def test_an_outcome_needs_the_claim_except_an_issued_coupon(uow: UowFactory) -> None:
    stale = ingest_and_claim(uow, now=real_now(), lease_s=SHORT_LEASE_S)
    ingest_and_claim(uow, token="t2", now=outlive_short_lease())
    a, b = stale.entities
    assert record(uow, stale, retry_wait(a.entity_id, NOW)) == 1, "claim lost: not applied"
    assert record(uow, stale, issued(b.entity_id)) == 0, "a coupon is recorded regardless"
    assert record(uow, stale, issued(b.entity_id, code="C2")) == 1, "but never over one"


def test_retries_are_taken_when_due_and_requeued_if_lost(uow: UowFactory) -> None:
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    record(uow, claim, retry_wait(a.entity_id, NOW + timedelta(seconds=10)), issued(b.entity_id))
    with uow() as u:
        assert u.ledger.take_due(now=NOW, limit=10) == []
        due = u.ledger.take_due(now=NOW + timedelta(seconds=10), limit=10)
        assert [d.entity_id for d in due] == [a.entity_id]
        u.ledger.mark_queued([a.entity_id], now=NOW)
        u.commit()
    with uow() as u:
        assert u.ledger.claim_entity(b.entity_id, token="x", worker="w", now=NOW,
                                     lease_s=LEASE_S, settle_window_s=SETTLE_S) is None, \
            "issued is never claimed"
        assert u.ledger.requeue_stale(queued_before=NOW - timedelta(seconds=1), now=NOW,
                                      limit=10) == 0
        assert u.ledger.requeue_stale(queued_before=NOW + timedelta(seconds=1), now=NOW,
                                      limit=10) == 1
        u.commit()
    with uow() as u:
        retry = u.ledger.claim_entity(a.entity_id, token="t3", worker="w", now=NOW,
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert retry is not None and retry.entities[0].attempts == 2


def test_expired_leases_are_swept_into_reconciliation(uow: UowFactory) -> None:
    start = real_now()
    ingest_and_claim(uow, now=start, lease_s=SHORT_LEASE_S)
    with uow() as u:
        assert u.ledger.expire_leases(now=start, retry_at=start, limit=10,
                                      settle_window_s=SETTLE_S) == []
    later = outlive_short_lease()
    with uow() as u:
        swept = u.ledger.expire_leases(now=later, retry_at=later, limit=10,
                                       settle_window_s=SETTLE_S)
        u.commit()
    assert len(swept) == 2
    with uow() as u:
        retry = u.ledger.claim_entity(swept[0], token="t9", worker="w", now=real_now(),
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert retry is not None and retry.entities[0].needs_reconcile
    assert not retry.entities[0].settled


def test_an_unknown_outcome_settles_after_the_window_and_a_resend_is_verified(
    uow: UowFactory,
) -> None:
    claim = ingest_and_claim(uow, now=real_now())
    a, b = claim.entities
    # Given one entity whose outcome is unknown and one issued by a re-send
    with uow() as u:
        u.ledger.record(claim, calls=[], worker="w", now=real_now(), transitions=[
            Transition(a.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                       next_attempt_at=real_now(), needs_reconcile=True, verdict="ambiguous",
                       settle_window_s=SETTLE_S),
            Transition(b.entity_id, EntityState.ISSUED, "issued", 1,
                       coupon=Coupon(code="B1", series_id=2), verify_window_s=SHORT_LEASE_S),
        ])
        u.commit()
    with uow() as u:
        retry = u.ledger.claim_entity(a.entity_id, token="t2", worker="w", now=real_now(),
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert retry is not None
    assert not retry.entities[0].settled and retry.entities[0].settles_in_s > SETTLE_S - 5
    # When the check after the re-send is due, it is handed out once
    assert_now = outlive_short_lease()
    with uow() as u:
        items = u.ledger.take_verifications(now=assert_now, limit=10, hold_s=LEASE_S)
        u.commit()
    assert [(i.entity_id, i.codes) for i in items] == [(b.entity_id, ("B1",))]
    with uow() as u:
        assert u.ledger.take_verifications(now=assert_now, limit=10, hold_s=LEASE_S) == []
        # Then a late original found by it is recorded beside the first coupon
        u.ledger.finish_verification(items[0], now=assert_now,
                                     duplicates=[Coupon(code="B2", series_id=2)],
                                     message="late original")
        u.commit()
    with uow() as u:
        assert u.ledger.take_verifications(now=real_now() + timedelta(hours=1), limit=10,
                                           hold_s=LEASE_S) == []


def test_dead_letters_are_published_once(uow: UowFactory) -> None:
    claim = ingest_and_claim(uow)
    a, _b = claim.entities
    record(uow, claim, Transition(a.entity_id, EntityState.DEAD, "dead", 1, error_code="707",
                                  dead_reason="permanent error"))
    with uow() as u:
        u.ledger.record_rejection(raw=b"{", reason="invalid JSON", source="bus", event_id=None,
                                  content_type=None, now=NOW)
        records = u.ledger.unpublished_dead_letters(limit=10)
        assert sorted(r.kind for r in records) == ["entity", "rejected_event"]
        u.ledger.mark_dead_letters_published(records, now=NOW)
        u.commit()
    with uow() as u:
        assert u.ledger.unpublished_dead_letters(limit=10) == []


def test_a_held_lease_is_renewed_and_a_lapsed_one_never_revived(uow: UowFactory) -> None:
    claim = ingest_and_claim(uow, token="held", now=real_now(), lease_s=SHORT_LEASE_S)
    ids = [e.entity_id for e in claim.entities]
    with uow() as u:
        assert u.ledger.renew_leases(["held", "other"], ids, lease_s=LEASE_S,
                                     now=real_now()) == {"held"}
        assert u.ledger.renew_leases(["other"], ids, lease_s=LEASE_S, now=real_now()) == set()
        u.commit()
    # The renewed lease outlives the short one it was taken with
    now = outlive_short_lease()
    with uow() as u:
        assert u.ledger.expire_leases(now=now, retry_at=now, limit=10,
                                      settle_window_s=SETTLE_S) == []
    # A lease that ran out is not renewed: the sweeper may be taking its entities back
    other = parse_event_data({"eventId": "e-2", "customer": {"id": "8"}, "seriesIds": [3]})
    with uow() as u:
        _new, late = u.ledger.take_in(other, source="bus", token="late", worker="w",
                                      now=real_now(), lease_s=SHORT_LEASE_S,
                                      settle_window_s=SETTLE_S)
        u.commit()
    assert len(late.entities) == 1
    now = outlive_short_lease()
    with uow() as u:
        assert u.ledger.renew_leases(["late"], [late.entities[0].entity_id],
                                     lease_s=LEASE_S, now=now) == set()


def test_entities_waiting_for_the_circuit_become_due_when_it_is_closed_by_hand(
        uow: UowFactory) -> None:
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    later = NOW + timedelta(minutes=10)
    record(uow, claim,
           Transition(a.entity_id, EntityState.RETRY_WAIT, "deferred", 1,
                      next_attempt_at=later, error_code="circuit_open"),
           Transition(b.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                      next_attempt_at=later, error_code="503"))
    with uow() as u:
        assert u.ledger.resume_deferred("circuit_open", now=NOW) == 1
        u.commit()
    with uow() as u:
        due = u.ledger.take_due(now=NOW + timedelta(seconds=1), limit=10)
    assert [d.entity_id for d in due] == [a.entity_id], "only the circuit's, not the 503's"


def test_failed_deliveries_are_counted_per_message_until_forgotten(uow: UowFactory) -> None:
    with uow() as u:
        assert u.ledger.count_message_failure("event:e-1", kind="internal_error",
                                              error="RuntimeError: bug", now=NOW) == 1
        assert u.ledger.count_message_failure("event:e-2", kind="internal_error",
                                              error="RuntimeError: bug", now=NOW) == 1
        u.commit()
    with uow() as u:
        assert u.ledger.count_message_failure("event:e-1", kind="infrastructure",
                                              error="LedgerError: refused", now=NOW) == 2
        u.ledger.forget_message_failure("event:e-1")
        u.commit()
    with uow() as u:
        assert u.ledger.count_message_failure("event:e-1", kind="internal_error",
                                              error="RuntimeError: bug", now=NOW) == 1
        assert u.ledger.count_message_failure("event:e-2", kind="internal_error",
                                              error="RuntimeError: bug", now=NOW) == 2


def test_counts_of_messages_that_stopped_failing_are_forgotten_after_a_while(
        uow: UowFactory) -> None:
    # Given a message that failed twice two days ago (then went through), and one that failed
    # an hour ago
    with uow() as u:
        for _ in range(2):
            u.ledger.count_message_failure("event:old", kind="internal_error", error="x",
                                           now=NOW - timedelta(days=2))
        u.ledger.count_message_failure("event:recent", kind="internal_error", error="x",
                                       now=NOW - timedelta(hours=1))
        u.commit()
    # When another message fails, forgetting what last failed over a day ago
    with uow() as u:
        assert u.ledger.count_message_failure(
            "event:new", kind="internal_error", error="x", now=NOW,
            forget_before=NOW - timedelta(days=1)) == 1
        u.commit()
    # Then the old count is gone (a new failure of it counts from one), the recent one stays
    with uow() as u:
        assert u.ledger.count_message_failure("event:old", kind="internal_error", error="x",
                                              now=NOW) == 1
        assert u.ledger.count_message_failure("event:recent", kind="internal_error",
                                              error="x", now=NOW) == 2


def test_a_kept_message_says_whose_fault_it_was(uow: UowFactory) -> None:
    with uow() as u:
        u.ledger.record_rejection(raw=b"{}", reason="infrastructure: failed 5 deliveries",
                                  source="bus", event_id="e-1", content_type=None, now=NOW,
                                  kind=DeadMessageKind.INFRASTRUCTURE)
        u.commit()
    with pytest.raises(LedgerError), uow() as u:
        u.ledger.record_rejection(raw=b"{}", reason="?", source="bus", event_id=None,
                                  content_type=None, now=NOW, kind="somebody_else")


def test_circuit_counts_failures_and_lets_one_probe(uow: UowFactory) -> None:
    with uow() as u:
        assert u.ledger.circuit("c").state == "closed"
        assert u.ledger.count_failure("c", now=NOW).consecutive_failures == 1
        assert u.ledger.count_failure("c", now=NOW).consecutive_failures == 2
        u.ledger.save_circuit("c", CircuitState("open", 2, 1, NOW, "down"), now=NOW)
        u.commit()
    with uow() as u:
        assert not u.ledger.try_probe("c", now=NOW - timedelta(seconds=1), probe_until=LEASE)
        assert u.ledger.try_probe("c", now=NOW, probe_until=LEASE)
        assert not u.ledger.try_probe("c", now=NOW, probe_until=LEASE), "one probe at a time"
        u.commit()


# -- PostgreSQL only: real concurrency -------------------------------------------------------


def all_at_once(n: int, action: Callable[[int], None]) -> list[BaseException]:
    """Run ``action(0)`` ... ``action(n - 1)`` in ``n`` threads released together; what they
    raised. Every thread has finished when it returns."""
    errors: list[BaseException] = []
    released = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            released.wait(timeout=10)
            action(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a racing thread never finished"
    return errors


def test_racing_claims_never_share_an_entity(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": "race", "customer": {"id": "1"},
                                          "seriesIds": list(range(1, 41))}),
                        source="bus", now=NOW)
        u.commit()
    claims: list[Claim] = []

    def claim(n: int) -> None:
        with uow() as u:
            claims.append(u.ledger.claim_event("race", token=f"t{n}", worker=f"w{n}",
                                               now=NOW, lease_s=LEASE_S,
                                               settle_window_s=SETTLE_S))
            u.commit()

    assert all_at_once(8, claim) == []
    assert len(claims) == 8
    claimed = [e.entity_id for c in claims for e in c.entities]
    assert len(claimed) == 40 and len(set(claimed)) == 40
    # And each entity is held, in the ledger, by the very claim that was handed it
    handed = {e.entity_id: c.token for c in claims for e in c.entities}
    with clean_ledger.connect() as conn:
        held = {row[0]: row[1] for row in conn.execute(select(m.Entity.id, m.Entity.claim_token))}
    assert held == handed


def test_entities_finished_concurrently_still_complete_their_event(clean_ledger: Engine) -> None:
    # Given an event whose two entities are held by two workers' claims
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    record(uow, claim, retry_wait(a.entity_id, NOW), retry_wait(b.entity_id, NOW))
    first, second = (claim_one(uow, a.entity_id, "t1"), claim_one(uow, b.entity_id, "t2"))
    # When the second records while the first has recorded but not yet committed
    second_done = threading.Event()
    errors: list[BaseException] = []

    def finish_second() -> None:
        try:
            with uow() as u:
                u.ledger.record(second, calls=[], worker="w2", now=NOW,
                                transitions=[issued(b.entity_id, attempt=2, code="B")])
                u.commit()
            second_done.set()
        except BaseException as exc:
            errors.append(exc)

    with uow() as u:
        # (a statement first, so that the record joins a transaction held open: alone, it
        # would commit at once)
        u.session.execute(text("SELECT 1"))
        assert u.ledger.record(first, calls=[], worker="w1", now=NOW,
                               transitions=[issued(a.entity_id, attempt=2, code="A")]) == 0
        racer = threading.Thread(target=finish_second)
        racer.start()
        assert not second_done.wait(0.5), "the second waits for the first"
        u.commit()
    racer.join(timeout=10)
    assert not racer.is_alive() and errors == [] and second_done.is_set()
    # Then the event is completed, not left "processing"
    with clean_ledger.connect() as conn:
        assert conn.execute(select(m.Event.state)).scalar() == "completed"
        assert sorted(conn.execute(select(m.IssuedCoupon.code)).scalars()) == ["A", "B"]


def claim_one(uow: UowFactory, entity_id: int, token: str, now: datetime = NOW) -> Claim:
    with uow() as u:
        claim = u.ledger.claim_entity(entity_id, token=token, worker=token, now=now,
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert claim is not None and [e.entity_id for e in claim.entities] == [entity_id]
    assert claim.token == token
    return claim


# -- PostgreSQL only: every column a claim and an outcome write ------------------------------


def rows(engine: Engine, model: Any, *columns: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        query = select(*(getattr(model, c) for c in columns)).order_by(model.id)
        return [tuple(r) for r in conn.execute(query)]


def test_a_claim_writes_its_history_and_hands_out_what_it_took(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    first = ingest_and_claim(uow, now=real_now(), lease_s=SHORT_LEASE_S)
    again_at = outlive_short_lease()
    with uow() as u:
        again = u.ledger.claim_event("e-1", token="t2", worker="w2", now=again_at,
                                     lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    # The event is kept as it came, for support to read and replay
    with clean_ledger.connect() as conn:
        assert conn.execute(select(m.Event.payload)).scalar_one() == EVENT.to_message()
    # Each claim carries the event's customer, metadata and reference, read from the ledger
    for claimed in (first, again):
        assert (claimed.customer, claimed.customer_key, claimed.metadata, claimed.skipped) == (
            EVENT.customer.as_api(), EVENT.customer.key,
            EVENT.metadata.model_dump(exclude_none=True), {})
        assert claimed.issue_ref == issue_ref("e-1")
    # The first attempt's time is kept, and the second claim must read back first
    assert [e.first_attempt_at for e in again.entities] == \
        [e.first_attempt_at for e in first.entities]
    assert all(e.first_attempt_at < again_at for e in again.entities)
    assert rows(clean_ledger, m.EntityHistory, "kind", "state", "attempt", "worker",
                "error_code", "request_id", "message") == [
        ("claimed", "in_flight", 1, "w", None, None, None),
        ("claimed", "in_flight", 1, "w", None, None, None),
        ("claimed", "in_flight", 2, "w2", None, None, "reconcile first"),
        ("claimed", "in_flight", 2, "w2", None, None, "reconcile first"),
    ]
    held = rows(clean_ledger, m.Entity, "claim_token", "claimed_by", "attempts")
    assert held == [("t2", "w2", 2), ("t2", "w2", 2)]
    with clean_ledger.connect() as conn:
        ats = conn.execute(select(m.EntityHistory.at).order_by(m.EntityHistory.id)).scalars()
        assert list(ats)[2:] == [again_at, again_at], "the history is stamped with the claim"


def test_a_retry_is_claimed_with_its_token_worker_lease_and_window(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    record(uow, claim, retry_wait(a.entity_id, NOW), retry_wait(b.entity_id, NOW))
    with uow() as u:
        assert u.ledger.claim_entity(a.entity_id, token="t2", worker="w2", now=NOW,
                                     lease_s=LEASE_S, settle_window_s=SETTLE_S) is not None
        u.commit()
    retry = claim_one(uow, b.entity_id, "t3")
    assert retry.skipped == {} and retry.issue_ref == claim.issue_ref
    with clean_ledger.connect() as conn:
        entity = conn.execute(select(m.Entity.claim_token, m.Entity.claimed_by,
                                     m.Entity.lease_until - func.now())
                              .where(m.Entity.id == a.entity_id)).one()
    assert entity[:2] == ("t2", "w2")
    assert LEASE_S - 10 < entity[2].total_seconds() <= LEASE_S, "lease from the given length"
    # A retry of an unknown outcome waits for the settle window it was given
    assert record(uow, retry, Transition(
        b.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 2, next_attempt_at=NOW,
        needs_reconcile=True, verdict="ambiguous", settle_window_s=SETTLE_S)) == 0
    again = claim_one(uow, b.entity_id, "t4")
    assert again.entities[0].needs_reconcile and not again.entities[0].settled


FULL_COUPON = Coupon(
    code="C1", series_id=1, capillary_id=981234567, description="10% off", discount_code="TEN",
    discount_type="PERC", discount_value=Decimal("10"), discount_upto=Decimal("250.5"),
    discount_on="BILL", valid_till=datetime(2027, 1, 31, tzinfo=UTC),
    valid_till_date_time=datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC),
    raw={"code": "C1", "id": 981234567, "discount": {"value": "10", "upto": 250.5}},
    warnings=("expiry capped to the series end",))


def test_an_outcome_stores_its_calls_history_coupons_and_entity_state(
    clean_ledger: Engine,
) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    started = NOW - timedelta(seconds=2)
    call = RecordedCall(CallInfo("bulk_issue", started, 12.5, 201, "req-1", "answered",
                                 EntryError("707", "invalid series", Verdict.PERMANENT)),
                        (a.entity_id, b.entity_id), (1, 2),
                        issue_ref="cw:x.1")
    with uow() as u:
        lost = u.ledger.record(claim, calls=[call], worker="w9", now=NOW, transitions=[
            Transition(a.entity_id, EntityState.ISSUED, "issued", 1, request_id="req-1",
                       coupon=FULL_COUPON),
            Transition(b.entity_id, EntityState.DEAD, "dead", 1, error_code="707",
                       error_message="invalid series", request_id="req-1",
                       dead_reason="permanent error", verdict="permanent"),
        ])
        assert lost == 0
        assert u.ledger.record(claim, calls=[], transitions=[], worker="w9", now=NOW) == 0
        u.commit()
    assert rows(clean_ledger, m.ApiCall, "event_id", "entity_ids", "series_ids", "operation",
                "request_id", "http_status", "latency_ms", "outcome", "error_code",
                "error_message", "started_at", "worker", "issue_ref") == [
        ("e-1", [a.entity_id, b.entity_id], [1, 2], "bulk_issue", "req-1", 201, 12.5,
         "answered", "707", "invalid series", started, "w9", "cw:x.1"),
    ]
    assert rows(clean_ledger, m.EntityHistory, "entity_id", "at", "kind", "state", "attempt",
                "error_code", "message", "request_id", "worker")[2:] == [
        (a.entity_id, NOW, "issued", "issued", 1, None, "coupon C1", "req-1", "w9"),
        (b.entity_id, NOW, "dead", "dead", 1, "707", "permanent error", "req-1", "w9"),
    ]
    assert rows(clean_ledger, m.IssuedCoupon, "entity_id", "code", "request_id", "issued_at",
                "recorded_via") == [(a.entity_id, "C1", "req-1", NOW, "issue")]
    # Every detail Capillary gave of the coupon is kept, in its own column and as it came
    assert rows(clean_ledger, m.IssuedCoupon, "event_id", "series_id", "customer_key",
                "capillary_coupon_id", "description", "discount_code", "discount_type",
                "discount_value", "discount_upto", "discount_on", "valid_till",
                "valid_till_date_time", "raw", "warnings") == [
        ("e-1", 1, "id:7", 981234567, "10% off", "TEN", "PERC", Decimal("10.0000"),
         Decimal("250.5000"), "BILL", FULL_COUPON.valid_till, FULL_COUPON.valid_till_date_time,
         FULL_COUPON.raw, ["expiry capped to the series end"])]
    assert rows(clean_ledger, m.Entity, "state", "issued_at", "dead_at", "dead_reason",
                "last_error_code", "last_error_message", "last_verdict", "last_request_id",
                "claim_token", "claimed_by", "lease_until", "needs_reconcile") == [
        ("issued", NOW, None, None, None, None, None, "req-1", None, None, None, False),
        ("dead", None, NOW, "permanent error", "707", "invalid series", "permanent", "req-1",
         None, None, None, False),
    ]


def test_a_deferred_attempt_is_given_back_and_history_says_why(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, _b = claim.entities
    later = NOW + timedelta(seconds=5)
    with uow() as u:
        u.ledger.record(claim, calls=[], worker="w", now=later, transitions=[Transition(
            a.entity_id, EntityState.RETRY_WAIT, "deferred", 1, next_attempt_at=later,
            error_message="circuit open", error_code="circuit_open", refund_attempt=True,
            needs_reconcile=True)])
        u.commit()
    assert rows(clean_ledger, m.Entity, "attempts", "updated_at", "next_attempt_at",
                "needs_reconcile")[0] == (0, later, later, True), "the attempt did not count"
    assert rows(clean_ledger, m.EntityHistory, "kind", "message", "error_code")[2:] == [
        ("deferred", "circuit open", "circuit_open")]


def lock_entity(engine: Engine, entity_id: int) -> Any:
    """Another transaction holding one entity's row lock (``.rollback()`` releases it)."""
    conn = engine.connect()
    conn.execute(select(m.Entity.id).where(m.Entity.id == entity_id).with_for_update())
    return conn


def test_an_event_claim_skips_locked_entities_and_other_events(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    with uow() as u:
        u.ledger.ingest(EVENT, source="bus", now=NOW)
        u.ledger.ingest(parse_event_data({"eventId": "e-2", "customer": {"id": "7"},
                                          "seriesIds": [3]}), source="bus", now=NOW)
        u.commit()
    ids = [r[0] for r in rows(clean_ledger, m.Entity, "id")]
    holder = lock_entity(clean_ledger, ids[0])
    try:
        with uow() as u:
            u.session.execute(text("SET LOCAL lock_timeout = '2s'"))
            claim = u.ledger.claim_event("e-1", token="t1", worker="w", now=NOW,
                                         lease_s=LEASE_S, settle_window_s=SETTLE_S)
            u.commit()
    finally:
        holder.rollback()
        holder.close()
    assert [e.entity_id for e in claim.entities] == [ids[1]], "skips the locked one, not e-2"
    assert all(e.settled and e.settles_in_s == 0.0 for e in claim.entities)


def test_a_retry_claim_waits_for_a_lock_and_takes_only_what_is_claimable(
    clean_ledger: Engine,
) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    later = NOW + timedelta(seconds=30)
    record(uow, claim, retry_wait(a.entity_id, NOW), retry_wait(b.entity_id, later))
    # Not due yet: not claimed
    with uow() as u:
        assert u.ledger.claim_entity(b.entity_id, token="x", worker="w", now=NOW,
                                     lease_s=LEASE_S, settle_window_s=SETTLE_S) is None
    # Queued by the sweeper: claimed at once, no longer queued, stamped with the claim's time
    with uow() as u:
        u.ledger.mark_queued([a.entity_id], now=NOW)
        u.commit()
    holder = lock_entity(clean_ledger, a.entity_id)
    threading.Timer(0.3, holder.rollback).start()
    try:
        retry = claim_one(uow, a.entity_id, "t2", now=later)  # waits for the lock
    finally:
        holder.close()
    assert rows(clean_ledger, m.Entity, "queued_at", "updated_at")[0] == (None, later)
    # A live claim is not taken again, although its retry was due
    with uow() as u:
        assert u.ledger.claim_entity(a.entity_id, token="t3", worker="w", now=later,
                                     lease_s=LEASE_S, settle_window_s=SETTLE_S) is None
    assert retry.entities[0].attempts == 2


def test_a_retry_claim_takes_an_abandoned_entity_to_reconcile(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow, now=real_now(), lease_s=SHORT_LEASE_S)
    outlive_short_lease()
    again = claim_one(uow, claim.entities[0].entity_id, "t2")
    assert again.entities[0].needs_reconcile and again.entities[0].attempts == 2
    # The dead worker's call may land for the settle window after its lease ran out
    assert not again.entities[0].settled
    assert SETTLE_S - 5 < again.entities[0].settles_in_s <= SETTLE_S


def test_an_entity_dead_again_after_a_replay_is_published_again(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, _b = claim.entities
    dead = Transition(a.entity_id, EntityState.DEAD, "dead", 1, error_code="707",
                      dead_reason="permanent error")
    record(uow, claim, dead)
    with uow() as u:
        u.ledger.mark_dead_letters_published(u.ledger.unpublished_dead_letters(limit=10),
                                             now=NOW)
        target = u.ledger.lock_target(a.entity_id)
        assert target is not None
        u.ledger.requeue_target(target, now=NOW, reset_attempts=True)
        u.commit()
    replayed = claim_one(uow, a.entity_id, "t2")
    record(uow, replayed, dead)
    with uow() as u:
        assert [r.id for r in u.ledger.unpublished_dead_letters(limit=10)] == [a.entity_id]


def test_an_outcome_without_an_error_keeps_the_last_one_known(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, _b = claim.entities
    record(uow, claim, Transition(a.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                                  next_attempt_at=NOW, verdict="retryable", error_code="730",
                                  error_message="unknown error", request_id="r1"))
    # A deferral says nothing new; an issue clears no error but has its own request
    second = claim_one(uow, a.entity_id, "t2")
    record(uow, second, Transition(a.entity_id, EntityState.RETRY_WAIT, "deferred", 2,
                                   next_attempt_at=NOW, refund_attempt=True))
    columns = ("last_verdict", "last_error_code", "last_error_message", "last_request_id")
    assert rows(clean_ledger, m.Entity, *columns)[0] == (
        "retryable", "730", "unknown error", "r1")
    third = claim_one(uow, a.entity_id, "t3")
    record(uow, third, Transition(a.entity_id, EntityState.ISSUED, "issued", 2,
                                  coupon=Coupon(code="C9", series_id=1), request_id="r3",
                                  error_code="ignored", error_message="ignored"))
    assert rows(clean_ledger, m.Entity, *columns)[0] == (
        "retryable", "730", "unknown error", "r3")
    # Issued when recorded, never dead
    assert rows(clean_ledger, m.Entity, "dead_at", "dead_reason", "issued_at")[0] == (
        None, None, NOW)


def test_a_resend_is_checked_again_only_after_its_verify_window(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    a, _b = claim.entities
    record(uow, claim, Transition(a.entity_id, EntityState.ISSUED, "issued", 1,
                                  coupon=Coupon(code="C1", series_id=1), verify_window_s=60))
    with uow() as u:
        assert u.ledger.take_verifications(now=NOW, limit=10, hold_s=LEASE_S) == []
    with clean_ledger.connect() as conn:
        wait = conn.execute(select(m.Entity.verify_after - func.now())
                            .where(m.Entity.id == a.entity_id)).scalar_one()
    assert 50 < wait.total_seconds() <= 60


def ingest_claim_rest(uow: UowFactory, claims: list[Claim]) -> Claim:
    """The second claim holds nothing (the first took both); split them for the race."""
    first = claims[0]
    return Claim(first.event_id, first.customer, first.customer_key, first.metadata,
                 first.issue_ref, first.token, first.entities[1:], {})


def test_racing_deliveries_of_a_new_event_claim_it_once(clean_ledger: Engine) -> None:
    # Given eight workers taking in the same new event at once
    uow = sql_unit_of_work_factory(clean_ledger)
    results: list[tuple[bool, Claim]] = []

    def take(n: int) -> None:
        with uow() as u:
            results.append(u.ledger.take_in(
                EVENT, source="bus", token=f"t{n}", worker=f"w{n}", now=NOW,
                lease_s=LEASE_S, settle_window_s=SETTLE_S))
            u.commit()

    # Then none failed, one stored the event and claimed both series, the others nothing
    assert all_at_once(8, take) == []
    assert sorted(new for new, _ in results) == [False] * 7 + [True]
    claimed = [e.entity_id for _, c in results for e in c.entities]
    assert len(claimed) == 2 and len(set(claimed)) == 2
    with clean_ledger.connect() as conn:
        assert conn.execute(select(func.count()).select_from(m.EntityHistory)).scalar() == 2


def test_a_coupon_code_too_long_to_index_is_recorded_cut_and_unique(
        clean_ledger: Engine) -> None:
    # Given an answer whose coupon codes are pages of text that do not compress
    uow = sql_unit_of_work_factory(clean_ledger)
    rng = random.Random(11)
    codes = ["".join(rng.choices(string.ascii_letters, k=10_000)) for _ in range(2)]
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    first, second = (parse_coupon({"code": code}, 1) for code in codes)
    # When both are recorded (one twice, as a read-back would record it again)
    assert record(uow, claim, Transition(a.entity_id, EntityState.ISSUED, "issued", 1,
                                         coupon=first),
                  Transition(b.entity_id, EntityState.ISSUED, "issued", 1,
                             coupon=second)) == 0
    # Then each is kept cut, distinct, and the same way every time
    assert first.code != second.code and len(first.code) == MAX_CODE_CHARS
    assert parse_coupon({"code": codes[0]}, 1).code == first.code
    assert first.code.startswith(codes[0][:150]) and first.raw["code"] == codes[0]
    with clean_ledger.connect() as conn:
        stored = conn.execute(text("SELECT code FROM coupons ORDER BY id")).scalars().all()
    assert stored == [first.code, second.code]


def test_every_entity_waiting_out_the_pause_becomes_due_when_it_ends_early(
        uow: UowFactory) -> None:
    # Given the entity whose own call opened the circuit (a 401: an outage verdict), and one
    # waiting after a 503 (not the circuit's pause)
    claim = ingest_and_claim(uow)
    a, b = claim.entities
    later = NOW + timedelta(minutes=10)
    record(uow, claim,
           Transition(a.entity_id, EntityState.RETRY_WAIT, "deferred", 1, verdict="outage",
                      next_attempt_at=later, error_code="http_401"),
           Transition(b.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                      verdict="retryable", next_attempt_at=later, error_code="503"))
    # When the pause ends early
    with uow() as u:
        assert u.ledger.resume_paused(now=NOW) == 1
        u.commit()
    # Then the circuit's entity is due, the 503's keeps its backoff
    with uow() as u:
        due = u.ledger.take_due(now=NOW + timedelta(seconds=1), limit=10)
    assert [d.entity_id for d in due] == [a.entity_id]


def test_a_retry_claim_hands_out_that_entity_as_the_ledger_holds_it(clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    # Series ids unlike the entities' ids and attempt counts, so no column can stand in for one
    other = parse_event_data({"eventId": "e-9", "customer": {"id": "7"}, "seriesIds": [31, 32]})
    with uow() as u:
        _new, claim = u.ledger.take_in(other, source="bus", token="t1", worker="w", now=NOW,
                                       lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    a, b = claim.entities
    record(uow, claim, retry_wait(a.entity_id, NOW), retry_wait(b.entity_id, NOW))
    retry = claim_one(uow, b.entity_id, "t2").entities[0]
    assert (retry.entity_id, retry.series_id, retry.attempts, retry.needs_reconcile) == (
        b.entity_id, 32, 2, False)
    assert retry.needs_reconcile is False and retry.settled
    assert retry.first_attempt_at == b.first_attempt_at
    # A retry that need not read back first says nothing more in its history
    assert rows(clean_ledger, m.EntityHistory, "kind", "state", "attempt", "worker",
                "message")[-1] == ("claimed", "in_flight", 2, "t2", None)
    # A coupon Capillary gave without warnings keeps none (not an empty list)
    assert record(uow, claim_one(uow, a.entity_id, "t3"), issued(a.entity_id, attempt=2)) == 0
    assert rows(clean_ledger, m.IssuedCoupon, "entity_id", "warnings") == [(a.entity_id, None)]


def test_a_pruned_event_taken_in_again_claims_nothing_and_says_pruned(
        clean_ledger: Engine) -> None:
    uow = sql_unit_of_work_factory(clean_ledger)
    claim = ingest_and_claim(uow)
    record(uow, claim, *(issued(e.entity_id, code=f"C{e.series_id}") for e in claim.entities))
    # What retention's prune leaves of a settled event: its row, without its entities
    ids = [e.entity_id for e in claim.entities]
    with clean_ledger.begin() as conn:
        for table in ("coupons", "entity_history", "entities"):
            column = "id" if table == "entities" else "entity_id"
            conn.execute(text(f"DELETE FROM {table} WHERE {column} = ANY(:ids)"),
                         {"ids": ids})
        conn.execute(text("UPDATE events SET pruned_at = now() WHERE event_id = 'e-1'"))
    with uow() as u:
        new, again = u.ledger.take_in(EVENT, source="bus", token="t2", worker="w", now=NOW,
                                      lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert (new, again.entities, again.skipped) == (False, (), {"pruned": 2})


# -- PostgreSQL only: the claim rule, written twice, claims alike ----------------------------
# A redelivery claims through ``hot_path.TAKE_IN`` (one statement with the intake), a claim of
# an event seen before through ``issuing._CLAIM_EVENT``: the same rule in two places, so the
# same ledger must come out of both, state by state.

_CLAIM_CASES = {
    # series: (state, lease_until, settles_at, needs_reconcile), relative to the claim (s)
    1: ("pending", None, None, False),
    2: ("in_flight", -30.0, None, False),  # abandoned: reconcile, settle after the lease
    3: ("in_flight", -30.0, 3600.0, False),  # abandoned, settling later than that already
    4: ("in_flight", 3600.0, None, False),  # held by a live worker
    5: ("retry_wait", None, None, True),
    6: ("queued", None, None, False),
    7: ("issued", None, None, False),
    8: ("dead", None, None, False),
}
_CLAIM_COLUMNS = ("series_id", "state", "attempts", "needs_reconcile", "claimed_by",
                  "queued_at", "first_attempt_at", "updated_at")


def _event_in_every_state(engine: Engine, event_id: str, at: datetime) -> LoyaltyEvent:
    event = parse_event_data({"eventId": event_id, "customer": {"id": "7"},
                              "seriesIds": sorted(_CLAIM_CASES)})
    with sql_unit_of_work_factory(engine)() as u:
        u.ledger.ingest(event, source="bus", now=at)
        u.commit()
    with engine.begin() as conn:
        # Straight to each state, past the state machine's trigger (this session only).
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for series, (state, lease_in, settles_in, reconcile) in _CLAIM_CASES.items():
            conn.execute(text(
                "UPDATE entities SET state = :state, attempts = 1, "
                "needs_reconcile = :reconcile, claim_token = 'old', claimed_by = 'old', "
                "first_attempt_at = :first, queued_at = :queued, "
                "lease_until = :at + make_interval(secs => :lease_in), "
                "settles_at = :at + make_interval(secs => :settles_in) "
                "WHERE event_id = :event_id AND series_id = :series"),
                {"state": state, "reconcile": reconcile, "first": at - timedelta(hours=1),
                 "queued": at if state == "queued" else None, "at": at,
                 "lease_in": lease_in, "settles_in": settles_in, "event_id": event_id,
                 "series": series})
    return event


def _claimed_rows(engine: Engine, event_id: str, at: datetime) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        found = conn.execute(text(
            f"SELECT {', '.join(_CLAIM_COLUMNS)}, "
            "claim_token IS NOT NULL AND claim_token <> 'old' AS newly_claimed, "
            "extract(epoch FROM settles_at - :at)::int AS settles_in_s, "
            "round(extract(epoch FROM lease_until - now()) / 60) AS lease_min "
            "FROM entities WHERE event_id = :event_id ORDER BY series_id"),
            {"event_id": event_id, "at": at})
        return [tuple(r) for r in found]


def _history(engine: Engine, event_id: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT e.series_id, h.kind, h.state, h.attempt, h.worker, h.message "
            "FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = :event_id ORDER BY e.series_id, h.id"),
            {"event_id": event_id})]


def test_a_redelivery_and_an_event_claim_follow_one_claim_rule(clean_ledger: Engine) -> None:
    at = real_now()
    redelivered = _event_in_every_state(clean_ledger, "by-take-in", at)
    _event_in_every_state(clean_ledger, "by-claim-event", at)
    uow = sql_unit_of_work_factory(clean_ledger)
    # When one event is delivered again and the other is claimed as an event seen before
    with uow() as u:
        new, by_take_in = u.ledger.take_in(
            redelivered, source="bus", token="t-a", worker="w", now=at, lease_s=LEASE_S,
            settle_window_s=SETTLE_S)
        u.commit()
    with uow() as u:
        by_claim = u.ledger.claim_event("by-claim-event", token="t-b", worker="w", now=at,
                                        lease_s=LEASE_S, settle_window_s=SETTLE_S)
        u.commit()
    assert not new
    # Then both claimed the same series, and hand them out alike
    def handed_out(claim: Claim) -> list[tuple[Any, ...]]:
        return [(e.series_id, e.attempts, e.needs_reconcile, e.first_attempt_at, e.settled,
                 round(e.settles_in_s / 60)) for e in claim.entities]

    assert [e.series_id for e in by_take_in.entities] == [1, 2, 3]
    assert handed_out(by_take_in) == handed_out(by_claim)
    # And left every row, and its history, alike
    assert _claimed_rows(clean_ledger, "by-take-in", at) == \
        _claimed_rows(clean_ledger, "by-claim-event", at)
    assert _history(clean_ledger, "by-take-in") == _history(clean_ledger, "by-claim-event")
    # And the rule is the one the docs give: the abandoned are read back first, settling no
    # sooner than a settle window after their lease ran out
    rows_ = {r[0]: r for r in _claimed_rows(clean_ledger, "by-take-in", at)}
    assert rows_[2][3] is True and rows_[2][-2] == int(-30 + SETTLE_S)
    assert rows_[3][-2] == 3600 and rows_[1][3] is False
    assert {s for s, r in rows_.items() if r[-3]} == {1, 2, 3}
