"""No acknowledgement without a record: a ledger stalled past the task's hard time limit delays
an event, and the event is then recorded and issued exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import WorkerProcess
from worker.config import Settings


def test_an_event_published_while_the_ledger_is_locked_is_recorded_once_it_is_released(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, concurrency=1)
    # Longer than the hard time limit: without timeouts the task would be killed mid-statement.
    hold_s = settings.task_hard_time_limit_s + 3
    # Given another session holding the events table (a migration, an operator's open
    # transaction): every statement on it waits
    with clean_ledger.connect() as holder:
        holder.execute(text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
        # When an event arrives meanwhile
        publish(settings, example_event("while-locked"))
        time.sleep(hold_s)
        holder.rollback()
    # Then once the lock is gone the event is recorded and issued, exactly once
    done = wait_for_state(clean_ledger, "while-locked", "completed", timeout_s=60)
    coupons = sandbox.ledger(customer="566881933")
    assert sorted(c["code"] for c in coupons) == sorted(c["code"] for c in done["coupons"])
    assert len(coupons) == 2
    assert len([c for c in sandbox.calls() if c["path"] == "bulk"]) == 1
    # Because its task gave up at the lock timeout and put the message back, each time
    log = worker.log()
    assert "ledger.unavailable" in log and "lock timeout" in log
    assert "Hard time limit" not in log, "the statement timed out, not the task"
    assert worker.process.poll() is None
