"""The fleet-wide rate limit on PostgreSQL: reservations, 429 penalties, several processes."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, create_engine, text

from worker.adapters.postgres.ratelimit import PostgresRateLimiter, RetryAfterGate


def test_reservations_space_calls_at_the_rate_after_the_burst(clean_ledger: Engine) -> None:
    limiter = PostgresRateLimiter(clean_ledger, per_minute=60, burst=3)  # one a second
    slots = []  # each slot as a range: the host clock before and after asking for it
    for _ in range(8):
        asked = time.monotonic()
        wait = limiter.reserve()
        slots.append((asked + wait, time.monotonic() + wait))
    # The burst goes at once; each further reservation gets the slot about a second after the
    # one before (a little more: the refill keeps a margin under the quota), however long the
    # reservations themselves took on a busy machine.
    assert max(hi for _lo, hi in slots[:3]) - min(lo for lo, _hi in slots[:3]) < 0.5
    for (lo, hi), (next_lo, next_hi) in itertools.pairwise(slots[2:]):
        # the gap lies between next_lo - hi and next_hi - lo: that range must meet [1.0, 1.1]
        assert next_lo - hi <= 1.1 and next_hi - lo >= 1.0, (lo, hi, next_lo, next_hi)


def test_a_cancelled_reservation_is_given_back(clean_ledger: Engine) -> None:
    limiter = PostgresRateLimiter(clean_ledger, per_minute=60, burst=1)
    assert limiter.reserve() == pytest.approx(0, abs=0.02)
    # The next slot is a second away (less whatever time a busy machine let pass in between)
    assert 0.7 <= limiter.reserve() <= 1.1
    limiter.cancel()
    # Given back: the same slot again, not the one after it (two seconds away)
    assert 0.7 <= limiter.reserve() <= 1.1


def test_a_429_penalty_holds_every_caller_for_retry_after(clean_ledger: Engine) -> None:
    limiter = PostgresRateLimiter(clean_ledger, per_minute=6000, burst=10)
    other_process_view = PostgresRateLimiter(clean_ledger, per_minute=6000, burst=10)
    assert limiter.reserve() == pytest.approx(0, abs=0.02)
    limiter.penalise(5.0)
    assert other_process_view.reserve() >= 4.9


def test_without_a_limit_retry_after_still_holds_the_fleet(clean_ledger: Engine) -> None:
    gate, peer = RetryAfterGate(clean_ledger, refresh_s=0), RetryAfterGate(clean_ledger,
                                                                            refresh_s=0)
    assert gate.reserve() == 0 and peer.reserve() == 0
    gate.penalise(4.0)
    assert 3.5 <= peer.reserve() <= 4.0
    assert 3.5 <= gate.reserve() <= 4.0


def _call_times(database_url: str, per_minute: int, burst: int, calls: int,
                out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    engine = create_engine(database_url)
    limiter = PostgresRateLimiter(engine, per_minute=per_minute, burst=burst)
    for _ in range(calls):
        time.sleep(limiter.reserve())
        out.put(time.time())
    engine.dispose()


def test_the_limit_holds_across_processes(clean_ledger: Engine, database_url: str) -> None:
    # Given three processes sharing a limit of 5 calls per second with a burst of 2
    per_minute, burst, per_process = 300, 2, 10
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_call_times,
                                 args=(database_url, per_minute, burst, per_process, out))
                 for _ in range(3)]
    for p in processes:
        p.start()
    times = sorted(out.get(timeout=60) for _ in range(3 * per_process))
    for p in processes:
        p.join(timeout=30)
    # Then no window of any length holds more than rate x length + burst calls
    rate = per_minute / 60
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            span = times[j] - start
            assert j - i + 1 <= rate * span + burst + 1, (i, j, span)


def _others_get_the_last_reading(engine: Engine, table: str, read: Callable[[], object],
                                 last: object) -> None:
    """While one thread's reading waits on ``table`` (locked by another session), another
    thread's ``read()`` returns ``last`` at once; the waiting reading ends once it is free."""
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        # When another thread asks meanwhile, it gets the last reading at once
        started = time.monotonic()
        assert read() == last
        assert time.monotonic() - started < 0.1
        holder.rollback()
    reader.join(timeout=10)
    assert not reader.is_alive()


def test_while_one_thread_reads_the_fleets_pause_the_others_do_not_wait_for_it(
        clean_ledger: Engine) -> None:
    # Given a gate that has read the fleet's pause once (none), and may read it again
    gate = RetryAfterGate(clean_ledger, refresh_s=0.2)
    assert gate.reserve() == 0.0
    time.sleep(0.3)
    # And another session holding the limiter's table, so the next reading waits on it
    _others_get_the_last_reading(clean_ledger, "rate_limit_buckets", gate.reserve, 0.0)


def test_while_one_thread_reads_the_circuit_the_others_use_the_last_reading(
        clean_ledger: Engine) -> None:
    from datetime import UTC, datetime

    from worker.adapters.postgres.circuit import CircuitGate
    from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
    from worker.domain.policy import CircuitPolicy

    # Given a gate that has read the circuit once (closed), and may read it again
    gate = CircuitGate(sql_unit_of_work_factory(clean_ledger), CircuitPolicy(),
                       clock=lambda: datetime.now(UTC), probe_timeout_s=60, cache_s=0.2)
    assert gate.state().state == "closed"
    time.sleep(0.3)
    # And another session holding the circuit's table, so the next reading waits on it
    _others_get_the_last_reading(clean_ledger, "circuit_breakers",
                                 lambda: gate.state().state, "closed")
