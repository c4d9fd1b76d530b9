"""The call watchdog (``worker.adapters.capillary.transport.CallDeadlines``) wakes for calls
still running at their deadline, not once for every call made."""

from __future__ import annotations

import threading
import time

from worker.adapters.capillary.transport import CallDeadlines


class _CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_calls_that_ended_cost_the_watchdog_no_wake_up_of_their_own() -> None:
    deadlines = CallDeadlines()
    wake = deadlines._wake = _CountingCondition()
    # Given a call in flight on another thread, as there always is under load, and 40 short
    # calls, one every 5 ms, all under the same deadline of 1 s (as the client's are)
    release = threading.Event()

    def long_call() -> None:
        with deadlines.within(1.0):
            release.wait(5)

    other = threading.Thread(target=long_call)
    other.start()
    time.sleep(0.02)
    for _ in range(40):
        with deadlines.within(1.0) as watch:
            pass
        time.sleep(0.005)
    release.set()
    other.join()
    # When their deadlines have all gone by
    time.sleep(1.2)
    # Then the watchdog woke a handful of times, not once a deadline, and kept none
    assert wake.waits < 10
    assert deadlines._heap == []
    assert not watch.expired


def test_a_call_still_running_behind_ended_ones_is_expired_at_its_deadline() -> None:
    deadlines = CallDeadlines()
    for _ in range(50):
        with deadlines.within(0.1):
            pass
    started = time.monotonic()
    with deadlines.within(0.3) as hung:
        while not hung.expired and time.monotonic() - started < 3:
            time.sleep(0.01)
    assert hung.expired
    assert 0.25 <= time.monotonic() - started < 1.0
