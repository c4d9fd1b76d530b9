"""The transaction boundary: nothing is written unless ``commit()`` is called.

Driver errors leave it translated by ``worker.adapters.postgres.driver.translate``: a lost or
refused connection, and a statement cut short by the statement or lock timeout, become
``LedgerUnavailable`` (the message goes back to the broker, nothing having been recorded),
anything else ``LedgerError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc

from worker.adapters.postgres.driver import STATEMENT_MODE, StatementMode, translate
from worker.adapters.postgres.repository import Ledger, SqlLedger

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.secret_files import Secret


#: The part of the ledger a consumer uses (``IssuingLedger``, ``SweeperLedger``...).
LedgerT_co = TypeVar("LedgerT_co", covariant=True)


class UnitOfWork(Protocol[LedgerT_co]):
    """One transaction on the ledger, of which its consumer sees the part it uses: a use case
    handed ``UnitOfWorkFactory[SweeperLedger]`` can call nothing but the sweeper's statements,
    whatever ledger (``Ledger``, all parts: SQL or in-memory) it is given."""

    @property
    def ledger(self) -> LedgerT_co: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


UnitOfWorkFactory = Callable[[], UnitOfWork[LedgerT_co]]


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a ledger connection may wait, whatever the server or the network does.

    Without them a statement waits for a lock, a slow plan or a vanished server for as long as
    it takes, and Celery's hard time limit ends the task instead, with nothing recorded.
    ``None`` leaves the server's setting (no limit) for tools that run long statements.

    ``pooler``: ``"transaction"`` when a pooler in transaction mode stands between the worker
    and PostgreSQL (docs/pooler.md). A session setting would then stay on a server connection
    that other clients share, and the startup parameter that carries them is refused (or
    dropped) by PgBouncer: the timeouts are set for each transaction instead.

    ``prepared_statements``: whether statements are prepared on the server; ``None`` (auto)
    for yes on a direct connection and no behind a pooler in transaction mode, where only a
    pooler that keeps them per client (PgBouncer 1.21's ``max_prepared_statements``) can.
    """

    connect_timeout_s: int = 5
    statement_timeout_s: float | None = None
    lock_timeout_s: float | None = None
    keepalive_idle_s: int = 10
    keepalive_interval_s: int = 5
    keepalive_count: int = 3
    pooler: Literal["none", "transaction"] = "none"
    prepared_statements: bool | None = None

    @property
    def per_transaction(self) -> bool:
        """Whether the limits are set per transaction (a pooler in transaction mode)."""
        return self.pooler == "transaction"

    @property
    def prepare(self) -> bool:
        """Whether statements are prepared on the server."""
        if self.prepared_statements is None:
            return not self.per_transaction
        return self.prepared_statements

    def statement_mode(self) -> StatementMode:
        """How ``run_alone`` runs statements on connections with these limits."""
        return StatementMode(prepare=self.prepare,
                             per_transaction=self.transaction_settings_sql()
                             if self.per_transaction else None)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            connect_timeout_s=settings.db_connect_timeout_s,
            statement_timeout_s=settings.db_statement_timeout_s,
            lock_timeout_s=settings.db_lock_timeout_s,
            keepalive_idle_s=settings.db_keepalive_idle_s,
            keepalive_interval_s=settings.db_keepalive_interval_s,
            keepalive_count=settings.db_keepalive_count,
            pooler=settings.db_pooler,
            prepared_statements={"auto": None, "on": True, "off": False}[
                settings.db_prepared_statements],
        )

    def connect_args(self, application_name: str) -> dict[str, object]:
        """libpq connection parameters (psycopg passes them through)."""
        dead_peer_ms = 1000 * (self.keepalive_idle_s
                               + self.keepalive_interval_s * self.keepalive_count)
        args: dict[str, object] = {
            "application_name": application_name,
            "connect_timeout": self.connect_timeout_s,
            # A server that vanished (host down, partition) sends no error: an idle-looking
            # connection waiting for an answer is probed by keepalives, and unacknowledged
            # data is given up after the same time.
            "keepalives": 1,
            "keepalives_idle": self.keepalive_idle_s,
            "keepalives_interval": self.keepalive_interval_s,
            "keepalives_count": self.keepalive_count,
            "tcp_user_timeout": dead_peer_ms,
        }
        if not self.prepare:
            # psycopg prepares a statement it ran 5 times on a connection; through the pooler
            # the next execution would name it on a server connection that lacks it.
            args["prepare_threshold"] = None
        if self.per_transaction:
            return args
        # Set in the startup packet: no extra round trip, and every pooled connection has them.
        options = []
        if self.statement_timeout_s is not None:
            options.append(f"-c statement_timeout={_ms(self.statement_timeout_s)}")
        if self.lock_timeout_s is not None:
            options.append(f"-c lock_timeout={_ms(self.lock_timeout_s)}")
        if options:
            args["options"] = " ".join(options)
        return args


    def transaction_settings_sql(self) -> str:
        """The statement that sets the timeouts for the current transaction only ("" when
        there are none): ``set_config(name, value, is_local => true)``, as ``SET LOCAL``."""
        settings = [f"set_config('{name}', '{_ms(seconds)}', true)"
                    for name, seconds in (("statement_timeout", self.statement_timeout_s),
                                          ("lock_timeout", self.lock_timeout_s))
                    if seconds is not None]
        return f"SELECT {', '.join(settings)}" if settings else ""


def _ms(seconds: float) -> int:
    return max(round(seconds * 1000), 1)


def make_engine(database_url: str, *, pool_size: int = 5, peak: int | None = None,
                application_name: str = "coupon-worker", limits: ConnectionLimits | None = None,
                password: Secret | None = None) -> Engine:
    """An engine that fails fast when the server is down or stalls.

    It holds at most ``pool_size + peak`` connections (``peak``: ``pool_size`` unless given),
    each opened when first needed and then kept (see the pool's comment).

    ``password`` (COUPONS_DATABASE_PASSWORD, or its file) is asked for each new connection:
    a rotated password file is used from the next connection on, with no restart; the
    connections already open stay authenticated.

    No pre-ping: it would cost a round trip per transaction, twice per event. A connection that
    died with the server fails its first statement instead; SQLAlchemy then discards the whole
    pool, the task's message goes back to the queue (LedgerUnavailable) and the retry finds
    fresh connections.
    """
    limits = limits or ConnectionLimits()
    engine = create_engine(
        database_url,
        # No overflow: an overflow connection is closed as soon as it is handed back to a
        # full pool, so threads taking turns at more connections than the pool keeps opened
        # and closed one for nearly every event (430 connections for 3,000 events on threads
        # x 64, and a quarter less throughput). A QueuePool opens its connections lazily, so
        # a quiet process still holds only what it has needed at once.
        pool_size=pool_size + (pool_size if peak is None else peak),
        max_overflow=0,
        # Under the threads pool more threads than connections may want one at once: a
        # thread waits at most as long as connecting may take, then its message goes back
        # (LedgerUnavailable), well inside its deadline, instead of SQLAlchemy's 30 s.
        pool_timeout=limits.connect_timeout_s,
        pool_recycle=1800,
        connect_args=limits.connect_args(application_name),
    )
    if password is not None:
        _current_password(engine, password)
    mode = limits.statement_mode()
    if mode.per_transaction:
        # On the engine itself: engines derived from it (execution_options) share its events.
        _set_limits_on_begin(engine, mode.per_transaction)
    return engine.execution_options(**{STATEMENT_MODE: mode})


def _current_password(engine: Engine, password: Secret) -> None:
    @event.listens_for(engine, "do_connect")
    def connect_with(dialect: object, record: object, cargs: object,
                     cparams: dict[str, object]) -> None:
        cparams["password"] = password.get()


def _set_limits_on_begin(engine: Engine, per_transaction: str) -> None:
    """Every transaction SQLAlchemy begins on ``engine`` first sets the limits for itself
    (one round trip more per transaction, off the hot path: ``worker.adapters.postgres.driver``)."""

    @event.listens_for(engine, "begin")
    def set_limits(conn: Connection) -> None:
        # An autocommit connection runs each statement as a transaction of its own: a
        # setting for "this transaction" would end before the next statement.
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            conn.exec_driver_sql(per_transaction)


class SqlUnitOfWork:
    """A ``UnitOfWork`` over a SQLAlchemy connection (its ``session``), begun on first use.

    A core ``Connection``, not an ORM ``Session``: the ledger's statements are SQLAlchemy core,
    and the ORM would cost every worker process its modules for nothing but the transaction.

    The hot path's statements run alone (``worker.adapters.postgres.driver``): an event's two units
    of work never open a session, whose creation and closing cost more CPU than their statement's
    parameters.
    """

    ledger: Ledger

    def __init__(self, session_factory: Callable[[], Connection], engine: Engine) -> None:
        self._session_factory = session_factory
        self._engine = engine
        self._session: Connection | None = None
        self._open = False

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def session(self) -> Connection:
        assert self._open, "use the unit of work in a with block"
        if self._session is None:
            self._session = self._session_factory()
        return self._session

    def in_transaction(self) -> bool:
        return self._session is not None and self._session.in_transaction()

    def __enter__(self) -> Self:
        self._open = True
        self.ledger = SqlLedger(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.rollback()
        finally:
            if self._session is not None:
                self._session.close()
            self._session = None
            self._open = False
        # No driver error leaves a unit of work as it is: psycopg's own (a pooled connection
        # the server refused, raised around SQLAlchemy) included, or a task would take a
        # database outage for an error of the event.
        if isinstance(exc, sa_exc.SQLAlchemyError | psycopg.Error):
            raise translate(exc) from exc

    # The hot path's statements run alone, outside the session
    # (``worker.adapters.postgres.driver``), so its units of work never begin a transaction: nothing
    # to commit or roll back then, and the session's bookkeeping for an empty transaction is
    # skipped.
    def commit(self) -> None:
        if not self.in_transaction():
            return
        try:
            self.session.commit()
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc) from exc

    def rollback(self) -> None:
        if not self.in_transaction():
            return
        # If the connection is gone, the transaction is gone with it, which is the point.
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            self.session.rollback()


def sql_unit_of_work_factory(engine: Engine) -> Callable[[], SqlUnitOfWork]:
    return lambda: SqlUnitOfWork(engine.connect, engine)
