"""Alembic environment: migrates the ledger named by COUPONS_DATABASE_URL.

A caller may hand over an open connection instead (``config.attributes["connection"]``), which
is how ``coupon-worker migrate`` and the tests run migrations in-process.

Rolling upgrades (docs/operator-guide.md, Upgrading): every run first bounds how long a
statement may wait for a lock and how long it may run, so that a migration never stalls the
fleet's workers behind a lock it waits for (``coupon-worker migrate`` tries again later
instead); a migration that needs longer sets its own ``SET LOCAL statement_timeout``. After
the migrations, in the same transaction, the revision's compatibility is recorded for older
workers (``worker.adapters.postgres.schema``).

The limits are set for the migrations' transaction only (``SET LOCAL``): nothing is left on the
connection, which may be a pooler's server connection that other clients get next
(docs/pooler.md; migrations are best run on a direct URL all the same).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from worker.adapters.postgres.models import Base
from worker.adapters.postgres.schema import compatibility_comment

config = context.config
target_metadata = Base.metadata

LOCK_TIMEOUT = "2s"
STATEMENT_TIMEOUT = "60s"
TIMEOUTS = (f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'",
            f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")


def _url() -> str:
    explicit = config.get_main_option("sqlalchemy.url")
    if explicit:
        return explicit
    from worker.config import load_settings

    return load_settings().database_url


def _record_compatibility(revision: str | None) -> None:
    if revision is not None:
        context.execute(compatibility_comment(context.script, revision))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        for statement in TIMEOUTS:
            context.execute(statement)
        context.run_migrations()
        _record_compatibility(context.get_context().get_current_revision())
        # The caller's connection goes back as it came, should its transaction go on.
        context.execute("SET LOCAL lock_timeout = DEFAULT")
        context.execute("SET LOCAL statement_timeout = DEFAULT")


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        for statement in TIMEOUTS:
            context.execute(statement)
        context.run_migrations()
        destination = context.get_revision_argument()
        if isinstance(destination, str) and destination not in {"base", "heads"}:
            found = context.script.get_revision(destination)
            _record_compatibility(found.revision if found else None)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Nothing prepared on the server: through a pooler in transaction mode a prepared
    # statement would stay on a server connection that other clients get next.
    engine = create_engine(_url(), poolclass=pool.NullPool,
                           connect_args={"prepare_threshold": None})
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
