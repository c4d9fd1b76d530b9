"""Read-backs failing through an outage of Capillary's search, on the real ledger, the real
client and the sandbox: the unknown outcome waits the outage out, the circuit hears of it, and
the coupon Capillary issued is found and recorded, not dead-lettered."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.sandbox import SandboxAdmin
from worker.adapters.capillary.client import CapillaryClient
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps
from worker.usecases.sweep import sweep

SERIES = 544770


class Clock:
    """The worker's clock, moved by the test (the ledger is told the time by it)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _deps(settings: Settings, clean_ledger: Engine, clock: Clock, publisher: FakePublisher,
          *, settle_window_s: float = 60) -> Deps:
    uow = sql_unit_of_work_factory(clean_ledger)
    return Deps(
        uow=uow, api=CapillaryClient.from_settings(settings), publisher=publisher,
        limiter=RetryAfterGate(clean_ledger),
        circuit=CircuitGate(uow, CircuitPolicy(failure_threshold=3, open_s=5), clock=clock,
                            probe_timeout_s=60, cache_s=0),
        # Three attempts, a floor of 64 s (settle window + backoff cap) for the unknown outcome
        retry_policy=RetryPolicy(max_attempts=3, base_s=1, max_s=4, reconcile_delay_s=1,
                                 settle_window_s=settle_window_s),
        metrics=Metrics(), worker_id="test", clock=clock, sleep=lambda _s: None,
        rng=random.Random(3))


def _run_for(deps: Deps, clock: Clock, publisher: FakePublisher, seconds: int, *,
             real_s: float = 0.0) -> bool:
    """The sweeper and the retries, every second of ``seconds``; whether the circuit opened.
    ``real_s``: real time let pass each second, for the settle windows (the database's
    clock)."""
    opened = False
    for _ in range(seconds):
        time.sleep(real_s)
        clock.now += timedelta(seconds=1)
        publisher.retries.clear()
        sweep(deps)
        for entity_id in list(publisher.retries):
            issue.retry_entity(entity_id, deps=deps)
        opened = opened or deps.circuit.state(fresh=True).state == "open"
    return opened


def _entity(clean_ledger: Engine) -> tuple[str, str | None, bool, str | None, str | None]:
    with clean_ledger.connect() as conn:
        row = conn.execute(text(
            "SELECT e.state, e.last_error_code, e.needs_reconcile, c.code, c.recorded_via "
            "FROM entities e LEFT JOIN coupons c ON c.entity_id = e.id")).one()
    return row[0], row[1], row[2], row[3], row[4]


def _issued_once_and_found_by_a_read_back(clean_ledger: Engine, sandbox: SandboxAdmin) -> None:
    truth = sandbox.ledger(series=SERIES)
    assert len(truth) == 1, "issued once, never sent again"
    state, _error, _reconcile, code, via = _entity(clean_ledger)
    assert (state, code, via) == ("issued", truth[0]["code"], "reconcile")


def test_an_unknown_outcome_waits_out_failing_read_backs_and_finds_its_coupon(
        settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin) -> None:
    clock, publisher = Clock(), FakePublisher()
    deps = _deps(settings, clean_ledger, clock, publisher)
    # Given a bulk call that issued and then answered an empty 500 (the outcome is unknown),
    # and Capillary's search answering the next four read-backs with a gateway's 503
    sandbox.add_fault(kind="error_after", status=500, path="bulk")
    sandbox.add_fault(kind="error_before", status=503, path="readback", times=4)
    event = parse_event_data({"eventId": "search-down", "customer": {"id": "566881933"},
                              "seriesIds": [SERIES]})
    issue.issue_event(event, source="bus", deps=deps)
    # When the sweeper and the retries run every second
    opened = _run_for(deps, clock, publisher, 90)
    # Then every failing read-back was made (twice the entity's attempts would have allowed
    # before), they opened the circuit, and the read-back after them found the coupon
    assert [f["applied"] for f in sandbox.faults() if f["path"] == "readback"] == [4]
    assert opened and deps.circuit.state(fresh=True).state == "closed"
    _issued_once_and_found_by_a_read_back(clean_ledger, sandbox)


def _issue_with_short_windows(settings: Settings, clean_ledger: Engine, event_id: str,
                              customer: str) -> None:
    """Issue one event, then run the sweeper and the retries for two minutes of the worker's
    clock, with settle windows of 0.3 s (on the database's clock: real time is let pass)."""
    clock, publisher = Clock(), FakePublisher()
    deps = _deps(settings, clean_ledger, clock, publisher, settle_window_s=0.3)
    event = parse_event_data({"eventId": event_id, "customer": {"id": customer},
                              "seriesIds": [SERIES]})
    issue.issue_event(event, source="bus", deps=deps)
    _run_for(deps, clock, publisher, 120, real_s=0.05)


def test_the_last_attempts_unknown_outcome_is_read_back_before_it_is_given_up(
        settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin) -> None:
    # Given every one of the three attempts answered by an empty 500 (its outcome unknown):
    # the first two before issuing, the last after
    sandbox.add_fault(kind="error_before", status=500, path="bulk", times=2)
    sandbox.add_fault(kind="error_after", status=500, path="bulk")
    # When the event is issued, and the sweeper and the retries run past every settle window
    _issue_with_short_windows(settings, clean_ledger, "last-unknown", "566881934")
    # Then the read-back after the last attempt found its coupon: issued once, never sent a
    # fourth time, and no dead letter for support
    assert [f["applied"] for f in sandbox.faults() if f["path"] == "bulk"] == [2, 1]
    _issued_once_and_found_by_a_read_back(clean_ledger, sandbox)


def test_the_last_attempts_unknown_outcome_that_issued_nothing_is_dead_and_safe_to_resend(
        settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin) -> None:
    sandbox.add_fault(kind="error_before", status=500, path="bulk", times=3)
    _issue_with_short_windows(settings, clean_ledger, "last-absent", "566881935")
    # The read-back after the last attempt proves nothing was issued: dead as not_issued,
    # which a replay sends again without reading back first
    assert sandbox.ledger(series=SERIES) == []
    assert [f["applied"] for f in sandbox.faults() if f["path"] == "bulk"] == [3]
    assert _entity(clean_ledger)[:3] == ("dead", "not_issued", False)
