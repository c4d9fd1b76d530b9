"""The driver underneath: our errors for its errors, and one statement on a bare connection.

``translate`` is the one place that decides what a SQLAlchemy or psycopg error means for the
message being handled: a lost or refused connection, or a statement the server gave up on
(statement or lock timeout, deadlock), is ``LedgerUnavailable`` (the message goes back,
nothing having been recorded); anything else is ``LedgerError``.

``run_alone`` runs one statement as a transaction of its own, on a pooled connection's psycopg
connection in autocommit, server-side prepared. The hot path's two statements go this way: the
session, its transaction bookkeeping and SQLAlchemy's result wrapping cost more CPU than the
statement itself (1.08 against 0.39 ms per claim, measured in-process).

Behind a pooler in transaction mode (``COUPONS_DB_POOLER=transaction``, docs/pooler.md) a
server connection serves another client after every transaction, so nothing may outlive one:
no prepared statement (it would be missing, or another client's, on the next server
connection) and no session setting. The engine then carries the statement that sets the
timeouts for one transaction (``StatementMode``), and ``run_alone`` sends it and the
statement, bound client-side, as one simple query: one round trip, one implicit transaction.
Behind a pooler that keeps prepared statements per client (``COUPONS_DB_PREPARED_STATEMENTS=on``)
both go prepared in one pipeline instead: one round trip, one implicit transaction too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from worker.domain.errors import LedgerError, LedgerUnavailable, WorkerError

# SQLSTATEs of a statement the server gave up on while the database itself is fine: waiting
# again later is the answer, exactly as for a lost connection.
_STALLED = {
    "57014": "statement timeout",  # query_canceled (statement_timeout)
    "55P03": "lock timeout",  # lock_not_available (lock_timeout, NOWAIT)
    "40P01": "deadlock",
    "40001": "serialization failure",
}


#: The engine execution option that says how ``run_alone`` runs a statement on the engine's
#: connections (a ``StatementMode``; engines without it run as ``DIRECT``).
STATEMENT_MODE = "coupon_statement_mode"


@dataclass(frozen=True)
class StatementMode:
    """How statements run on an engine's connections.

    ``prepare``: prepared on the server (once per connection). ``per_transaction``: the SQL
    that sets the limits for one transaction, sent with each statement, when they cannot be
    set for the session (a pooler in transaction mode; "" when there are none); None when
    the connection carries them for the session.
    """

    prepare: bool = True
    per_transaction: str | None = None


DIRECT = StatementMode()

_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK

_PROGRAM_LIMIT = "54"  # SQLSTATE class 54: program_limit_exceeded


#: What PgBouncer answers a connection whose startup packet carries ``options`` (where the
#: timeouts travel unless ``COUPONS_DB_POOLER=transaction``).
_POOLER_REFUSAL = "unsupported startup parameter"
POOLER_HINT = ("a connection pooler in transaction mode (PgBouncer) refused the startup "
               "parameter that carries the ledger's timeouts: set COUPONS_DB_POOLER=transaction "
               "(docs/pooler.md)")


class PoolerMismatch(LedgerUnavailable):
    """A pooler between the worker and PostgreSQL does not suit ``COUPONS_DB_POOLER``: it
    refused the connection's startup parameters, or dropped them. Nothing was written; waiting
    does not fix it, the setting does."""


def refused_by_pooler(exc: BaseException) -> bool:
    """Whether ``exc`` is a pooler refusing the connection's startup parameters."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    return _POOLER_REFUSAL in str(cause)


def translate(exc: Exception) -> WorkerError:
    """Our error for a SQLAlchemy or psycopg error."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(exc, sa_exc.TimeoutError):
        # The pool's: every connection of this process busy for the whole wait. Nothing was
        # written; the message goes back.
        return LedgerUnavailable(f"no ledger connection free in this process's pool: {exc}")
    if refused_by_pooler(exc):
        # Waiting never fixes it, but nothing was written: the message goes back while an
        # operator reads the log.
        return PoolerMismatch(f"{POOLER_HINT}: {str(cause).strip()}")
    stalled = _STALLED.get(str(getattr(cause, "sqlstate", None)))
    if stalled is not None:
        return LedgerUnavailable(f"database stalled ({stalled}): {type(cause).__name__}: "
                                 f"{str(cause).strip()}")
    if str(getattr(cause, "sqlstate", "")).startswith(_PROGRAM_LIMIT):
        # psycopg counts "program limit exceeded" (an index entry too large, say) among the
        # operational errors, but waiting never fixes it: the data does not fit.
        return LedgerError(f"database error: {type(cause).__name__}: {str(cause).strip()}")
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError
                  | psycopg.OperationalError | psycopg.InterfaceError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        return LedgerUnavailable(f"database unavailable: {type(cause).__name__}: {cause}")
    return LedgerError(f"database error: {exc}")


def after_settings(per_transaction: str, sql: str) -> str:
    """The simple query that sets the limits for its transaction, then runs ``sql``."""
    return f"{per_transaction}; {sql}"


def _execute(conn: psycopg.Connection[Any], mode: StatementMode, sql: str,
             params: dict[str, Any]) -> list[tuple[Any, ...]]:
    if not mode.per_transaction:
        # (Without prepare, the engine's prepare_threshold=None also disables preparing on
        # the connection altogether.)
        with conn.cursor() as cursor:
            cursor.execute(sql, params, prepare=mode.prepare)
            return _rows(cursor)
    if mode.prepare:
        # A pipeline sends both statements and one Sync: one round trip, and one implicit
        # transaction (everything up to a Sync is one), so the limits hold for the statement
        # and end with it. For a pooler that keeps prepared statements per client (PgBouncer
        # 1.21's max_prepared_statements).
        with conn.cursor() as settings, conn.cursor() as cursor:
            with conn.pipeline():
                settings.execute(mode.per_transaction, prepare=True)
                cursor.execute(sql, params, prepare=True)
            return _rows(cursor)
    # Several statements in one simple query run as one implicit transaction, so the limits
    # set_config(..., true) gives hold for the statement after it; the cursor is on the first
    # result set, the statement's is the next.
    with psycopg.ClientCursor(conn) as client_side:
        client_side.execute(after_settings(mode.per_transaction, sql), params)
        client_side.nextset()
        return _rows(client_side)


def _rows(cursor: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
    """The statement's rows; none for one that returns none (an UPDATE without RETURNING)."""
    # The result's status, not ``cursor.description``: that builds a column object for every
    # column, twice an event, only to be compared with None.
    result = cursor.pgresult
    return cursor.fetchall() if result is not None and result.status == _TUPLES_OK else []


def run_alone(engine: Engine, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit on a connection of ``engine``'s pool; its rows (none
    for a statement that returns none).

    A single statement is atomic, so no BEGIN or COMMIT goes over the wire. A connection that
    fails is invalidated, so the pool never hands it out again (as SQLAlchemy does for its own
    statements).
    """
    try:
        pooled = engine.raw_connection()
    except (sa_exc.SQLAlchemyError, psycopg.Error) as exc:
        # A new connection the server refuses (down, or "starting up" after a restart) comes
        # out of the pool as psycopg's own error, not SQLAlchemy's.
        raise translate(exc) from exc
    mode: StatementMode = engine.get_execution_options().get(STATEMENT_MODE, DIRECT)
    try:
        conn: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        conn.autocommit = True
        try:
            return _execute(conn, mode, sql, params)
        finally:
            # The pool hands connections to SQLAlchemy sessions too, which expect BEGIN. (Left
            # in autocommit between statements instead, turned off as the pool hands it to
            # SQLAlchemy, it saved 1.2 us of CPU a statement: not worth a second path.)
            with contextlib.suppress(psycopg.Error):
                conn.autocommit = False
    except psycopg.Error as exc:
        error = translate(exc)
        # A stalled statement or refused data leaves the connection fine: only a lost one goes.
        if isinstance(error, LedgerUnavailable) \
                and str(getattr(exc, "sqlstate", None)) not in _STALLED:
            pooled.invalidate(exc)
        raise error from exc
    finally:
        pooled.close()
