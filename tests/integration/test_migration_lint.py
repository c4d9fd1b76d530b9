"""`make lint` runs squawk on each migration's SQL: a lock that would stall the fleet fails it,
unless the migration names the rule and says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic.config import Config

from coupon_devtools.migration_lint import OFFLINE_URL, lint
from worker.adapters.postgres.migrate import alembic_config, alembic_home, script_directory

BLOCKING = '''"""an index built the blocking way on a table the fleet writes"""
from alembic import op

revision = "9101"
down_revision = "{head}"
branch_labels = None
depends_on = None
{marker}
{exceptions}


def upgrade() -> None:
    op.create_index("ix_entities_probe", "entities", ["claimed_by"])


def downgrade() -> None:
    op.drop_index("ix_entities_probe", table_name="entities")
'''


def _with_migration(tmp_path: Path, *, marker: str = "backward_compatible = True",
                    exceptions: str = "") -> Config:
    target = tmp_path / "migrations"
    shutil.copytree(alembic_home() / "migrations", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    head = script_directory().get_current_head()
    (target / "versions" / "9101_blocking.py").write_text(
        BLOCKING.format(head=head, marker=marker, exceptions=exceptions), encoding="utf-8")
    config = alembic_config(OFFLINE_URL)
    config.set_main_option("script_location", str(target))
    return config


def test_a_blocking_index_fails_the_lint(tmp_path: Path) -> None:
    assert lint(_with_migration(tmp_path), tmp_path) == ["9101"]


def test_an_explained_exception_passes_and_an_unexplained_one_is_refused(
        tmp_path: Path) -> None:
    explained = ('lint_exceptions = {"require-concurrent-index-creation": '
                 '"a table of a few rows"}')
    assert lint(_with_migration(tmp_path / "a", exceptions=explained), tmp_path) == []
    unexplained = 'lint_exceptions = {"require-concurrent-index-creation": ""}'
    with pytest.raises(SystemExit, match="why"):
        lint(_with_migration(tmp_path / "b", exceptions=unexplained), tmp_path)


def test_a_migration_without_the_compatibility_marker_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="backward_compatible"):
        lint(_with_migration(tmp_path, marker=""), tmp_path)
