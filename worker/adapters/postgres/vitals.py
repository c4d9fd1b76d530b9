"""What on-call reads from the ledger when Prometheus scrapes: the fleet's truth, not a process's.

One short read-only transaction per scrape: the circuit (state, and since when it is open or
closed), the age of the oldest waiting retry, unknown outcome and dead letter, and the rate
limit's buckets. Each age is one probe of a partial index (``ix_entities_waiting_retry``,
``ix_entities_unknown_outcome``, ``ix_entities_dead``), never a scan of ``entities``. Ages are
measured on the database's clock, like the leases and settle times they come from.

The transaction carries a statement timeout of its own, shorter than the workers': a stalled
database must show as ``coupon_ledger_up 0`` within Prometheus's scrape timeout, not make the
scrape itself time out (which would read as a worker gone).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc

from worker.adapters.postgres.driver import translate
from worker.domain.model import EntityState

_WAITING = (EntityState.RETRY_WAIT.value, EntityState.QUEUED.value)
_UNSETTLED = (*_WAITING, EntityState.IN_FLIGHT.value)


def _states(states: tuple[str, ...]) -> str:
    return ", ".join(f"'{state}'" for state in states)


# The WHERE clauses repeat the partial indexes' predicates (0013, 0001) so the planner uses them.
_AGES = text(f"""
SELECT
  (SELECT EXTRACT(EPOCH FROM now() - min(first_attempt_at)) FROM entities
    WHERE state IN ({_states(_WAITING)})),
  (SELECT EXTRACT(EPOCH FROM now() - min(settles_at)) FROM entities
    WHERE needs_reconcile AND state IN ({_states(_UNSETTLED)})),
  (SELECT EXTRACT(EPOCH FROM now() - min(dead_at)) FROM entities
    WHERE state = '{EntityState.DEAD.value}')
""")  # noqa: S608 (only the domain's state names are interpolated)
#: The longest a scrape's ledger read may run (the default scrape timeout is 10 s).
SCRAPE_STATEMENT_TIMEOUT_MS = 2000
_TIMEOUT = text(f"SET LOCAL statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}")
_CIRCUITS = text("""
SELECT name, state, EXTRACT(EPOCH FROM now() - coalesce(state_since, updated_at))
FROM circuit_breakers ORDER BY name
""")
_BUCKETS = text("""
SELECT name, tokens, EXTRACT(EPOCH FROM clock_timestamp() - refilled_at),
       GREATEST(coalesce(EXTRACT(EPOCH FROM blocked_until - clock_timestamp()), 0), 0)
FROM rate_limit_buckets ORDER BY name
""")


@dataclass(frozen=True)
class CircuitVitals:
    """One circuit as the ledger holds it; ``in_state_s``: since it last opened or closed."""

    name: str
    state: str
    in_state_s: float


@dataclass(frozen=True)
class BucketVitals:
    """One rate-limit bucket: its content when last refilled, how long ago, and how long
    a 429's Retry-After still holds every call back."""

    name: str
    tokens: float
    since_refill_s: float
    blocked_s: float


@dataclass(frozen=True)
class LedgerVitals:
    """The ages (seconds; None when nothing is in that state) and the switches."""

    oldest_retry_s: float | None
    #: How far the oldest unreconciled unknown outcome is past its settle time (negative:
    #: its original call may still land).
    oldest_unknown_past_settle_s: float | None
    oldest_dead_s: float | None
    circuits: tuple[CircuitVitals, ...]
    buckets: tuple[BucketVitals, ...]


def _seconds(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def read_vitals(engine: Engine) -> LedgerVitals:
    """Read the vitals; raises ``LedgerUnavailable`` (or ``LedgerError``) like any ledger read."""
    try:
        with engine.connect() as conn:
            conn.execute(_TIMEOUT)
            retry, unknown, dead = conn.execute(_AGES).one()
            circuits = tuple(CircuitVitals(str(name), str(state), max(float(age or 0.0), 0.0))
                             for name, state, age in conn.execute(_CIRCUITS))
            buckets = tuple(BucketVitals(str(name), float(tokens), max(float(since), 0.0),
                                         float(blocked))
                            for name, tokens, since, blocked in conn.execute(_BUCKETS))
            conn.rollback()
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc) from exc
    return LedgerVitals(_seconds(retry), _seconds(unknown), _seconds(dead), circuits, buckets)
