"""A global rate limit for Capillary calls, shared by every worker process and host.

Capillary's quota is per API key per minute, and a fleet shares the key, so the limit lives in
PostgreSQL, which every worker already reaches: a token bucket in one row, taken with a single
``UPDATE ... RETURNING`` per call. The bucket is a *reservation*: a caller takes a token even
when the bucket is empty and is told how long to wait for it, so waiting callers line up in
order instead of polling. A 429 answer blocks the bucket until Retry-After has passed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from worker.adapters.postgres.driver import run_alone
from worker.domain.errors import LedgerError, LedgerUnavailable

BULK_ISSUE = "bulk_issue"
QUOTA_MARGIN = 0.015


class RateLimiter(Protocol):
    """Reserve a call slot; ``reserve`` returns how long to wait before using it."""

    def reserve(self, name: str = BULK_ISSUE) -> float: ...

    def cancel(self, name: str = BULK_ISSUE) -> None:
        """Give back a reserved slot that will not be used."""
        ...

    def penalise(self, retry_after_s: float, name: str = BULK_ISSUE) -> None:
        """Capillary answered 429: nobody calls before Retry-After has passed."""
        ...


class Unlimited:
    """No limit and no shared state: every call may go at once (unit tests, one-off tools)."""

    def reserve(self, name: str = BULK_ISSUE) -> float:
        return 0.0

    def cancel(self, name: str = BULK_ISSUE) -> None:
        return None

    def penalise(self, retry_after_s: float, name: str = BULK_ISSUE) -> None:
        return None


# tokens is the bucket's content at refilled_at; extrapolating linearly to "now" works in both
# directions, so a negative content simply means "the next token comes later" (a reservation).
# Each runs alone on the driver (``run_alone``: one round trip, and behind a pooler in
# transaction mode with the ledger's timeouts for its own transaction). ``%(name)s`` are
# psycopg's named parameters.
_RESERVE = """
    WITH now AS (SELECT clock_timestamp() AS t)
    UPDATE rate_limit_buckets AS b
       SET tokens = LEAST(%(burst)s,
                          b.tokens + EXTRACT(EPOCH FROM (now.t - b.refilled_at)) * %(rate)s) - 1,
           refilled_at = now.t
      FROM now
     WHERE b.name = %(name)s
    RETURNING b.tokens
    """
_CREATE = """
    INSERT INTO rate_limit_buckets (name, tokens, refilled_at)
    VALUES (%(name)s, %(burst)s, clock_timestamp())
    ON CONFLICT (name) DO NOTHING
    """
_CANCEL = ("UPDATE rate_limit_buckets SET tokens = LEAST(tokens + 1, %(burst)s) "
           "WHERE name = %(name)s")
# After a 429 nobody may call for Retry-After seconds: empty the bucket that far into debt.
_PENALISE = """
    WITH now AS (SELECT clock_timestamp() AS t)
    UPDATE rate_limit_buckets AS b
       SET tokens = LEAST(LEAST(%(burst)s,
                                b.tokens + EXTRACT(EPOCH FROM (now.t - b.refilled_at))
                                           * %(rate)s),
                          (0 - %(wait)s) * %(rate)s),
           refilled_at = now.t,
           blocked_until = now.t + make_interval(secs => %(wait)s)
      FROM now
     WHERE b.name = %(name)s
    """


@dataclass(frozen=True)
class BucketSpec:
    """A quota of ``per_minute`` calls in any rolling minute, ``burst`` of them at once."""

    per_minute: int
    burst: int

    @property
    def rate_per_s(self) -> float:
        """The refill rate that keeps every rolling minute within the quota.

        A bucket lets through its burst plus a minute of refill in any 60 s, so the refill is
        what the quota leaves after the burst; the small margin absorbs the jitter between
        taking a token and the request reaching Capillary (measured: 1.5% removed the 429s).
        """
        return max(self.per_minute - self.burst, 1) / 60.0 * (1 - QUOTA_MARGIN)

    def available(self, tokens: float, since_refill_s: float) -> float:
        """The bucket's content now, from its row (``tokens`` at ``refilled_at``, that long
        ago): what a call may take at once; below zero, callers are already lined up."""
        return min(float(self.burst), tokens + since_refill_s * self.rate_per_s)


class PostgresRateLimiter:
    """The fleet-wide token bucket in ``rate_limit_buckets``."""

    def __init__(self, engine: Engine, per_minute: int, burst: int | None = None) -> None:
        # A small default burst keeps a fleet that starts together from overshooting the
        # first seconds of a per-minute window.
        self.spec = BucketSpec(per_minute, burst or max(1, min(per_minute // 60, 10)))
        self._engine = engine
        self._created: set[str] = set()

    def _execute(self, statement: str, **params: object) -> list[float]:
        try:
            if params["name"] not in self._created:
                run_alone(self._engine, _CREATE, {"name": params["name"],
                                                  "burst": self.spec.burst})
                self._created.add(str(params["name"]))
            return [float(r[0]) for r in run_alone(self._engine, statement, params)]
        except LedgerError as exc:
            raise LedgerUnavailable(f"rate limiter unavailable: {exc}") from exc

    def reserve(self, name: str = BULK_ISSUE) -> float:
        rows = self._execute(_RESERVE, name=name, burst=self.spec.burst,
                             rate=self.spec.rate_per_s)
        tokens = rows[0]
        return -tokens / self.spec.rate_per_s if tokens < 0 else 0.0

    def cancel(self, name: str = BULK_ISSUE) -> None:
        self._execute(_CANCEL, name=name, burst=self.spec.burst)

    def penalise(self, retry_after_s: float, name: str = BULK_ISSUE) -> None:
        self._execute(_PENALISE, name=name, wait=max(retry_after_s, 0.0), burst=self.spec.burst,
                      rate=self.spec.rate_per_s)


# Read by every pool process once a second, between an event's claim and its call: run alone
# on the driver (``run_alone``), without SQLAlchemy's statement and result machinery.
_READ_BLOCK = (
    "SELECT GREATEST(EXTRACT(EPOCH FROM (blocked_until - clock_timestamp())), 0) "
    "FROM rate_limit_buckets WHERE name = %(name)s"
)
_BLOCK = """
    INSERT INTO rate_limit_buckets (name, tokens, refilled_at, blocked_until)
    VALUES (%(name)s, 0, clock_timestamp(), clock_timestamp() + make_interval(secs => %(wait)s))
    ON CONFLICT (name) DO UPDATE
       SET blocked_until = GREATEST(COALESCE(rate_limit_buckets.blocked_until, clock_timestamp()),
                                    EXCLUDED.blocked_until)
    """


class RetryAfterGate:
    """No configured limit, but a 429's Retry-After still holds back the whole fleet.

    The pause is shared through the same table; each process reads it at most every
    ``refresh_s``, so an unlimited fleet pays about one query per second for it, not one per
    call.
    """

    def __init__(self, engine: Engine, *, refresh_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._blocked_until: dict[str, float] = {}
        self._read_at: dict[str, float] = {}
        self._refreshing: set[str] = set()

    def reserve(self, name: str = BULK_ISSUE) -> float:
        now = self._clock()
        with self._lock:
            first = name not in self._read_at
            due = now - self._read_at.get(name, float("-inf")) >= self._refresh_s
            if not due or (name in self._refreshing and not first):
                # Another thread is reading it: the pause it last read is at most a refresh
                # old, rather than every thread of the process waiting on one query.
                return max(self._blocked_until.get(name, now) - now, 0.0)
            self._refreshing.add(name)
            if first:
                # Nothing read yet: the threads wait for the first reading, under the lock.
                return self._refresh(name, now, held=True)
        return self._refresh(name, now)

    def _refresh(self, name: str, now: float, *, held: bool = False) -> float:
        """Read the fleet's pause (``held``: under this gate's lock already)."""
        try:
            rows = run_alone(self._engine, _READ_BLOCK, {"name": name})
        except LedgerError as exc:
            raise LedgerUnavailable(f"rate limiter unavailable: {exc}") from exc
        finally:
            self._refreshing.discard(name)
        wait = rows[0][0] if rows else None
        if held:
            return self._store(name, now, wait)
        with self._lock:
            return self._store(name, now, wait)

    def _store(self, name: str, now: float, wait: float | None) -> float:
        # The fleet's pause only ever grows (``_BLOCK`` keeps the later end): a penalty this
        # process recorded while the query ran is not undone by what the query read.
        until = max(now + float(wait or 0.0), self._blocked_until.get(name, 0.0))
        self._blocked_until[name] = until
        self._read_at[name] = now
        return max(until - now, 0.0)

    def cancel(self, name: str = BULK_ISSUE) -> None:
        return None

    def penalise(self, retry_after_s: float, name: str = BULK_ISSUE) -> None:
        try:
            run_alone(self._engine, _BLOCK, {"name": name, "wait": max(retry_after_s, 0.0)})
        except LedgerError as exc:
            raise LedgerUnavailable(f"rate limiter unavailable: {exc}") from exc
        with self._lock:
            self._blocked_until[name] = max(self._blocked_until.get(name, 0.0),
                                            self._clock() + retry_after_s)
