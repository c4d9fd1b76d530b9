"""Create the ledger database if it is missing, then bring its schema to Alembic's head.

The migrations and ``alembic.ini`` live in the checkout's top-level ``migrations/`` folder. A
wheel carries a copy of both inside this package (``worker/adapters/postgres/alembic/``, copied by
the build: see setup.py); an editable install or a checkout reads the originals.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from worker.adapters.postgres import schema
from worker.adapters.postgres.driver import POOLER_HINT, PoolerMismatch, refused_by_pooler
from worker.adapters.postgres.schema import SchemaStatus, ShippedRevisions
from worker.domain.errors import ConfigurationError, LedgerError, LedgerUnavailable

if TYPE_CHECKING:
    # Imported where used: a worker's start-up check reads the migrations without Alembic.
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

PACKAGED_HOME = Path(__file__).resolve().with_name("alembic")
CHECKOUT_HOME = Path(__file__).resolve().parents[3]
# A migration waits at most this long for a lock (see migrations/env.py); ``upgrade`` then
# tries again, so that a busy fleet is never stalled behind the migration's lock request.
LOCK_RETRIES = 5
LOCK_RETRY_PAUSE_S = 2.0


def alembic_home() -> Path:
    """The folder holding ``alembic.ini`` and ``migrations/``: the packaged copy first."""
    for home in (PACKAGED_HOME, CHECKOUT_HOME):
        if (home / "alembic.ini").is_file() and (home / "migrations" / "env.py").is_file():
            return home
    raise ConfigurationError(
        "the ledger's migrations are missing from this installation (neither "
        f"{PACKAGED_HOME} nor {CHECKOUT_HOME} holds alembic.ini and migrations/): "
        "reinstall coupon-worker from its wheel")


def alembic_config(database_url: str | None = None) -> Config:
    from alembic.config import Config

    home = alembic_home()
    config = Config(str(home / "alembic.ini"))
    config.set_main_option("script_location", str(home / "migrations"))
    if database_url is not None:
        # ConfigParser treats % as interpolation; a URL-encoded password may contain it.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def script_directory() -> ScriptDirectory:
    """This release's migrations, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def shipped_revisions() -> ShippedRevisions:
    """This release's revision chain, read without Alembic (see ``schema``)."""
    return ShippedRevisions.read(alembic_home() / "migrations" / "versions")


def schema_status(database_url: str, *, connect_timeout_s: int = 5,
                  pooler: Literal["none", "transaction"] = "none") -> SchemaStatus:
    """Whether this release may run on the ledger of ``database_url`` (see ``schema``).

    ``pooler`` as ``COUPONS_DB_POOLER``. Raises ``PoolerMismatch`` when a pooler refuses the
    direct mode's connection (its timeouts in the startup packet), or accepts it and drops
    them (PgBouncer's ``ignore_startup_parameters = options``): the worker would run without
    its timeouts, and with prepared statements that the next server connection lacks.
    """
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine

    # A reachable but stalled server must not hang a worker's start either.
    engine = make_engine(database_url, pool_size=1, application_name="coupon-worker-check",
                         limits=ConnectionLimits(connect_timeout_s=connect_timeout_s,
                                                 statement_timeout_s=connect_timeout_s,
                                                 pooler=pooler))
    try:
        with engine.connect() as conn:
            timeout_ms = conn.execute(text(
                "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")).scalar()
            if str(timeout_ms) != str(connect_timeout_s * 1000):
                raise PoolerMismatch(
                    f"the connection came without the statement timeout it asked for "
                    f"({timeout_ms} ms instead of {connect_timeout_s * 1000}): a pooler "
                    f"dropped the startup parameter that carries it; behind a pooler in "
                    f"transaction mode set COUPONS_DB_POOLER=transaction (docs/pooler.md)")
            return schema.schema_status(conn, shipped_revisions())
    except sa_exc.OperationalError as exc:
        if refused_by_pooler(exc):
            raise PoolerMismatch(f"{POOLER_HINT}: {exc.orig}") from exc
        raise LedgerUnavailable(f"cannot reach PostgreSQL: {exc.orig}") from exc
    finally:
        engine.dispose()


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist; True if it was created."""
    url = make_url(database_url)
    name = url.database
    if not name:
        raise LedgerUnavailable("the database URL names no database")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if exists:
                return False
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(text(f"CREATE DATABASE {quoted}"))
            return True
    except sa_exc.OperationalError as exc:
        raise LedgerUnavailable(f"cannot reach PostgreSQL: {exc.orig}") from exc
    finally:
        admin.dispose()


def _lock_timed_out(exc: sa_exc.DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "55P03"  # lock_not_available


def upgrade(database_url: str, revision: str = "head", *,
            lock_retries: int = LOCK_RETRIES) -> None:
    """Run the Alembic migrations up to ``revision``.

    A migration that could not get its lock in time (the fleet held it) is rolled back whole
    and tried again, ``lock_retries`` times.
    """
    from alembic import command

    for attempt in range(lock_retries + 1):
        try:
            command.upgrade(alembic_config(database_url), revision)
            return
        except sa_exc.DBAPIError as exc:
            if _lock_timed_out(exc) and attempt < lock_retries:
                log.warning("migrate.lock_timeout", extra={"attempt": attempt + 1,
                                                           "retry_in_s": LOCK_RETRY_PAUSE_S})
                time.sleep(LOCK_RETRY_PAUSE_S)
                continue
            if _lock_timed_out(exc):
                raise LedgerError(
                    f"a migration could not take its lock {lock_retries + 1} times (long "
                    "transactions on the ledger hold it): nothing was changed; run "
                    "`coupon-worker migrate` again when they are done") from exc
            if isinstance(exc, sa_exc.OperationalError):
                raise LedgerUnavailable(f"cannot reach PostgreSQL: {exc.orig}") from exc
            raise


def grant_roles(database_url: str, prefix: str) -> list[str]:
    """After an upgrade: grant the ledger's roles (``worker.adapters.postgres.roles``) their tables,
    the new ones included. Nothing when the roles were never created (one user for everything)."""
    import psycopg

    from worker.adapters.postgres import roles

    names = roles.RoleNames(prefix)
    try:
        with roles.connect(database_url) as conn:
            if roles.missing_roles(conn, names):
                return []
            roles.apply_grants(conn, names)
    except psycopg.OperationalError as exc:
        raise LedgerUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
    except psycopg.Error as exc:
        raise LedgerError(f"cannot grant the roles their tables: {exc}") from exc
    return [names.of(job) for job in roles.JOBS if job != "owner"]


def current_revision(database_url: str) -> str | None:
    from alembic.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
