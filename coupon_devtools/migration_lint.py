"""Lint every migration's SQL with squawk, one revision at a time (``make lint`` runs this).

Each revision's offline SQL (``alembic upgrade PREV:REV --sql``) is linted on its own, so that a
statement on an existing table is judged as one, not excused because the same file created the
table. A migration may break a rule on purpose: it says which and why, in its module::

    lint_exceptions = {
        "require-concurrent-index-creation": "the table is new in this release: nobody writes it",
    }

and every migration must say whether it is an expand step (``backward_compatible``, see
``worker.adapters.postgres.schema``). Usage: ``python -m coupon_devtools.migration_lint [-v]``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory

from worker.adapters.postgres.migrate import alembic_config
from worker.adapters.postgres.schema import declared_compatible

# The oldest PostgreSQL the project runs on (CI's); squawk judges locks for that version.
PG_VERSION = "15.0"
EXCEPTIONS = "lint_exceptions"
# Offline mode never connects; the URL only picks the dialect.
OFFLINE_URL = "postgresql+psycopg://offline/lint"


def squawk_command() -> str:
    beside = Path(sys.executable).parent / "squawk"
    found = str(beside) if beside.exists() else shutil.which("squawk")
    if not found:
        raise SystemExit("squawk is not installed: pip install -e '.[dev]' (squawk-cli)")
    return found


def offline_sql(config: Config, revision: Script) -> str:
    buffer = io.StringIO()
    config.output_buffer = buffer
    down = revision.down_revision
    if down is not None and not isinstance(down, str):
        raise SystemExit(f"migration {revision.revision} merges branches: lint it by hand")
    span = f"{down}:{revision.revision}" if down else revision.revision
    command.upgrade(config, span, sql=True)
    return buffer.getvalue()


def exceptions_of(revision: Script) -> dict[str, str]:
    declared = getattr(revision.module, EXCEPTIONS, {})
    if not isinstance(declared, dict) or not all(
            isinstance(rule, str) and isinstance(why, str) and why.strip()
            for rule, why in declared.items()):
        raise SystemExit(f"migration {revision.revision}: {EXCEPTIONS} must map each squawk "
                         "rule to why breaking it is safe here")
    return declared


def lint(config: Config, workdir: Path, *, verbose: bool = False) -> list[str]:
    """Lint each revision of ``config``'s migrations, oldest first; the failing revisions.

    ``config`` is an offline one (``alembic_config(OFFLINE_URL)``): nothing connects.
    """
    squawk = squawk_command()
    script = ScriptDirectory.from_config(config)
    failures = []
    for revision in reversed(list(script.walk_revisions())):
        try:
            declared_compatible(script, revision.revision)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        path = workdir / f"{Path(revision.path).stem}.sql"
        path.write_text(offline_sql(config, revision), encoding="utf-8")
        excluded = sorted(exceptions_of(revision))
        argv = [squawk, f"--pg-version={PG_VERSION}", str(path)]
        if excluded:
            argv.insert(1, f"--exclude={','.join(excluded)}")
        result = subprocess.run(argv, capture_output=True, text=True, check=False,  # noqa: S603 - our argv
                                timeout=60)
        if verbose or result.returncode:
            print(f"-- {revision.revision}: squawk excluding {excluded or 'nothing'}")
            print(result.stdout.strip() or result.stderr.strip())
        if result.returncode:
            failures.append(revision.revision)
    return failures


def main(argv: list[str]) -> int:
    config = alembic_config(OFFLINE_URL)
    script = ScriptDirectory.from_config(config)
    with tempfile.TemporaryDirectory(prefix="coupon-migration-lint-") as scratch:
        failures = lint(config, Path(scratch), verbose="-v" in argv)
    if failures:
        print(f"squawk found problems in migration(s) {', '.join(failures)}: make them safe for "
              f"a running fleet, or name the rule in the migration's {EXCEPTIONS} with why "
              "(docs/operator-guide.md, Upgrading)", file=sys.stderr)
        return 1
    print(f"migrations: {len(list(script.walk_revisions()))} linted with squawk, no problem")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
