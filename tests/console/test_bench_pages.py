"""The console's page benchmark runs end to end (at a small scale here; 1,000,000 by hand)."""

from __future__ import annotations

import pytest

from coupon_devtools.bench.console_pages import main


@pytest.mark.slow
def test_the_page_benchmark_seeds_times_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--entities", "4000", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "seeded" in out and "dead letters by cause" in out and "customer" in out
    # Every page timed (its figure and a verdict), the verdict never the exit status.
    timed = [line for line in out.splitlines() if line.rstrip().endswith(("ok", "ms)"))]
    assert len(timed) >= 5 and all(" ms " in line for line in timed), out
    assert f"of {len(timed)} pages under 200 ms" in out
    assert code == 0, out
