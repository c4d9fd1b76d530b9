"""A replay's items are evenly spaced at its velocity (a one-token bucket), never a burst."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from worker.domain.pacing import even_slots, interval_of

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def test_600_a_minute_is_one_every_100_ms_over_the_horizon() -> None:
    interval = interval_of(600)
    slots = even_slots(NOW, NOW, interval=interval, horizon=SECOND, max_items=50)
    assert len(slots) == 10
    assert {b - a for a, b in itertools.pairwise(slots)} == {timedelta(milliseconds=100)}


def test_a_slow_velocity_gives_one_item_and_nothing_before_its_time() -> None:
    assert even_slots(NOW, NOW, interval=interval_of(1), horizon=SECOND, max_items=50) == [NOW]
    assert even_slots(NOW + SECOND, NOW, interval=interval_of(1), horizon=SECOND,
                      max_items=50) == []


def test_a_job_behind_its_pace_resumes_from_now_without_catching_up() -> None:
    # Given a job whose next item was due an hour ago (the workers were down)
    interval = interval_of(600)
    slots = even_slots(NOW - timedelta(hours=1), NOW, interval=interval, horizon=SECOND,
                       max_items=50)
    # Then it sends one now and keeps the pace: ten in the next second, not 36,000
    assert slots[0] == NOW and len(slots) == 10
    assert slots[-1] - slots[0] == 9 * interval


def test_a_slot_a_little_late_keeps_its_place() -> None:
    interval = interval_of(600)
    late = NOW - timedelta(milliseconds=40)
    assert even_slots(late, NOW, interval=interval, horizon=SECOND, max_items=50)[0] == late


def test_the_step_bound_caps_the_items() -> None:
    assert len(even_slots(NOW, NOW, interval=interval_of(60_000), horizon=SECOND,
                          max_items=50)) == 50
