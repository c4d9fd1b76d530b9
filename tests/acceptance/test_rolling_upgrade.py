"""Rolling upgrades: a migration applied under a running worker stalls nothing and issues
everything exactly once; a worker starts on a newer schema only when the migrations that made
it say it may, and refuses an older one with the command to run."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from coupon_devtools.harness.databases import drop_database
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish
from tests.conftest import PG_ADMIN_URL, WorkerProcess, wait_until
from worker import __version__
from worker.adapters.postgres.migrate import alembic_config, alembic_home, ensure_database, upgrade
from worker.config import Settings
from worker.entrypoints.celery.app import create_app

pytestmark = pytest.mark.slow

PROBE = "9001"
# The next release's migration, as docs/operator-guide.md asks for one: an expand step, its
# index built concurrently, outside the migration's transaction.
EXPAND = '''"""rolling-upgrade probe: an expand step"""
import sqlalchemy as sa
from alembic import op

revision = "{probe}"
down_revision = "{head}"
branch_labels = None
depends_on = None
backward_compatible = True


def upgrade() -> None:
    op.add_column("entities", sa.Column("probe_note", sa.Text(), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index("ix_entities_probe_note", "entities", ["probe_note"],
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_entities_probe_note", table_name="entities")
    op.drop_column("entities", "probe_note")
'''


@pytest.fixture
def own_ledger() -> Iterator[str]:
    """A database of this test's own: it changes the schema under its workers."""
    name = f"cw_roll_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    ensure_database(url)
    yield url
    drop_database(PG_ADMIN_URL, name)


def _next_release(tmp_path: Path, head: str) -> Path:
    """This release's migrations plus the probe: what the next release would ship."""
    target = tmp_path / "next-release"
    shutil.copytree(alembic_home() / "migrations", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (target / "versions" / f"{PROBE}_probe.py").write_text(
        EXPAND.format(probe=PROBE, head=head), encoding="utf-8")
    return target


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _stats(settings: Settings, worker: WorkerProcess) -> dict[str, str]:
    node = f"{worker.name}@{socket.gethostname()}"
    app = create_app(settings)
    try:
        replies = app.control.inspect(destination=[node], timeout=5.0).stats() or {}
    finally:
        app.close()
    assert node in replies, f"no stats from {node}: {replies}"
    info: dict[str, str] = replies[node]["coupon_worker"]
    return info


def test_an_expand_migration_under_a_running_worker_stalls_and_repeats_nothing(
    own_ledger: str, settings_factory: Callable[..., Settings], sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    upgrade(own_ledger)
    this_head = _head()
    settings = settings_factory(database_url=own_ledger)
    engine = create_engine(own_ledger, poolclass=NullPool)
    start_worker(settings, concurrency=2)
    events = [example_event(f"roll-{n}", series=(544770,), customer=str(567_000_000 + n))
              for n in range(30)]

    def publish_steadily() -> None:
        for event in events:
            publish(settings, event)
            time.sleep(0.1)

    # Given events flowing through a worker of this release
    publisher = threading.Thread(target=publish_steadily, daemon=True)
    publisher.start()
    wait_until(lambda: _count(engine, "SELECT count(*) FROM coupons") >= 5,
               message="the worker to be issuing")
    # When the next release's expand migration is applied meanwhile
    config = alembic_config(own_ledger)
    config.set_main_option("script_location", str(_next_release(tmp_path, this_head)))
    started = time.monotonic()
    command.upgrade(config, "head")
    took_s = time.monotonic() - started
    issued_at_migration = _count(engine, "SELECT count(*) FROM coupons")
    publisher.join(timeout=30)
    # Then it took no lock that stalled the worker, and every event is issued exactly once
    assert took_s < 10, f"the migration took {took_s:.1f} s"
    assert issued_at_migration < len(events), "the migration ran while events were flowing"
    wait_until(lambda: _count(engine, "SELECT count(*) FROM events WHERE state = 'completed'")
               == len(events), timeout_s=60, message="every event completed")
    theirs = sandbox.ledger()
    assert len(theirs) == len(events)
    assert len({(json.dumps(c["customer"], sort_keys=True), c["seriesId"])
                for c in theirs}) == len(events)
    assert _count(engine, "SELECT count(*) FROM coupons") == len(events)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == PROBE
    engine.dispose()


def _head() -> str:
    from worker.adapters.postgres.migrate import script_directory

    head = script_directory().get_current_head()
    assert head
    return head


def test_a_worker_starts_on_a_newer_compatible_schema_and_says_so(
    own_ledger: str, settings_factory: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    # Given a ledger the next release migrated (its migration says it is backward compatible)
    config = alembic_config(own_ledger)
    config.set_main_option("script_location", str(_next_release(tmp_path, _head())))
    command.upgrade(config, "head")
    settings = settings_factory(database_url=own_ledger)
    # When a worker of this release starts, then it runs and tells what it is, on what
    worker = start_worker(settings, concurrency=1)
    assert _stats(settings, worker) == {"version": __version__, "schema": _head(),
                                        "ledger_schema": PROBE, "metrics_port": None}


def _refused(start_worker: Callable[..., WorkerProcess], settings: Settings) -> str:
    worker = start_worker(settings, concurrency=1, wait_ready=False)
    code = worker.process.wait(timeout=60)
    assert code != 0, worker.log()
    return worker.log()


def test_a_worker_refuses_an_older_schema_and_an_incompatible_newer_one(
    own_ledger: str, settings_factory: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = settings_factory(database_url=own_ledger)
    # An older schema: the operator is told to migrate
    upgrade(own_ledger, "0003")
    assert "run `coupon-worker migrate`" in _refused(start_worker, settings)
    # A newer schema whose migrations say this release's code cannot run on it
    upgrade(own_ledger)
    engine = create_engine(own_ledger)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9002'"))
        conn.execute(text(
            "COMMENT ON TABLE alembic_version IS 'coupon-worker compatible-from=9002'"))
    engine.dispose()
    assert "upgrade this worker" in _refused(start_worker, settings)
