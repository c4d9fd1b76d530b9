"""The stricter sandbox (Capillary as it may really answer), and the worker reading it.

Each behaviour names the fact it models: the project's page on Capillary's API (Doc), or a
defensive assumption where the documentation is silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.sandbox import SandboxAdmin, SandboxOptions, SandboxState
from coupon_devtools.sandbox.records import BulkRequest
from worker.adapters.capillary.client import CapillaryClient
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import RetryAfterGate
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.model import HOLDS_ONE_CODES, Verdict
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import issue
from worker.usecases.deps import Deps

CUSTOMER = {"id": "566881933"}
META = {"notes": "[cw:0123456789abcdef]"}


@pytest.fixture
def client(settings: Settings, sandbox: SandboxAdmin) -> CapillaryClient:
    return CapillaryClient.from_settings(settings)


def test_a_series_allowing_one_coupon_per_customer_refuses_the_second_with_709(
        client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    # Doc: isMultipleVouchersPerUserAllowed=false refuses a second coupon (709)
    sandbox.set_series(31, isMultipleVouchersPerUserAllowed=False)
    assert client.bulk_issue(CUSTOMER, [31], META).entries[31].verdict is Verdict.ISSUED
    second = client.bulk_issue(CUSTOMER, [31], META).entries[31]
    assert second.verdict is Verdict.PERMANENT and second.error is not None
    assert second.error.code == "709" and "already has a coupon" in second.error.message
    assert second.error.code in HOLDS_ONE_CODES
    assert len(sandbox.ledger(series=31)) == 1


def test_max_vouchers_per_user_refuses_with_5002_which_reads_as_holding_one(
        client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    # Doc: maxVouchersPerUser (-1 no limit); 5002 max coupons per user exceeded
    sandbox.set_series(32, maxVouchersPerUser=2)
    for _ in range(2):
        assert client.bulk_issue(CUSTOMER, [32], META).entries[32].verdict is Verdict.ISSUED
    third = client.bulk_issue(CUSTOMER, [32], META).entries[32]
    assert third.error is not None and third.error.code == "5002"
    assert third.error.code in HOLDS_ONE_CODES


@pytest.mark.parametrize(("behaviour", "code"), [("inactive", "712"), ("invalid", "707")])
def test_inactive_and_unknown_series_are_refused_in_a_201_partial_answer(
        client: CapillaryClient, sandbox: SandboxAdmin, behaviour: str, code: str) -> None:
    sandbox.set_series(33, behaviour=behaviour)
    result = client.bulk_issue(CUSTOMER, [544770, 33], META)
    assert result.call.status == 201  # Doc: 201 one or more entities failed
    assert result.entries[544770].verdict is Verdict.ISSUED
    refused = result.entries[33]
    assert refused.verdict is Verdict.PERMANENT and refused.error and refused.error.code == code


def test_unconfigured_series_are_unknown_to_a_strict_series_sandbox(
        client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    sandbox.configure(strict_series=True)
    entry = client.bulk_issue(CUSTOMER, [424242], META).entries[424242]
    assert entry.error is not None and entry.error.code == "707"


def test_entries_come_shuffled_and_are_read_by_series(sandbox: SandboxAdmin,
                                                      client: CapillaryClient) -> None:
    # Defensive: nothing promises the entries come in the request's order
    assert sandbox.config()["shuffleEntries"] is True, "on by default in tests"
    series = list(range(100, 120))
    result = client.bulk_issue(CUSTOMER, series, META)
    assert all(result.entries[s].verdict is Verdict.ISSUED for s in series)
    truth = {c["seriesId"]: c["code"] for c in sandbox.ledger()}
    assert {s: e.coupon.code for s, e in result.entries.items() if e.coupon} == truth


def test_the_sandbox_shuffles_entries_only_when_asked() -> None:
    def order(shuffle: bool) -> list[int]:
        state = SandboxState(SandboxOptions(shuffle_entries=shuffle, seed=3))
        request = BulkRequest(series_ids=tuple(range(1, 30)), customer={"id": "1"},
                              customer_id="1", metadata={}, source=None)
        answer = state.issue_bulk(request, principal="p", request_id="r")
        return [e["entityId"] for e in answer.body["response"]]

    assert order(False) == list(range(1, 30))
    assert sorted(order(True)) == list(range(1, 30)) and order(True) != list(range(1, 30))


def test_read_backs_lag_the_write_when_configured() -> None:
    # Defensive: nothing documents how soon a read-back shows a coupon just issued
    now = [datetime(2026, 5, 12, 10, 0, tzinfo=UTC)]
    state = SandboxState(SandboxOptions(readback_lag_seconds=5.0), clock=lambda: now[0])
    request = BulkRequest(series_ids=(1,), customer={"id": "1"}, customer_id="1",
                          metadata={}, source=None)
    state.issue_bulk(request, principal="p", request_id="r")
    query = state.parse_readback("v2_coupon", {"issuedToIds": "1", "seriesId": "1"})
    assert state.answer_readback(query).body["data"] == []
    now[0] += timedelta(seconds=6)
    assert len(state.answer_readback(query).body["data"]) == 1


def test_a_read_back_lagging_the_write_shows_nothing_yet(
        client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    sandbox.configure(readback_lag_seconds=30)
    since = datetime.now(UTC) - timedelta(minutes=1)
    client.bulk_issue(CUSTOMER, [544770], META)
    assert client.find_coupons(CUSTOMER, 544770, since).coupons == ()
    sandbox.configure(readback_lag_seconds=0)
    assert len(client.find_coupons(CUSTOMER, 544770, since).coupons) == 1


def test_a_busy_customer_answers_521_and_is_unknown(client: CapillaryClient,
                                                    sandbox: SandboxAdmin) -> None:
    # Doc: 521 "multiple actions are running for the same customer, try later"
    sandbox.add_fault(kind="busy_521")
    entry = client.bulk_issue(CUSTOMER, [544770], META).entries[544770]
    assert entry.verdict is Verdict.AMBIGUOUS and entry.error and entry.error.code == "http_521"


def test_a_second_call_for_a_customer_still_being_served_answers_521(
        client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    # Given a sandbox that serves one action per customer at a time, and a first call that
    # takes a second to be served
    sandbox.configure(one_action_per_customer=True)
    sandbox.add_fault(kind="latency", delay_seconds=1.5, times=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(client.bulk_issue, CUSTOMER, [544770], META)
        deadline = time.monotonic() + 5
        while not any(f["applied"] for f in sandbox.faults()) and time.monotonic() < deadline:
            time.sleep(0.02)
        # When a second call for the same customer arrives meanwhile
        second = client.bulk_issue(CUSTOMER, [553379], META)
        # Then it is answered 521 and issues nothing; the first issues
        assert second.call.status == 521
        assert second.entries[553379].verdict is Verdict.AMBIGUOUS
        assert first.result().entries[544770].verdict is Verdict.ISSUED
    assert [c["seriesId"] for c in sandbox.ledger()] == [544770]
    # And another customer is never kept waiting by it
    assert client.bulk_issue({"id": "1"}, [553379], META).call.status == 200


# -- warnings, recorded with the coupon and shown -------------------------------------------


@pytest.fixture
def deps(settings: Settings, clean_ledger: Engine) -> Deps:
    uow = sql_unit_of_work_factory(clean_ledger)
    return Deps(
        uow=uow, api=CapillaryClient.from_settings(settings), publisher=FakePublisher(),
        limiter=RetryAfterGate(clean_ledger),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: datetime.now(UTC),
                            probe_timeout_s=60),
        retry_policy=RetryPolicy(), metrics=Metrics(), worker_id="test")


def test_warnings_are_recorded_with_the_coupon_and_shown(
    deps: Deps, clean_ledger: Engine, sandbox: SandboxAdmin,
    cli: Callable[..., Any],
) -> None:
    # Given a series whose coupons come with a warning (Doc: warnings[] per entry)
    sandbox.set_series(544770, warnings=["expiry capped to the series end"])
    event = parse_event_data({"eventId": "warned", "customer": CUSTOMER,
                              "seriesIds": [544770, 553379]})
    assert issue.issue_event(event, source="bus", deps=deps).issued == 2
    # Then the warning is stored with the coupon it came with, and only with it
    with clean_ledger.connect() as conn:
        rows = dict(conn.execute(text("SELECT series_id, warnings FROM coupons")).all())
    assert rows == {544770: ["expiry capped to the series end"], 553379: None}
    # And `events show` shows it
    shown = cli("events", "show", "warned")
    assert shown.exit_code == 0
    assert "expiry capped to the series end" in shown.output
