"""Which ledger schema a worker of this release may run on: rolling upgrades, checked.

Every migration module says whether it is an *expand* step, one that the previous release's
code keeps working on::

    #: The previous revision's code runs unchanged on this schema (see README, Upgrading).
    backward_compatible = True

``coupon-worker migrate`` records, in the database, the oldest revision whose code still runs
on the schema it leaves (walking back from the new revision while migrations are backward
compatible): a comment on Alembic's ``alembic_version`` table, written in the migration's own
transaction. An older worker cannot read the new release's migration files, so this record is
how it learns, at start-up, that it may keep running during the roll.

A worker then starts when the ledger is at its own head, or newer but compatible with it; it
refuses a schema older than its head (run ``coupon-worker migrate``) and a newer one that says
it is not compatible (upgrade the worker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory
    from sqlalchemy import Connection

MARKER = "backward_compatible"
VERSION_TABLE = "alembic_version"
_COMMENT_PREFIX = "coupon-worker compatible-from="
_COMMENT = re.compile(re.escape(_COMMENT_PREFIX) + r"(\w+)")


class Verdict(StrEnum):
    CURRENT = "current"  # the ledger is at this release's head
    NEWER_COMPATIBLE = "newer_compatible"  # a later release migrated it; we may run on it
    OLDER = "older"  # run `coupon-worker migrate`
    NEWER_INCOMPATIBLE = "newer_incompatible"  # upgrade this worker
    EMPTY = "empty"  # never migrated


@dataclass(frozen=True)
class SchemaStatus:
    """The ledger's revision against the revisions this release ships."""

    ledger: str | None
    head: str
    compatible_from: str | None
    verdict: Verdict

    @property
    def runnable(self) -> bool:
        return self.verdict in {Verdict.CURRENT, Verdict.NEWER_COMPATIBLE}

    def explain(self) -> str:
        if self.verdict is Verdict.CURRENT:
            return f"ledger schema {self.ledger} is this release's"
        if self.verdict is Verdict.NEWER_COMPATIBLE:
            return (f"ledger schema {self.ledger} is newer than this release's ({self.head}) "
                    f"and serves workers from {self.compatible_from} on")
        if self.verdict is Verdict.EMPTY:
            return ("the ledger has no schema yet: run `coupon-worker migrate` before starting "
                    "workers")
        if self.verdict is Verdict.OLDER:
            return (f"ledger schema {self.ledger} is older than this release needs "
                    f"({self.head}): run `coupon-worker migrate`, then start the workers")
        since = self.compatible_from or "unknown"
        return (f"ledger schema {self.ledger} is newer than this release ({self.head}) and not "
                f"compatible with it (it serves workers from {since} on): upgrade this worker")


def declared_compatible(script: ScriptDirectory, revision: str) -> bool:
    """The migration's marker; a module without one fails loudly rather than guessing."""
    found = script.get_revision(revision)
    assert found is not None, revision
    module = found.module
    value = getattr(module, MARKER, None)
    if not isinstance(value, bool):
        raise ValueError(f"migration {revision} must declare `{MARKER} = True | False` "
                         "(see worker/ledger/schema.py)")
    return value


def compatible_from(script: ScriptDirectory, revision: str) -> str:
    """The oldest revision whose code runs on ``revision``'s schema.

    Each backward-compatible migration extends the range one revision back; the first one that
    is not stops it (compatibility is taken to chain: expand steps only add).
    """
    oldest = revision
    while True:
        found = script.get_revision(oldest)
        assert found is not None
        down = found.down_revision
        if not isinstance(down, str) or not declared_compatible(script, oldest):
            return oldest
        oldest = down


def compatibility_comment(script: ScriptDirectory, revision: str) -> str:
    """The statement that records ``revision``'s compatibility on the version table."""
    return (f"COMMENT ON TABLE {VERSION_TABLE} IS "
            f"'{_COMMENT_PREFIX}{compatible_from(script, revision)}'")


def read_ledger(conn: Connection) -> tuple[str | None, str | None]:
    """The ledger's revision and the compatibility recorded with it."""
    exists = conn.execute(text("SELECT to_regclass(:t)"), {"t": VERSION_TABLE}).scalar()
    if exists is None:
        return None, None
    revision = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()  # noqa: S608 - a constant
    comment = conn.execute(text("SELECT obj_description(to_regclass(:t), 'pg_class')"),
                           {"t": VERSION_TABLE}).scalar()
    found = _COMMENT.search(comment or "")
    return revision, found.group(1) if found else None


def judge(script: ScriptDirectory, ledger: str | None, recorded_from: str | None,
          ) -> SchemaStatus:
    """Whether this release (``script``'s migrations) may run on the ledger at ``ledger``."""
    head = script.get_current_head()
    assert head is not None
    known = {rev.revision for rev in script.walk_revisions()}
    if ledger is None:
        return SchemaStatus(None, head, None, Verdict.EMPTY)
    if ledger == head:
        return SchemaStatus(ledger, head, recorded_from, Verdict.CURRENT)
    if ledger in known:
        return SchemaStatus(ledger, head, recorded_from, Verdict.OLDER)
    ours = {rev.revision for rev in script.iterate_revisions(head, "base")}
    verdict = (Verdict.NEWER_COMPATIBLE if recorded_from in ours
               else Verdict.NEWER_INCOMPATIBLE)
    return SchemaStatus(ledger, head, recorded_from, verdict)


def schema_status(conn: Connection, script: ScriptDirectory) -> SchemaStatus:
    ledger, recorded_from = read_ledger(conn)
    return judge(script, ledger, recorded_from)

