"""Property-based tests over generated Capillary answers (any status, any mix of entries,
shuffled, repeated, missing, malformed): no answer crashes the parser, every entity ends in
exactly one state, an entity whose entry carries a coupon is issued (never retried,
dead-lettered or replayed without a read-back), and, over an event's whole life (sweeps,
retries, read-backs that show what Capillary really issued, hidden coupons included), no
series is ever issued twice."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.ledger import fake_unit_of_work_factory
from worker.adapters.capillary.answers import parse_bulk_answer
from worker.adapters.capillary.api import (
    BulkIssueResult,
    CallInfo,
    EntryOutcome,
    FoundCoupon,
    ReadBack,
)
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.ratelimit import Unlimited
from worker.domain.events import parse_event_data
from worker.domain.model import CAPILLARY_CODES, ISSUED_STATES, Coupon, EntityState, Verdict
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.domain.verdicts import classify_unanswered
from worker.metrics import Metrics
from worker.usecases.deps import Deps
from worker.usecases.issue import issue_event, retry_entity
from worker.usecases.sweep import sweep

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
STATUSES = [200, 201, 207, 302, 400, 401, 404, 408, 409, 422, 429, 500, 502, 503, 521]
CODES: list[object] = [*CAPILLARY_CODES, 999, 400, None]
PROPERTIES = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6),
                         st.text(max_size=8), st.floats(allow_nan=False))
error_items = st.one_of(
    st.builds(lambda c, m, s: {"status": False, "code": s(c), "message": m},
              st.sampled_from(CODES), st.text(max_size=20),
              st.sampled_from([lambda c: c, str])),
    st.builds(lambda c, m: f"{c}: {m}", st.sampled_from(CODES), st.text(max_size=10)),
    json_scalars,
)
dates = st.one_of(st.none(), st.sampled_from([
    "2026-06-11", "2026-06-11T00:00:00Z", "2026-06-11T05:30:00+05:30",
    "2026-06-11 23:59:59", "2026-06-11T00:00:00", "11/06/2026", "", "2026-13-45",
]), json_scalars)
warnings_ = st.one_of(st.none(), st.lists(st.one_of(
    st.text(max_size=10), st.fixed_dictionaries({"code": st.integers(1, 9999),
                                                 "message": st.text(max_size=10)}),
    json_scalars), max_size=3))


@dataclass
class Answer:
    series_ids: list[int]
    status: int
    body: object
    #: The coupon codes the generated entries carry for each requested series.
    coupons: dict[int, set[str]] = field(default_factory=dict)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    series_ids = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5, unique=True))
    status = draw(st.sampled_from(STATUSES))
    if draw(st.integers(0, 4)) == 0:
        # Not an answer at all: a scalar, a list, an object without entries (its call-level
        # errors often a configuration code).
        config = st.builds(lambda c: {"code": c, "message": "invalid configuration"},
                           st.sampled_from([777, 788, "795", 799]))
        body = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                              st.fixed_dictionaries({"errors": st.lists(
                                  st.one_of(error_items, config), max_size=2)})))
        return Answer(series_ids, status, body)
    answer = Answer(series_ids, status, None)
    rows: list[object] = []
    for series_id in series_ids:
        for _ in range(draw(st.integers(0, 2))):  # missing, once, or repeated
            rows.append(draw(_entry(series_id, answer)))
    for _ in range(draw(st.integers(0, 2))):  # entries for series nobody asked for, garbage
        rows.append(draw(st.one_of(json_scalars, _entry(draw(st.integers(41, 60)), None))))
    draw(st.randoms(use_true_random=False)).shuffle(rows)
    body: dict[str, Any] = {"response": rows}
    for key in ("totalCount", "failureCount"):
        if draw(st.booleans()):
            body[key] = draw(st.one_of(st.integers(-1, 6), st.text(max_size=3), st.none()))
    answer.body = body
    return answer


def _entry(series_id: int, answer: Answer | None) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def entry(draw: st.DrawFn) -> dict[str, Any]:
        kind = draw(st.sampled_from(["coupon", "coupon_with_errors", "refusal", "empty",
                                     "odd_result"]))
        row: dict[str, Any] = {}
        how = draw(st.sampled_from(["int", "str", "fallback"]))
        result: object = None
        if kind.startswith("coupon"):
            code = draw(st.one_of(st.text("ABCDEFGHJK0123456789", min_size=1, max_size=12),
                                  st.integers(1, 10**9)))
            if str(code).strip() and answer is not None:
                answer.coupons.setdefault(series_id, set()).add(str(code).strip())
            result = {"code": code, "seriesId": series_id, "validTill": draw(dates),
                      "validTillDateTime": draw(dates), "discountValue": draw(json_scalars),
                      "id": draw(json_scalars)}
        elif kind == "odd_result":
            result = draw(st.one_of(json_scalars, st.just({}), st.just({"code": ""}),
                                    st.just({"code": None, "seriesId": series_id})))
        if how == "fallback" and isinstance(result, dict):
            row["entityId"] = draw(st.one_of(st.none(), st.integers(1000, 2000)))
        else:
            row["entityId"] = series_id if how == "int" else str(series_id)
        row["result"] = result
        if kind in ("coupon_with_errors", "refusal"):
            row["errors"] = draw(st.one_of(st.lists(error_items, min_size=1, max_size=2),
                                           error_items))
        else:
            row["errors"] = draw(st.sampled_from([[], None, ""]))
        row["warnings"] = draw(warnings_)
        return row

    return entry()


def example_each(answers_: list[Answer]) -> Callable[[Callable[..., None]], Any]:
    """``hypothesis.example`` for each of ``answers_``."""
    def decorate(test: Callable[..., None]) -> Any:
        for answer in answers_:
            test = example(answer)(test)
        return test
    return decorate


def example_each_with_hidden(answers_: list[Answer]) -> Callable[[Callable[..., None]], Any]:
    """``hypothesis.example`` for each of ``answers_``, every series of it hidden-issued
    where the answer leaves it unknown."""
    def decorate(test: Callable[..., None]) -> Any:
        for answer in answers_:
            test = example(answer, set(answer.series_ids))(test)
        return test
    return decorate


@PROPERTIES
@given(answers())
def test_no_answer_crashes_the_parser_and_every_series_gets_one_outcome(answer: Answer) -> None:
    parsed = parse_bulk_answer(answer.series_ids, answer.status, answer.body)
    assert list(parsed.entries) == answer.series_ids
    for series_id, outcome in parsed.entries.items():
        assert outcome.series_id == series_id
        if series_id in answer.coupons:
            # A coupon in an entry is issued, always
            assert outcome.verdict is Verdict.ISSUED and outcome.coupon is not None
            assert outcome.coupon.code in answer.coupons[series_id]
        else:
            # And nothing else is ever taken for issued
            assert outcome.verdict is not Verdict.ISSUED and outcome.coupon is None
            assert outcome.error is not None


class ScriptedApi:
    """Answers the one bulk call with the generated answer, through the real parser."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.read_backs = 0

    def bulk_issue(self, customer: dict[str, str], series_ids: list[int],
                   metadata: dict[str, str]) -> BulkIssueResult:
        parsed = parse_bulk_answer(series_ids, self.answer.status, self.answer.body)
        call = CallInfo("bulk_issue", NOW, 1.0, self.answer.status, "req-1", "answered")
        return BulkIssueResult(call, parsed.entries, call_level_failure=parsed.unreadable,
                               outage=parsed.outage)

    def find_coupons(self, customer: dict[str, str], series_id: int,
                     since: datetime) -> ReadBack:
        self.read_backs += 1
        return ReadBack(CallInfo("read_back", NOW, 1.0, 200, "req-2", "answered"), ())


#: Answers that must be among the examples, whatever the draw: a configuration code in the
#: error body of a 5xx (may have issued) and of a 400 (not issued); a 400 with entries.
KNOWN_ANSWERS = [
    Answer([1], 500, {"errors": [{"code": 788, "message": "invalid configuration"}]}),
    Answer([1, 2], 200, {"errors": ["795: invalid configuration"]}),
    Answer([1], 400, {"errors": [{"code": "799", "message": "invalid configuration"}]}),
    Answer([1, 2], 400, {"response": [
        {"entityId": 2, "errors": [{"code": 712, "message": "expired"}]},
        {"entityId": 1, "result": {"code": "ISSUED01", "seriesId": 1}, "errors": []}]},
        {1: {"ISSUED01"}}),
]


@PROPERTIES
@given(answers())
@example_each(KNOWN_ANSWERS)
def test_every_entity_ends_in_one_state_and_a_coupon_entry_is_never_retried(
        answer: Answer) -> None:
    state, uow = fake_unit_of_work_factory()
    deps = Deps(uow=uow, api=ScriptedApi(answer), publisher=FakePublisher(),
                limiter=Unlimited(),
                circuit=CircuitGate(uow, CircuitPolicy(), clock=lambda: NOW,
                                    probe_timeout_s=60, cache_s=0),
                retry_policy=RetryPolicy(max_attempts=3), metrics=Metrics(),
                worker_id="prop", clock=lambda: NOW, sleep=lambda _s: None,
                rng=random.Random(1))
    event = parse_event_data({"eventId": "prop", "customer": {"id": "566881933"},
                              "seriesIds": answer.series_ids})
    issue_event(event, source="bus", deps=deps)
    entities = {e.series_id: e for e in state.entities.values()}
    assert sorted(entities) == sorted(answer.series_ids)
    reading = parse_bulk_answer(answer.series_ids, answer.status, answer.body)
    parsed = reading.entries
    # An answer without a readable entry, whose status does not prove "not issued" (a 5xx, a
    # 2xx or 3xx, a 408), may have issued every series: whatever its body says (a
    # configuration code pauses the fleet), each is read back before anything is sent again.
    may_have_issued = reading.unreadable and classify_unanswered(answer.status) \
        is Verdict.AMBIGUOUS
    for series_id, entity in entities.items():
        # One state, at rest or waiting in the ledger: nothing is left in flight
        assert entity.state in {EntityState.ISSUED, EntityState.RETRY_WAIT, EntityState.DEAD}
        if series_id in answer.coupons:
            assert entity.state in ISSUED_STATES
            assert state.coupons[entity.id].code in answer.coupons[series_id]
            continue
        assert entity.state not in ISSUED_STATES and entity.id not in state.coupons
        if parsed[series_id].verdict in (Verdict.AMBIGUOUS, Verdict.OUTAGE) \
                and entity.state is EntityState.DEAD:
            raise AssertionError("an unknown or paused outcome is never dead-lettered at once")
        if parsed[series_id].verdict is Verdict.AMBIGUOUS or may_have_issued:
            # Unknown: read back before anything is sent again (or replayed)
            assert entity.needs_reconcile


# -- exactly once, over the whole life of an event ------------------------------------------


class Truth:
    """Capillary's side: the generated answer for the first call (the series it issued: those
    with a coupon entry, and, where the answer leaves it unknown, perhaps others it hid), clean
    answers afterwards, and read-backs that show what was really issued."""

    def __init__(self, answer: Answer, hidden: set[int], clock: Callable[[], datetime]) -> None:
        self.answer, self.hidden, self.clock = answer, hidden, clock
        self.issued: dict[int, list[tuple[str, str]]] = {}  # series -> [(code, notes)]
        self.calls: list[list[int]] = []

    def bulk_issue(self, customer: dict[str, str], series_ids: list[int],
                   metadata: dict[str, str]) -> BulkIssueResult:
        self.calls.append(list(series_ids))
        notes = metadata.get("notes", "")
        if len(self.calls) == 1:
            parsed = parse_bulk_answer(series_ids, self.answer.status, self.answer.body)
            for series_id, outcome in parsed.entries.items():
                # What the generated entries carry, not what the parser made of them
                if series_id in self.answer.coupons:
                    code = outcome.coupon.code if outcome.coupon is not None \
                        else min(self.answer.coupons[series_id])
                    self.issued.setdefault(series_id, []).append((code, notes))
                elif series_id in self.hidden and outcome.verdict is Verdict.AMBIGUOUS:
                    self.issued.setdefault(series_id, []).append((f"HID{series_id}", notes))
            call = CallInfo("bulk_issue", self.clock(), 1.0, self.answer.status, "r1", "x")
            return BulkIssueResult(call, parsed.entries, call_level_failure=parsed.unreadable,
                                   outage=parsed.outage)
        entries = {}
        for series_id in series_ids:
            code = f"NEW{series_id}-{len(self.calls)}"
            self.issued.setdefault(series_id, []).append((code, notes))
            entries[series_id] = EntryOutcome(series_id, Verdict.ISSUED,
                                              coupon=Coupon(code, series_id))
        return BulkIssueResult(CallInfo("bulk_issue", self.clock(), 1.0, 200, "r", "issued"),
                               entries)

    def find_coupons(self, customer: dict[str, str], series_id: int,
                     since: datetime) -> ReadBack:
        found = tuple(FoundCoupon(Coupon(code, series_id), since, {"notes": notes})
                      for code, notes in self.issued.get(series_id, []))
        return ReadBack(CallInfo("read_back", self.clock(), 1.0, 200, "rb", "answered"), found)


@settings(PROPERTIES, max_examples=50)
@given(answers(), st.sets(st.integers(1, 40), max_size=5))
@example_each_with_hidden(KNOWN_ANSWERS)
def test_whatever_the_first_answer_no_series_is_ever_issued_twice(
        answer: Answer, hidden: set[int]) -> None:
    now = [NOW]

    def clock() -> datetime:
        return now[0]

    state, uow = fake_unit_of_work_factory()
    truth = Truth(answer, hidden, clock)
    publisher = FakePublisher()
    deps = Deps(uow=uow, api=truth, publisher=publisher, limiter=Unlimited(),
                circuit=CircuitGate(uow, CircuitPolicy(), clock=clock, probe_timeout_s=60,
                                    cache_s=0),
                retry_policy=RetryPolicy(max_attempts=4), metrics=Metrics(), worker_id="prop",
                clock=clock, sleep=lambda _s: None, rng=random.Random(1))
    event = parse_event_data({"eventId": "prop", "customer": {"id": "566881933"},
                              "seriesIds": answer.series_ids})
    issue_event(event, source="bus", deps=deps)
    # When the sweeper and the retries run long enough for every outcome to settle
    for _ in range(12):
        now[0] += timedelta(seconds=1000)
        publisher.retries.clear()
        sweep(deps)
        for entity_id in list(publisher.retries):
            retry_entity(entity_id, deps=deps)
    entities = {e.series_id: e for e in state.entities.values()}
    for series_id, entity in entities.items():
        issued = truth.issued.get(series_id, [])
        # Then no series was ever issued twice
        assert len(issued) <= 1, (series_id, issued, entity.history)
        # And what the ledger records as issued is the coupon Capillary really issued
        if entity.state in ISSUED_STATES:
            assert [state.coupons[entity.id].code] == [code for code, _ in issued]
        # And a coupon that exists is, in the end, recorded (never dead, never waiting)
        if issued:
            assert entity.state in ISSUED_STATES, (series_id, entity.state, entity.history)
