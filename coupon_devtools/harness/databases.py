"""PostgreSQL databases of a tool's or a test session's own: drop, create, migrate."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

ADMIN_DATABASE = "postgres"
CONNECT_TIMEOUT_S = 5


def drop_database(url: str | URL, name: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S,
                  ) -> None:
    """Drop database ``name`` on the server of ``url`` if it exists, closing its connections
    first (``WITH (FORCE)``): a run that died may have left some open."""
    admin_url = make_url(url).set(database=ADMIN_DATABASE)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": connect_timeout_s})
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


def create_migrated(url: str) -> None:
    """Create the database of ``url`` if it is missing and upgrade it to the newest schema."""
    from worker.adapters.postgres.migrate import ensure_database, upgrade

    ensure_database(url)
    upgrade(url)


def recreate_migrated(url: str) -> None:
    """Start from an empty ledger: drop the database of ``url``, create it and migrate it."""
    name = make_url(url).database
    if not name:
        raise ValueError("the database URL names no database")
    drop_database(url, name)
    create_migrated(url)
