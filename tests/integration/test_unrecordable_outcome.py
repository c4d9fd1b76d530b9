"""An outcome PostgreSQL refuses, for a reason nobody foresaw, ends in a dead letter.

The refusal here is a trigger of the test's own that raises for one customer's coupons: a
stand-in for any constraint, trigger or value the database rejects every time. Without the
safety net the entity stayed in flight, came back through its lease, was read back and failed
to record again, for ever.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.unit_of_work import SqlUnitOfWork
from worker.domain.events import parse_event_data
from worker.domain.policy import OUTCOME_UNRECORDABLE, CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps

REFUSED_CUSTOMER = "990000001"


@pytest.fixture
def refusing_coupons(clean_ledger: Engine) -> Iterator[Engine]:
    """The ledger, refusing every coupon of ``REFUSED_CUSTOMER`` with an error of its own."""
    with clean_ledger.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION test_refuse_coupon() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused by the test for %', NEW.code; END $$"""))
        conn.execute(text(f"""
            CREATE TRIGGER test_refuse_coupon BEFORE INSERT ON coupons FOR EACH ROW
            WHEN (NEW.customer_key = 'id:{REFUSED_CUSTOMER}')
            EXECUTE FUNCTION test_refuse_coupon()"""))
    yield clean_ledger
    with clean_ledger.begin() as conn:
        conn.execute(text("DROP TRIGGER test_refuse_coupon ON coupons"))
        conn.execute(text("DROP FUNCTION test_refuse_coupon()"))


def test_a_refused_outcome_is_a_dead_letter_with_what_capillary_answered(
        refusing_coupons: Engine) -> None:
    engine = refusing_coupons

    def uow() -> SqlUnitOfWork:
        return SqlUnitOfWork(engine.connect, engine)

    api = FakeCapillary()
    deps = Deps(
        uow=uow, api=api, publisher=FakePublisher(), limiter=RetryAfterGate(engine),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                            probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")
    event = parse_event_data({"eventId": "refused-1", "customer": {"id": REFUSED_CUSTOMER},
                              "seriesIds": [544770]})
    # When Capillary issues the coupon and the ledger refuses to store it
    report = issue.issue_event(event, source="bus", deps=deps)
    # Then the task ends normally, the entity dead-lettered rather than left in flight
    assert (report.issued, report.dead) == (0, 1)
    (code,) = [i.code for i in api.issued]
    with engine.connect() as conn:
        entity = conn.execute(text(
            "SELECT state, last_error_code, needs_reconcile, dead_reason, claim_token, "
            "dead_published_at FROM entities")).one()
        history = conn.execute(text(
            "SELECT kind FROM entity_history ORDER BY id")).scalars().all()
        coupons = conn.execute(text("SELECT count(*) FROM coupons")).scalar_one()
        event_state = conn.execute(text("SELECT state FROM events")).scalar_one()
    assert entity.state == "dead" and entity.last_error_code == OUTCOME_UNRECORDABLE
    # ...replayed only after a read-back, the reason naming the coupon and the refusal
    assert entity.needs_reconcile and entity.claim_token is None
    assert f"coupon {code}" in entity.dead_reason
    assert f"refused by the test for {code}" in entity.dead_reason
    assert entity.dead_published_at is None, "to be announced on the dead-letter queue"
    assert history == ["claimed", "dead"]
    assert coupons == 0 and event_state == "failed"
    assert len(api.bulk_calls) == 1
