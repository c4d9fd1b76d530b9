"""Alembic's head is exactly the models' schema, and migrating is repeatable."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from worker.adapters.postgres.migrate import (
    alembic_config,
    current_revision,
    ensure_database,
    schema_status,
    upgrade,
)
from worker.adapters.postgres.models import Base
from worker.adapters.postgres.schema import Verdict, compatible_from


def test_migrate_creates_the_database_and_head_matches_the_models(fresh_url: str) -> None:
    assert ensure_database(fresh_url) is True
    assert ensure_database(fresh_url) is False
    upgrade(fresh_url)
    upgrade(fresh_url)  # a second run is a no-op
    heads = ScriptDirectory.from_config(alembic_config(fresh_url)).get_heads()
    assert current_revision(fresh_url) in heads and len(heads) == 1
    engine = create_engine(fresh_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_migrate_records_which_releases_the_schema_serves(fresh_url: str) -> None:
    ensure_database(fresh_url)
    upgrade(fresh_url, "0003")
    assert schema_status(fresh_url).verdict is Verdict.OLDER
    upgrade(fresh_url)
    status = schema_status(fresh_url)
    script = ScriptDirectory.from_config(alembic_config(fresh_url))
    assert status.verdict is Verdict.CURRENT
    # What an older worker reads at start-up: the oldest revision whose code runs on this one
    assert status.compatible_from == compatible_from(script, status.head)


def test_the_migrate_command_says_where_the_schema_is_and_whom_it_serves(cli: Any) -> None:
    result = cli("migrate")
    assert result.exit_code == 0, result.output
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head
    assert f"to revision {head}" in result.output
    assert f"workers of revision {compatible_from(script, head)} and later" in result.output
