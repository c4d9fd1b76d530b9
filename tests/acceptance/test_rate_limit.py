"""The global rate limit with real worker processes, counted at the sandbox."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import WorkerProcess, wait_until
from worker.config import Settings


def bulk_times(sandbox: SandboxAdmin) -> list[tuple[float, int, str]]:
    return sorted((c["t"], c["status"], c["customerId"])  # type: ignore[misc]
                  for c in sandbox.calls() if c["path"] == "bulk")


def test_three_workers_share_one_limit(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given three worker processes limited to 4 calls per second between them
    settings = settings_factory(rate_limit_per_minute=240, rate_limit_burst=2)
    for _ in range(3):
        start_worker(settings, concurrency=2)
    events = [example_event(f"limited-{n}", series=(544770,), customer=f"7000{n}")
              for n in range(32)]
    publish(settings, *events)
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    # Then, counted at the sandbox, no window holds more than 4/s x its length + the burst,
    # give or take a call's slot: on a busy machine a call made on time may arrive a little
    # late, next to the one after it
    times = [t for t, _status, _c in bulk_times(sandbox)]
    assert len(times) == 32
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= 4 * (times[j] - start + 0.25) + 2 + 1, (i, j, times[j] - start)


def test_a_429_holds_back_the_whole_fleet_for_retry_after(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given three workers with no configured limit, and a Capillary that answers one 429
    for _ in range(3):
        start_worker(settings, concurrency=2)
    sandbox.add_fault(kind="rate_limit", retry_after_seconds=4, times=1)
    events = [example_event(f"throttled-{n}", series=(553379,), customer=f"7100{n}")
              for n in range(12)]
    publish(settings, *events)
    for event in events:
        wait_for_state(clean_ledger, event["eventId"], "completed", timeout_s=60)
    calls = bulk_times(sandbox)
    throttled_at = next(t for t, status, _c in calls if status == 429)
    # Then nobody called while Retry-After ran, beyond calls already on the wire when the
    # 429 was answered (they may arrive late on a busy machine: a second is allowed them)
    during = [t - throttled_at for t, _s, _c in calls if 1.0 < t - throttled_at < 3.7]
    assert during == []
    assert sum(1 for _t, status, _c in calls if status == 429) == 1
    with clean_ledger.connect() as conn:
        assert conn.execute(text("SELECT max(attempts) FROM entities")).scalar() == 1, \
            "a 429 does not spend an attempt"


def test_retries_and_fresh_events_share_the_limit_fairly(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given 20 entities waiting for their retry...
    unlimited = settings_factory(retry_base_s=1.0, retry_max_s=1.0)
    first = start_worker(unlimited, concurrency=4)
    sandbox.set_series(730730, behaviour="error", error_code=730)
    retries = [example_event(f"retry-{n}", series=(730730,), customer=f"retry{n}")
               for n in range(20)]
    publish(unlimited, *retries)

    def all_waiting() -> bool:
        with clean_ledger.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM entities "
                                     "WHERE state = 'retry_wait'")).scalar() == 20

    wait_until(all_waiting, message="twenty retries waiting")
    first.kill()
    sandbox.set_series(730730, behaviour="valid")
    before = len(bulk_times(sandbox))
    # ...and 20 fresh events arriving, with a limit of 4 calls per second
    limited = settings_factory(rate_limit_per_minute=240, rate_limit_burst=1)
    publish(limited, *(example_event(f"fresh-{n}", series=(544770,), customer=f"fresh{n}")
                       for n in range(20)))
    start_worker(limited, concurrency=4)
    for n in range(20):
        wait_for_state(clean_ledger, f"fresh-{n}", "completed", timeout_s=90)
        wait_for_state(clean_ledger, f"retry-{n}", "completed", timeout_s=90)
    # Then neither kind waited for the other to drain: both are served from the start (had
    # either waited, the first half would hold none of it). Not more than that: the worker
    # takes fresh events from the bus as it starts (two per pool process), and on a saturated
    # machine its first sweep, which dispatches the retries, comes seconds later.
    order = [c for _t, _s, c in bulk_times(sandbox)[before:]]
    first_half = order[: len(order) // 2]
    assert any(c.startswith("retry") for c in first_half), order
    assert any(c.startswith("fresh") for c in first_half), order
