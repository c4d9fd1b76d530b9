"""What the circuit hears from a read-back, and how long an open circuit holds entities."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.domain.model import Verdict
from worker.domain.policy import CircuitPolicy

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def test_entities_wait_until_the_circuit_half_opens() -> None:
    assert CircuitPolicy.wait_while_open(NOW + timedelta(seconds=42), NOW) == timedelta(
        seconds=42)


@pytest.mark.parametrize("open_until", [None, NOW - timedelta(seconds=5)])
def test_a_circuit_already_due_to_half_open_holds_nothing(open_until: datetime | None) -> None:
    assert CircuitPolicy.wait_while_open(open_until, NOW) == timedelta(0)


@pytest.mark.parametrize("probe", [True, False])
def test_an_outage_is_a_failure_whoever_read_back(probe: bool) -> None:
    assert CircuitPolicy.after_failed_read_back(Verdict.OUTAGE, None, probe=probe) == "failure"


@pytest.mark.parametrize(("verdict", "status", "told"), [
    (Verdict.AMBIGUOUS, 502, "failure"),      # the gateway: Capillary's health
    (Verdict.AMBIGUOUS, None, "failure"),     # a reset or a read timeout
    (Verdict.AMBIGUOUS, 200, "success"),      # an unreadable page from a server that answered
    (Verdict.PERMANENT, 404, "success"),      # a 4xx is about the request, not the server
])
def test_a_probe_always_settles_the_circuit(verdict: Verdict, status: int | None,
                                            told: str) -> None:
    assert CircuitPolicy.after_failed_read_back(verdict, status, probe=True) == told


@pytest.mark.parametrize(("verdict", "status"), [
    (Verdict.AMBIGUOUS, 502), (Verdict.AMBIGUOUS, 503), (Verdict.AMBIGUOUS, None),
    (Verdict.RETRYABLE, None)])
def test_a_read_back_failing_for_capillarys_health_counts_probe_or_not(
        verdict: Verdict, status: int | None) -> None:
    # An outage seen only through read-backs must open the circuit, as failed calls would.
    assert CircuitPolicy.after_failed_read_back(verdict, status, probe=False) == "failure"
    assert CircuitPolicy.after_failed_read_back(verdict, status, probe=True) == "failure"


@pytest.mark.parametrize(("verdict", "status"), [
    (Verdict.AMBIGUOUS, 200), (Verdict.AMBIGUOUS, 429), (Verdict.PERMANENT, 404)])
def test_a_read_back_failing_for_its_own_request_tells_an_ordinary_circuit_nothing(
        verdict: Verdict, status: int | None) -> None:
    assert CircuitPolicy.after_failed_read_back(verdict, status, probe=False) == "nothing"
