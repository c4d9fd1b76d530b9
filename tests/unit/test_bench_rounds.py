"""The overhead comparison's rounds: alternating order, the median round's ratio."""

from __future__ import annotations

import pytest

from coupon_devtools.bench.defaults import OVERHEAD_ROUNDS
from coupon_devtools.bench.scenarios import BenchOptions, median_round, round_order


def test_the_sides_take_turns_going_first() -> None:
    firsts = [round_order(i)[0] for i in range(4)]
    assert firsts == ["baseline", "ours", "baseline", "ours"]
    assert all(sorted(round_order(i)) == ["baseline", "ours"] for i in range(4))


@pytest.mark.parametrize(("ratios", "index"), [
    ([0.91], 0),
    ([0.88, 0.93, 0.90], 2),
    ([0.95, 0.85, 0.90], 2),
    ([0.86, 0.92], 1),
])
def test_the_verdict_is_the_median_round(ratios: list[float], index: int) -> None:
    assert median_round(ratios) == index


def test_overhead_runs_several_rounds_unless_told_or_short() -> None:
    assert BenchOptions(scenario="overhead").n_rounds == OVERHEAD_ROUNDS > 1
    assert BenchOptions(scenario="all").n_rounds == OVERHEAD_ROUNDS
    assert BenchOptions(scenario="quick").n_rounds == 1
    assert BenchOptions(scenario="overhead", rounds=5).n_rounds == 5
    assert BenchOptions(scenario="overhead", short=True).n_rounds == 1
