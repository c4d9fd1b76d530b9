"""Ship the ledger's migrations inside the package.

The migrations stay in the top-level ``migrations/`` folder with ``alembic.ini`` beside them,
where ``alembic`` run from a checkout finds them. A wheel has no such folder, so the build copies
both into ``worker/adapters/postgres/alembic/`` of the built package;
``worker.adapters.postgres.migrate`` looks there first and falls back to the checkout (an editable
install). Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# Where the copy lands inside the package, relative to the build directory.
PACKAGED_ALEMBIC = Path("worker", "adapters", "postgres", "alembic")


class BuildWithMigrations(build_py):
    """``build_py`` plus the Alembic configuration and migrations under the package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        target = Path(self.build_lib) / PACKAGED_ALEMBIC
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "migrations", target / "migrations",
                        ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
        shutil.copy2(HERE / "alembic.ini", target / "alembic.ini")


setup(cmdclass={"build_py": BuildWithMigrations})
