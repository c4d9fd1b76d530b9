"""Create the ledger database if it is missing, then bring its schema to Alembic's head."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from worker.errors import LedgerUnavailable

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    # ConfigParser treats % as interpolation; a URL-encoded password may contain it.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


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


def upgrade(database_url: str, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision``."""
    try:
        command.upgrade(alembic_config(database_url), revision)
    except sa_exc.OperationalError as exc:
        raise LedgerUnavailable(f"cannot reach PostgreSQL: {exc.orig}") from exc


def current_revision(database_url: str) -> str | None:
    from alembic.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
