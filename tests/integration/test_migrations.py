"""Alembic's head is exactly the models' schema, and migrating is repeatable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from coupon_devtools.harness.databases import drop_database
from tests.conftest import PG_ADMIN_URL
from worker.ledger.migrate import alembic_config, current_revision, ensure_database, upgrade
from worker.ledger.models import Base


@pytest.fixture
def fresh_url() -> Iterator[str]:
    name = f"cw_mig_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    drop_database(PG_ADMIN_URL, name)


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
