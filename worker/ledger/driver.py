"""The driver underneath: our errors for its errors, and one statement on a bare connection.

``translate`` is the one place that decides what a SQLAlchemy or psycopg error means for the
message being handled: a lost or refused connection, or a statement the server gave up on
(statement or lock timeout, deadlock), is ``LedgerUnavailable`` (the message goes back,
nothing having been recorded); anything else is ``LedgerError``.

``run_alone`` runs one statement as a transaction of its own, on a pooled connection's psycopg
connection in autocommit, server-side prepared. The hot path's two statements go this way: the
session, its transaction bookkeeping and SQLAlchemy's result wrapping cost more CPU than the
statement itself (1.08 against 0.39 ms per claim, measured in-process).
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from worker.errors import LedgerError, LedgerUnavailable, WorkerError

# SQLSTATEs of a statement the server gave up on while the database itself is fine: waiting
# again later is the answer, exactly as for a lost connection.
_STALLED = {
    "57014": "statement timeout",  # query_canceled (statement_timeout)
    "55P03": "lock timeout",  # lock_not_available (lock_timeout, NOWAIT)
    "40P01": "deadlock",
    "40001": "serialization failure",
}


_PROGRAM_LIMIT = "54"  # SQLSTATE class 54: program_limit_exceeded


def translate(exc: Exception) -> WorkerError:
    """Our error for a SQLAlchemy or psycopg error."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
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


def run_alone(engine: Engine, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit on a connection of ``engine``'s pool; its rows.

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
    try:
        conn: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params, prepare=True)
                return cursor.fetchall()
        finally:
            # The pool hands connections to SQLAlchemy sessions too, which expect BEGIN.
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
