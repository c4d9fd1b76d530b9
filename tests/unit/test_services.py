"""The use cases with fakes of our own seams: in-memory ledger, fake Capillary, fake broker."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from coupon_devtools.fakes.capillary import CallFault, FakeCapillary, FakeIssued
from tests.unit.conftest import SETTLE_S, RecordingLimiter, World
from worker.adapters.capillary.api import BulkIssueResult, ReadBack
from worker.domain.errors import Ambiguous, CapillaryError, EventRejected, Outage
from worker.domain.events import LoyaltyEvent, parse_event_data
from worker.domain.model import EntityState
from worker.usecases.issue import issue_event
from worker.usecases.reconcile import RECONCILE_CLOCK_SKEW
from worker.usecases.sweep import sweep


def event(event_id: str = "e-1", series: tuple[int, ...] = (544770, 553379),
          **extra: object) -> LoyaltyEvent:
    return parse_event_data({"eventId": event_id, "customer": {"id": "566881933"},
                             "seriesIds": list(series), **extra})


def read_backs(world: World, purpose: str, outcome: str) -> float:
    """``capillary_read_backs_total`` for one purpose and outcome (0 when never counted)."""
    return world.deps.metrics.registry.get_sample_value(
        "capillary_read_backs_total", {"purpose": purpose, "outcome": outcome}) or 0.0


def test_an_event_issues_every_series_in_one_call(world: World) -> None:
    report = issue_event(event(), source="task", deps=world.deps)
    assert report.issued == 2 and report.new_event
    assert world.api.bulk_calls == [[544770, 553379]]
    assert len(world.state.coupons) == 2
    assert world.state.events["e-1"]["state"] == "completed"


def test_the_notes_carry_the_workers_reference(world: World) -> None:
    issue_event(event(metadata={"notes": "Gold"}), source="task", deps=world.deps)
    assert world.api.issued[0].notes.startswith("Gold [cw:")


def test_a_duplicate_delivery_calls_nothing(world: World) -> None:
    issue_event(event(), source="bus", deps=world.deps)
    again = issue_event(event(), source="task", deps=world.deps)
    assert not again.new_event and again.claimed == 0
    assert again.skipped == {"issued": 2}
    assert len(world.api.bulk_calls) == 1


def test_an_event_id_reused_for_other_content_is_rejected(world: World) -> None:
    issue_event(event(), source="bus", deps=world.deps)
    with pytest.raises(EventRejected, match="already used for a different event"):
        issue_event(event(series=(1,)), source="bus", deps=world.deps)


def test_partial_failure_records_successes_and_retries_only_the_failed(world: World) -> None:
    world.api.series_errors[553379] = 730
    report = issue_event(event(), source="task", deps=world.deps)
    assert (report.issued, report.retrying) == (1, 1)
    assert world.entity(553379).state is EntityState.RETRY_WAIT

    del world.api.series_errors[553379]
    world.clock.advance(5)
    world.sweep_and_retry()
    assert world.api.bulk_calls == [[544770, 553379], [553379]]
    assert world.state.events["e-1"]["state"] == "completed"


def test_a_permanent_error_goes_straight_to_dead(world: World) -> None:
    world.api.series_errors[553379] = 707
    report = issue_event(event(), source="task", deps=world.deps)
    assert report.dead == 1
    dead = world.entity(553379)
    assert dead.state is EntityState.DEAD and dead.last_error_code == "707"
    sweep(world.deps)
    assert [m["seriesId"] for m in world.publisher.dead_letters] == [553379]
    assert world.state.events["e-1"]["state"] == "failed"


def test_retries_end_in_dead_after_max_attempts(world: World) -> None:
    world.api.series_errors[544770] = 5005
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    for _ in range(3):
        world.clock.advance(10)
        world.sweep_and_retry()
    entity = world.entity(544770)
    assert entity.state is EntityState.DEAD
    assert entity.attempts == 3
    assert "gave up after 3 attempts" in (entity.dead_reason or "")


def test_timeout_after_issue_is_reconciled_not_reissued(world: World) -> None:
    world.api.fail_next("timeout_after_issue")
    report = issue_event(event(series=(544770,)), source="task", deps=world.deps)
    assert report.retrying == 1
    assert world.entity(544770).needs_reconcile

    world.clock.advance(5)
    world.sweep_and_retry()
    assert len(world.api.issued) == 1, "the coupon must not be issued twice"
    assert len(world.api.bulk_calls) == 1
    assert world.api.read_backs == 1
    assert world.entity(544770).state is EntityState.ISSUED
    assert world.entity(544770).history[-1] == "reconciled"
    assert read_backs(world, "reconcile", "ours") == 1


def test_a_coupon_stamped_by_a_capillary_clock_minutes_behind_ours_is_still_found(
    world: World,
) -> None:
    # Given Capillary's clock four minutes behind the worker's (inside the allowed skew)
    world.api.clock = lambda: world.clock.now - timedelta(minutes=4)
    world.api.fail_next("timeout_after_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    first_attempt = world.clock.now
    # When the unknown outcome is read back
    world.clock.advance(5)
    world.sweep_and_retry()
    # Then the coupon is found, not issued again, and the read-back looked no further back
    # than the skew allows (it would page through the customer's whole history)
    assert len(world.api.issued) == 1 and len(world.api.bulk_calls) == 1
    assert world.entity(544770).history[-1] == "reconciled"
    [since] = world.api.read_back_since
    assert first_attempt - 2 * RECONCILE_CLOCK_SKEW <= since <= first_attempt - timedelta(minutes=4)


def test_a_late_original_stamped_before_the_first_attempt_by_capillary_is_still_detected(
    world: World,
) -> None:
    # Given a slow original stamped by a Capillary clock behind ours, landing after the resend
    world.api.clock = lambda: world.clock.now - timedelta(minutes=4)
    world.api.fail_next("late_original")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(SETTLE_S + 5)
    world.sweep_and_retry()
    world.api.land_late()
    # When the check after the re-send reads back
    world.clock.advance(SETTLE_S + 1)
    # Then it finds the late original
    assert sweep(world.deps).duplicates == 1
    assert world.entity(544770).state is EntityState.DUPLICATE_ISSUED


def test_timeout_before_issue_is_sent_again_only_once_the_original_cannot_land(
    world: World,
) -> None:
    world.api.fail_next("timeout_before_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    # Given an early read-back that finds nothing, while the original may still land
    world.clock.advance(5)
    world.sweep_and_retry()
    # Then nothing is sent again, and no attempt is spent waiting
    assert world.api.read_backs == 1 and len(world.api.bulk_calls) == 1
    entity = world.entity(544770)
    assert entity.state is EntityState.RETRY_WAIT and entity.needs_reconcile
    assert entity.attempts == 1 and entity.history[-1] == "deferred"
    # When the settle window is over, a read-back that still finds nothing proves "not issued"
    world.clock.advance(SETTLE_S)
    world.sweep_and_retry()
    assert len(world.api.issued) == 1
    assert world.api.read_backs == 2 and len(world.api.bulk_calls) == 2
    assert world.entity(544770).state is EntityState.ISSUED


def test_a_resend_refused_as_one_per_customer_tells_support_of_the_unknown_attempt(
    world: World,
) -> None:
    # Given an attempt whose outcome stayed unknown, and a read-back that found nothing of ours
    world.api.fail_next("timeout_before_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(5 + SETTLE_S)
    # When the re-send is refused because the customer already holds a coupon of the series
    world.api.series_errors[544770] = 709
    world.sweep_and_retry()
    # Then the customer's coupons are read back (nothing there: the first attempt never
    # issued), and the dead letter says so, and tells of the unknown attempt
    assert world.api.read_backs == 2
    dead = world.entity(544770)
    assert dead.state is EntityState.DEAD and dead.last_error_code == "709"
    assert dead.dead_reason is not None
    assert "earlier attempt whose outcome stayed unknown" in dead.dead_reason
    assert "no coupon of this series" in dead.dead_reason
    # ...which a plain refusal, with no unknown attempt before it, does not
    world.api.series_errors[553379] = 709
    issue_event(event(event_id="e-2", series=(553379,)), source="task", deps=world.deps)
    plain = world.entity(553379)
    assert plain.state is EntityState.DEAD and plain.dead_reason is not None
    assert "unknown" not in plain.dead_reason


class LaggingReadBacks:
    """The fake Capillary, whose first ``lagging`` read-backs do not see recent coupons yet,
    and whose ``failing`` read-backs after those raise ``failure``."""

    def __init__(self, api: FakeCapillary, lagging: int, failing: int = 0,
                 failure: CapillaryError | None = None) -> None:
        self.api, self.lagging = api, lagging
        self.failing, self.failure = failing, failure or Ambiguous("read-back timed out")

    def bulk_issue(self, customer: dict[str, str], series_ids: list[int],
                   metadata: dict[str, str]) -> BulkIssueResult:
        return self.api.bulk_issue(customer, series_ids, metadata)

    def find_coupons(self, customer: dict[str, str], series_id: int,
                     since: datetime) -> ReadBack:
        if not self.lagging and self.failing:
            self.failing -= 1
            raise self.failure
        found = self.api.find_coupons(customer, series_id, since)
        if self.lagging:
            self.lagging -= 1
            return ReadBack(found.call, ())
        return found


def _resent_and_refused_as_holding_one(world: World, fault: CallFault,
                                       code: int = 5004) -> None:
    """An attempt whose answer was lost (``fault``: after or before issuing), its entity due
    again, and Capillary refusing the re-send: the customer already holds one (``code``)."""
    world.api.fail_next(fault)
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(5 + SETTLE_S)
    world.api.series_errors[544770] = code


@pytest.mark.parametrize("code", [709, 5002, 5004])
def test_already_holds_one_after_an_unknown_outcome_adopts_our_coupon(
    world: World, code: int,
) -> None:
    # Given an attempt that issued but whose answer was lost, and a read-back lagging the
    # write beyond the settle window
    world.deps.api = LaggingReadBacks(world.api, lagging=1)
    # When the re-send is refused: the customer already holds one
    _resent_and_refused_as_holding_one(world, "timeout_after_issue", code)
    world.sweep_and_retry()
    # Then the read-back that follows finds our coupon, and adopts it: issued, once
    entity = world.entity(544770)
    assert entity.state is EntityState.ISSUED and entity.dead_reason is None
    assert world.state.coupons[entity.id].code == world.api.issued[0].code
    assert len(world.api.issued) == 1 and world.api.read_backs == 2
    assert world.deps.metrics.registry.get_sample_value(
        "capillary_answer_remarks_total", {"kind": "holds_one_ours"}) == 1
    assert read_backs(world, "holds_one", "ours") == 1


def test_an_unknown_outcome_on_the_last_attempt_is_read_back_once_more_and_found(
    world: World,
) -> None:
    # Given three attempts (the world's limit) whose answers are lost; the last one issued
    world.api.fail_next("timeout_before_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    for fault in ("timeout_before_issue", "timeout_after_issue"):
        world.clock.advance(SETTLE_S + 5)
        world.api.fail_next(fault)
        world.sweep_and_retry()
    assert len(world.api.bulk_calls) == 3 and len(world.api.issued) == 1
    # When the sweeper comes back after the settle window
    world.clock.advance(SETTLE_S + 300)
    world.sweep_and_retry()
    # Then a last read-back finds the coupon: issued, no dead letter for support
    entity = world.entity(544770)
    assert entity.state is EntityState.ISSUED and entity.dead_reason is None
    assert world.state.coupons[entity.id].code == world.api.issued[0].code
    assert len(world.api.bulk_calls) == 3


def test_an_unknown_outcome_on_the_last_attempt_that_issued_nothing_is_dead_and_said_so(
    world: World,
) -> None:
    world.api.fail_next("timeout_before_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    for _ in range(2):
        world.clock.advance(SETTLE_S + 5)
        world.api.fail_next("timeout_before_issue")
        world.sweep_and_retry()
    world.clock.advance(SETTLE_S + 300)
    world.sweep_and_retry()
    # The last read-back shows nothing issued: dead, never sent a fourth time, and a replay
    # may send at once (nothing to read back first)
    entity = world.entity(544770)
    assert entity.state is EntityState.DEAD and entity.last_error_code == "not_issued"
    assert not entity.needs_reconcile
    assert entity.dead_reason is not None and "nothing of ours was issued" in entity.dead_reason
    assert len(world.api.bulk_calls) == 3 and world.api.issued == []
    assert read_backs(world, "reconcile", "absent") == 3


def test_a_holders_refusal_whose_read_back_fails_is_read_back_again_not_dead_lettered(
    world: World,
) -> None:
    # Given an attempt that issued but whose answer was lost, a read-back lagging the write
    # beyond the settle window, and the re-send refused: the customer already holds one
    world.deps.api = LaggingReadBacks(world.api, lagging=1, failing=1)
    _resent_and_refused_as_holding_one(world, "timeout_after_issue")
    # When the read-back of the customer's coupons that follows fails
    world.sweep_and_retry()
    # Then the entity waits to be read back again, not dead: Capillary failing a moment is
    # no reason to hand support a dead letter
    entity = world.entity(544770)
    assert entity.state is EntityState.RETRY_WAIT and entity.needs_reconcile
    assert entity.dead_reason is None and entity.last_error_code == "5004"
    assert read_backs(world, "holds_one", "failed") == 1
    # And the next attempt reads back first, finds our coupon and adopts it: issued once,
    # never sent a third time
    world.clock.advance(SETTLE_S + 60)
    world.sweep_and_retry()
    entity = world.entity(544770)
    assert entity.state is EntityState.ISSUED and entity.dead_reason is None
    assert world.state.coupons[entity.id].code == world.api.issued[0].code
    assert len(world.api.issued) == 1 and len(world.api.bulk_calls) == 2


def test_a_holders_read_back_failing_as_an_outage_tells_the_circuit(world: World) -> None:
    world.deps.api = LaggingReadBacks(world.api, lagging=1, failing=1,
                                      failure=Outage("read-back answered 503", status=503))
    _resent_and_refused_as_holding_one(world, "timeout_after_issue")
    world.sweep_and_retry()
    # An outage opens the circuit at once: the fleet stops reading back into it
    circuit = world.deps.circuit.state()
    assert circuit.state == "open" and circuit.reason == "read-back: read-back answered 503"
    entity = world.entity(544770)
    assert entity.state is EntityState.RETRY_WAIT and entity.needs_reconcile


def test_already_holds_one_after_an_unknown_outcome_names_the_customers_coupon(
    world: World,
) -> None:
    # Given an attempt whose outcome stayed unknown (nothing issued), and a customer who holds
    # a coupon of the series from elsewhere (a store, another campaign)
    world.api.issued.append(FakeIssued({"id": "566881933"}, 544770, "THEIRS01",
                                       "issued in store", world.clock()))
    _resent_and_refused_as_holding_one(world, "timeout_before_issue")
    world.sweep_and_retry()
    # Then the dead letter names the customer's coupon: support need not open Capillary
    dead = world.entity(544770)
    assert dead.state is EntityState.DEAD and dead.last_error_code == "5004"
    assert dead.dead_reason is not None and "THEIRS01" in dead.dead_reason
    assert "not ours" in dead.dead_reason and dead.needs_reconcile


def test_a_5xx_with_a_json_body_after_issuing_is_never_sent_again(world: World) -> None:
    world.api.fail_next("http_500_json_after_issue")
    report = issue_event(event(series=(544770,)), source="task", deps=world.deps)
    assert report.retrying == 1 and world.entity(544770).needs_reconcile
    world.clock.advance(5)
    world.sweep_and_retry()
    assert len(world.api.issued) == 1 and len(world.api.bulk_calls) == 1
    assert world.entity(544770).history[-1] == "reconciled"


def test_a_slow_original_that_lands_before_the_window_ends_is_found(world: World) -> None:
    world.api.fail_next("late_original")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(5)
    world.sweep_and_retry()  # absent for now: wait
    assert read_backs(world, "reconcile", "settling") == 1
    world.api.land_late()
    world.clock.advance(SETTLE_S)
    world.sweep_and_retry()
    assert len(world.api.issued) == 1 and len(world.api.bulk_calls) == 1
    assert world.entity(544770).state is EntityState.ISSUED
    assert read_backs(world, "reconcile", "ours") == 1


def test_a_late_original_landing_after_the_resend_is_detected_as_a_duplicate(
    world: World,
) -> None:
    # Given an original that lands later than the window allows for
    world.api.fail_next("late_original")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(SETTLE_S + 5)
    world.sweep_and_retry()
    entity = world.entity(544770)
    assert entity.state is EntityState.ISSUED and entity.verify_after is not None
    world.api.land_late()
    # When the check after the re-send runs
    world.clock.advance(SETTLE_S + 1)
    report = sweep(world.deps)
    # Then both coupons are recorded and the entity is flagged for a person
    assert (report.verified, report.duplicates) == (1, 1)
    entity = world.entity(544770)
    assert entity.state is EntityState.DUPLICATE_ISSUED and entity.verify_after is None
    assert len(world.state.extra_coupons[entity.id]) == 1
    assert world.deps.metrics.duplicates_issued._value.get() == 1
    assert read_backs(world, "verify", "duplicate") == 1
    assert sweep(world.deps).verified == 0, "checked once"


class QuotaSpent(RecordingLimiter):
    """The shared rate limit with its next read-back slot ``wait_s`` away."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s, self.reserved, self.cancelled = wait_s, [], []

    def reserve(self, name: str = "bulk_issue") -> float:
        self.reserved.append(name)
        return self.wait_s

    def cancel(self, name: str = "bulk_issue") -> None:
        self.cancelled.append(name)


def _resent_after_an_unknown_outcome(world: World) -> None:
    """An entity issued by a re-send after an unknown outcome, its verification due."""
    world.api.fail_next("timeout_before_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(SETTLE_S + 5)
    world.sweep_and_retry()
    world.clock.advance(SETTLE_S + 1)


def test_a_verification_waits_for_the_shared_rate_limit(world: World) -> None:
    # Given a verification due while the fleet's quota has no read-back slot for minutes
    _resent_after_an_unknown_outcome(world)
    before = world.api.read_backs
    world.deps.limiter = QuotaSpent(wait_s=600.0)
    # When the sweeper runs, Then it reads nothing back (the slot is handed back) and the
    # verification waits for the slot instead of calling Capillary over the quota
    assert sweep(world.deps).verified == 0
    assert world.api.read_backs == before
    assert world.deps.limiter.reserved == ["read_back"]
    assert world.deps.limiter.cancelled == ["read_back"]
    # And once the slot is there, it is verified
    world.deps.limiter = RecordingLimiter()
    world.clock.advance(601)
    assert sweep(world.deps).verified == 1
    assert world.entity(544770).history[-1] == "verified"


def test_a_verification_failing_as_an_outage_opens_the_circuit(world: World) -> None:
    _resent_after_an_unknown_outcome(world)
    world.deps.api = LaggingReadBacks(world.api, lagging=0, failing=1,
                                      failure=Outage("read-back answered 401", status=401))
    sweep(world.deps)
    circuit = world.deps.circuit.state()
    assert circuit.state == "open" and circuit.reason == "read-back: read-back answered 401"
    assert read_backs(world, "verify", "failed") == 1


def test_a_resend_without_late_original_is_verified_clean(world: World) -> None:
    _resent_after_an_unknown_outcome(world)
    assert sweep(world.deps).verified == 1
    entity = world.entity(544770)
    assert entity.state is EntityState.ISSUED and entity.verify_after is None
    assert entity.history[-1] == "verified"
    # proven absent after the window, sent again, then verified as ours alone
    assert read_backs(world, "reconcile", "absent") == 1
    assert read_backs(world, "verify", "ours") == 1


def test_an_unreadable_read_back_ends_dead_as_unknown_and_is_never_resent(
    world: World,
) -> None:
    world.api.fail_next("timeout_before_issue", "read_back_fails", "read_back_fails",
                        "read_back_fails")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    for _ in range(4):
        world.clock.advance(SETTLE_S)
        world.sweep_and_retry()
    entity = world.entity(544770)
    assert len(world.api.bulk_calls) == 1, "never sent again while the outcome is unknown"
    assert entity.state is EntityState.DEAD and entity.needs_reconcile
    assert entity.last_error_code == "unknown_outcome"
    assert (entity.dead_reason or "").startswith("unknown_outcome")


def test_bad_requests_do_not_open_the_circuit(world: World) -> None:
    world.api.fail_next(*["bad_request"] * 5)
    for n in range(5):
        issue_event(event(f"e-{n}", series=(n + 1,)), source="task", deps=world.deps)
    assert world.deps.circuit.state().state == "closed"
    assert all(e.state is EntityState.DEAD for e in world.state.entities.values())


def test_the_sweeper_repairs_events_left_processing(world: World) -> None:
    issue_event(event(), source="task", deps=world.deps)
    world.state.events["e-1"]["state"] = "processing"  # as an old race left it
    assert sweep(world.deps).events_repaired == 1
    assert world.state.events["e-1"]["state"] == "completed"


def test_a_failed_read_back_never_leads_to_an_issue(world: World) -> None:
    world.api.fail_next("timeout_before_issue", "read_back_fails")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    world.clock.advance(5)
    world.sweep_and_retry()
    assert len(world.api.bulk_calls) == 1
    assert world.entity(544770).needs_reconcile
    assert world.entity(544770).state is EntityState.RETRY_WAIT
    assert read_backs(world, "reconcile", "failed") == 1


def test_a_worker_that_died_mid_call_is_reconciled_after_its_lease(world: World) -> None:
    # Given a claim whose worker died after Capillary issued (nothing recorded)
    ev = event(series=(544770,))
    with world.deps.uow() as uow:
        uow.ledger.ingest(ev, source="bus", now=world.clock())
        claim = uow.ledger.claim_event("e-1", token="dead", worker="w", now=world.clock(),
                                       lease_s=60, settle_window_s=SETTLE_S)
        uow.commit()
    world.api.bulk_issue(claim.customer, [544770], {"notes": f"[{claim.issue_ref}.0a0b0c]"})
    # When the same message is redelivered while the lease is live, nothing is claimed
    assert issue_event(ev, source="bus", deps=world.deps).claimed == 0
    # Then, once the lease ran out, the sweeper schedules a reconciliation that finds the coupon
    world.clock.advance(61)
    world.sweep_and_retry()
    world.clock.advance(5)
    world.sweep_and_retry()
    assert world.entity(544770).state is EntityState.ISSUED
    assert len(world.api.issued) == 1


def test_an_auth_failure_opens_the_circuit_and_defers_without_spending_attempts(
    world: World,
) -> None:
    world.api.fail_next("unauthorized")
    report = issue_event(event(series=(544770,)), source="task", deps=world.deps)
    assert report.deferred == 1 and report.dead == 0
    assert world.entity(544770).attempts == 0
    assert world.deps.circuit.state().state == "open"

    # While open, a new event is taken in and deferred without calling Capillary.
    second = issue_event(event("e-2", series=(553379,)), source="task", deps=world.deps)
    assert second.deferred == 1 and len(world.api.bulk_calls) == 1
    assert sweep(world.deps).dispatched == 0

    # After the pause one probe goes; its success closes the circuit.
    world.clock.advance(40)
    world.sweep_and_retry()
    assert len(world.api.bulk_calls) == 2
    assert world.deps.circuit.state().state == "closed"
    world.clock.advance(10)
    world.sweep_and_retry()
    assert all(e.state is EntityState.ISSUED for e in world.state.entities.values())


def test_a_run_of_transport_failures_opens_the_circuit(world: World) -> None:
    world.api.fail_next("refused", "refused", "refused")
    for n in range(3):
        issue_event(event(f"e-{n}", series=(n + 1,)), source="task", deps=world.deps)
    assert world.deps.circuit.state().state == "open"
    assert not any(e.state is EntityState.DEAD for e in world.state.entities.values())


def test_a_429_defers_refunds_the_attempt_and_slows_the_limiter(world: World) -> None:
    world.api.fail_next("rate_limited")
    report = issue_event(event(series=(544770,)), source="task", deps=world.deps)
    assert report.deferred == 1
    assert world.entity(544770).attempts == 0
    assert world.limiter.penalties == [2.0]
    assert world.deps.circuit.state().consecutive_failures == 0


def _open_circuit(world: World) -> None:
    from worker.adapters.postgres.records import CircuitState

    with world.deps.uow() as uow:
        uow.ledger.save_circuit("capillary", CircuitState(
            "open", 3, 1, world.clock() + timedelta(seconds=30), "http_503"), now=world.clock())
        uow.commit()


def test_a_probe_that_only_reads_back_closes_the_circuit(world: World) -> None:
    # Given an entity whose call timed out after Capillary issued, and then an open circuit
    world.api.fail_next("timeout_after_issue")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    _open_circuit(world)
    # When, after the pause, that entity is the probe and its read-back finds the coupon
    world.clock.advance(40)
    world.sweep_and_retry()
    # Then the circuit closes at once, rather than staying half-open until the probe's
    # timeout (a whole lease, during which the fleet calls nothing)
    assert world.entity(544770).state is EntityState.ISSUED
    assert len(world.api.bulk_calls) == 1
    assert world.deps.circuit.state().state == "closed"


def test_a_probe_whose_read_back_fails_reopens_the_circuit(world: World) -> None:
    world.api.fail_next("timeout_after_issue", "read_back_fails")
    issue_event(event(series=(544770,)), source="task", deps=world.deps)
    _open_circuit(world)
    world.clock.advance(40)
    world.sweep_and_retry()
    assert world.api.read_backs == 1
    assert world.deps.circuit.state().state == "open"
    assert world.entity(544770).needs_reconcile


def test_no_sleep_when_the_rate_limit_slot_is_now(world: World) -> None:
    # Given no rate limit to wait for (the slot is now), and a sleep that records its calls
    slept: list[float] = []
    world.deps.sleep = slept.append
    # When an event is issued
    issue_event(event(), source="bus", deps=world.deps)
    # Then it issued without calling sleep at all
    assert world.api.bulk_calls == [[544770, 553379]] and slept == []


def test_many_series_are_split_into_calls_each_committed_before_the_next(world: World) -> None:
    # Given calls of at most two series, and an event of five
    world.deps.max_series_per_call = 2
    seen: list[list[str]] = []
    real_issue = world.api.bulk_issue

    def bulk_issue(customer: dict[str, str], series_ids: list[int],
                   metadata: dict[str, str]) -> BulkIssueResult:
        seen.append(sorted(e.state.value for e in world.state.entities.values()))
        return real_issue(customer, series_ids, metadata)

    world.api.bulk_issue = bulk_issue  # type: ignore[method-assign]
    report = issue_event(event(series=(1, 2, 3, 4, 5)), source="task", deps=world.deps)
    # Then three calls, and each sees the earlier calls' series already recorded as issued
    assert world.api.bulk_calls == [[1, 2], [3, 4], [5]]
    assert seen == [["in_flight"] * 5, ["in_flight"] * 3 + ["issued"] * 2,
                    ["in_flight"] + ["issued"] * 4]
    assert report.issued == 5 and report.claimed == 5


def test_an_outage_in_one_call_defers_the_series_of_the_calls_not_sent(world: World) -> None:
    world.deps.max_series_per_call = 2
    world.api.series_errors[2] = 788  # invalid configuration: the fleet pauses
    report = issue_event(event(series=(1, 2, 3, 4)), source="task", deps=world.deps)
    assert world.api.bulk_calls == [[1, 2]], "no call while the circuit is open"
    assert world.entity(1).state is EntityState.ISSUED
    assert all(world.entity(s).state is EntityState.RETRY_WAIT for s in (2, 3, 4))
    assert all(world.entity(s).attempts == 0 for s in (3, 4)), "deferred: no attempt spent"
    assert report.deferred == 3
