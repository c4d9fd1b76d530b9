"""Capillary as it really answers, through the use cases on the real ledger and the sandbox.

One reading of an answer whatever its status: entries speak per series in a 4xx as in a 201,
an entry with a coupon is issued (recorded once, never re-sent), the status decides only for
series with no readable entry.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.sandbox import SandboxAdmin
from worker.adapters.capillary.client import CapillaryClient
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.model import Verdict
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps
from worker.usecases.support import SupportDeps, replay_event

CUSTOMER = {"id": "566881933"}
ISSUED_SERIES, REFUSED_SERIES = 544770, 700712


@pytest.fixture
def deps(settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin) -> Deps:
    uow = sql_unit_of_work_factory(clean_ledger)
    return Deps(
        uow=uow, api=CapillaryClient.from_settings(settings), publisher=FakePublisher(),
        limiter=RetryAfterGate(clean_ledger),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                            probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")


def entities(engine: Engine) -> dict[int, tuple[str, str | None, str | None]]:
    with engine.connect() as conn:
        return {row[0]: (row[1], row[2], row[3]) for row in conn.execute(text(
            "SELECT e.series_id, e.state, e.last_error_code, c.code FROM entities e "
            "LEFT JOIN coupons c ON c.entity_id = e.id"))}


def test_a_400_whose_entries_say_issued_and_refused_records_the_issued_one_once(
    deps: Deps, clean_ledger: Engine, sandbox: SandboxAdmin,
) -> None:
    # Given Capillary (or a gateway before it) answering 400 with per-entry results: one
    # series issued, one refused (expired)
    sandbox.set_series(REFUSED_SERIES, behaviour="expired")
    sandbox.add_fault(kind="status_after", status=400)
    event = parse_event_data({"eventId": "four-hundred", "customer": CUSTOMER,
                              "seriesIds": [ISSUED_SERIES, REFUSED_SERIES]})
    # When the event is issued
    report = issue.issue_event(event, source="bus", deps=deps)
    # Then the issued entry is recorded as issued, with the coupon Capillary gave, and the
    # refused one is dead with its own code
    truth = sandbox.ledger(series=ISSUED_SERIES)
    assert len(truth) == 1 and report.issued == 1 and report.dead == 1
    assert entities(clean_ledger) == {
        ISSUED_SERIES: ("issued", None, truth[0]["code"]),
        REFUSED_SERIES: ("dead", "712", None),
    }
    # And an operator sees the odd answer in the metrics
    assert deps.metrics.registry.get_sample_value(
        "capillary_answer_remarks_total", {"kind": "entries_in_error_status"}) == 2
    # And a replay of the event re-sends only the refused series, never the issued one
    sandbox.set_series(REFUSED_SERIES, behaviour="valid")
    support = SupportDeps(uow=deps.uow, publisher=deps.publisher,
                          clock=lambda: datetime.now(UTC), sleep=lambda _s: None)
    replayed = replay_event("four-hundred", reason="series renewed", operator="ana",
                            deps=support)
    assert len(replayed) == 1
    publisher = deps.publisher
    assert isinstance(publisher, FakePublisher)
    for entity_id in publisher.retries:
        issue.retry_entity(entity_id, deps=deps)
    bulk_calls = [c for c in sandbox.calls() if c["path"] == "bulk"]
    assert [c["seriesIds"] for c in bulk_calls] == [[ISSUED_SERIES, REFUSED_SERIES],
                                                    [REFUSED_SERIES]]
    assert len(sandbox.ledger(series=ISSUED_SERIES)) == 1, "the issued series is never re-sent"
    state = entities(clean_ledger)
    assert state[ISSUED_SERIES] == ("issued", None, truth[0]["code"])
    assert state[REFUSED_SERIES][0] == "issued"


def test_a_configuration_code_in_a_4xx_body_pauses_instead_of_dead_lettering(
    deps: Deps, clean_ledger: Engine, sandbox: SandboxAdmin,
) -> None:
    # Given a 400 whose entry carries a configuration error (788)
    sandbox.set_series(ISSUED_SERIES, behaviour="error", error_code=788,
                       error_message="Invalid configuration, report to support")
    sandbox.add_fault(kind="status_after", status=400)
    event = parse_event_data({"eventId": "config-400", "customer": CUSTOMER,
                              "seriesIds": [ISSUED_SERIES]})
    report = issue.issue_event(event, source="bus", deps=deps)
    # Then nothing is dead-lettered: the entity waits, and the circuit is open
    assert report.dead == 0 and report.deferred == 1
    assert entities(clean_ledger)[ISSUED_SERIES][0] == "retry_wait"
    assert deps.circuit.state(fresh=True).state == "open"


def test_entries_in_a_4xx_are_read_per_series(settings: Settings, sandbox: SandboxAdmin) -> None:
    sandbox.set_series(REFUSED_SERIES, behaviour="expired")
    sandbox.add_fault(kind="status_after", status=422)
    result = CapillaryClient.from_settings(settings).bulk_issue(
        CUSTOMER, [ISSUED_SERIES, REFUSED_SERIES], {"notes": "[cw:0]"})
    assert not result.call_level_failure
    assert result.entries[ISSUED_SERIES].verdict is Verdict.ISSUED
    refused = result.entries[REFUSED_SERIES]
    assert refused.verdict is Verdict.PERMANENT and refused.error and refused.error.code == "712"


def test_an_event_with_more_series_than_a_call_takes_is_issued_in_several_calls(
    deps: Deps, clean_ledger: Engine, sandbox: SandboxAdmin,
) -> None:
    # Given calls of at most 100 series, and an event of 250
    deps.max_series_per_call = 100
    series = list(range(1000, 1250))
    event = parse_event_data({"eventId": "many-series", "customer": CUSTOMER,
                              "seriesIds": series})
    # When it is issued
    report = issue.issue_event(event, source="bus", deps=deps)
    # Then three calls issue every series once, each call recorded with its own series
    assert report.issued == 250
    bulk_calls = [c["seriesIds"] for c in sandbox.calls() if c["path"] == "bulk"]
    assert bulk_calls == [series[:100], series[100:200], series[200:]]
    assert sorted(c["seriesId"] for c in sandbox.ledger()) == series
    with clean_ledger.connect() as conn:
        calls = conn.execute(text(
            "SELECT cardinality(series_ids) FROM api_calls WHERE operation = 'bulk_issue' "
            "ORDER BY id")).scalars().all()
        states = conn.execute(text("SELECT state, count(*) FROM entities GROUP BY state")).all()
        event_state = conn.execute(text("SELECT state FROM events")).scalar()
    assert calls == [100, 100, 50]
    assert states == [("issued", 250)] and event_state == "completed"
