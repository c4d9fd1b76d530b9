"""The transaction boundary: nothing is written unless ``commit()`` is called.

Driver errors are translated here: a lost or refused connection becomes ``LedgerUnavailable``
(the message goes back to the broker), anything else ``LedgerError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self

from sqlalchemy import Engine, create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import LedgerError, LedgerUnavailable, WorkerError
from worker.ledger.repository import Ledger, SqlLedger


class UnitOfWork(Protocol):
    """One transaction on the ledger."""

    ledger: Ledger

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


UnitOfWorkFactory = Callable[[], UnitOfWork]


def make_engine(database_url: str, *, pool_size: int = 5, application_name: str = "coupon-worker"
                ) -> Engine:
    """An engine that fails fast when the server is down.

    No pre-ping: it would cost a round trip per transaction, twice per event. A connection that
    died with the server fails its first statement instead; SQLAlchemy then discards the whole
    pool, the task's message goes back to the queue (LedgerUnavailable) and the retry finds
    fresh connections.
    """
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": application_name},
    )


def translate(exc: Exception) -> WorkerError:
    """Our error for a SQLAlchemy/psycopg error."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        return LedgerUnavailable(f"database unavailable: {type(cause).__name__}: {cause}")
    return LedgerError(f"database error: {exc}")


class SqlUnitOfWork:
    """A ``UnitOfWork`` over a SQLAlchemy session."""

    ledger: Ledger

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        assert self._session is not None, "use the unit of work in a with block"
        return self._session

    def __enter__(self) -> Self:
        self._session = self._session_factory()
        self.ledger = SqlLedger(self._session)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.rollback()
        finally:
            self.session.close()
            self._session = None
        if isinstance(exc, sa_exc.SQLAlchemyError):
            raise translate(exc) from exc

    def commit(self) -> None:
        try:
            self.session.commit()
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc) from exc

    def rollback(self) -> None:
        # If the connection is gone, the transaction is gone with it, which is the point.
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            self.session.rollback()


def sql_unit_of_work_factory(engine: Engine) -> Callable[[], SqlUnitOfWork]:
    sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    return lambda: SqlUnitOfWork(sessions)
