"""Which ledger schema a worker of this release may run on: rolling upgrades, checked.

Every migration module says whether it is an *expand* step, one that the previous release's
code keeps working on::

    #: The previous revision's code runs unchanged on this schema (docs/operator-guide.md).
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

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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


class _Revision(Protocol):
    @property
    def revision(self) -> str: ...


class Migrations(Protocol):
    """What :func:`judge` reads of a release's migrations: Alembic's ``ScriptDirectory``, or
    :class:`ShippedRevisions`."""

    def get_current_head(self) -> str | None: ...

    def walk_revisions(self) -> Iterable[_Revision]: ...

    def iterate_revisions(self, upper: str, lower: str) -> Iterable[_Revision]: ...


@dataclass(frozen=True)
class ShippedRevision:
    revision: str
    down_revision: str | None


@dataclass(frozen=True)
class ShippedRevisions:
    """This release's revision chain, read from the migration files' ``revision`` and
    ``down_revision`` assignments without importing Alembic or the migrations: a worker's
    start-up check needs no more, and Alembic's import (Mako, Pygments) is a good part of a
    worker's start-up time. The migrations form one line (``migrations/env.py`` makes no
    branches); a tree with several heads is refused."""

    down: Mapping[str, str | None]

    @classmethod
    def read(cls, versions: Path) -> ShippedRevisions:
        down: dict[str, str | None] = {}
        for path in sorted(versions.glob("*.py")):
            found = _assignments(path, ("revision", "down_revision"))
            if "revision" in found:
                revision = found["revision"]
                if not isinstance(revision, str):
                    raise ValueError(f"{path.name}: revision is not a string")
                down_revision = found.get("down_revision")
                if down_revision is not None and not isinstance(down_revision, str):
                    raise ValueError(f"{path.name}: down_revision is not one revision")
                down[revision] = down_revision
        return cls(down)

    def get_current_head(self) -> str | None:
        heads = set(self.down) - {d for d in self.down.values() if d is not None}
        if len(heads) > 1:
            raise ValueError(f"the migrations have several heads: {sorted(heads)}")
        return next(iter(heads), None)

    def walk_revisions(self) -> Iterator[ShippedRevision]:
        head = self.get_current_head()
        return self.iterate_revisions(head, "base") if head else iter(())

    def iterate_revisions(self, upper: str, lower: str) -> Iterator[ShippedRevision]:
        """From ``upper`` down to ``lower`` ("base": the first)."""
        revision: str | None = upper
        while revision is not None and revision in self.down:
            yield ShippedRevision(revision, self.down[revision])
            if revision == lower:
                return
            revision = self.down[revision]


def _assignments(path: Path, names: tuple[str, ...]) -> dict[str, object]:
    """The constant values a module assigns at top level to ``names``."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(), str(path)).body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        if isinstance(target, ast.Name) and target.id in names and value is not None:
            found[target.id] = ast.literal_eval(value)
    return found


def declared_compatible(script: ScriptDirectory, revision: str) -> bool:
    """The migration's marker; a module without one fails loudly rather than guessing."""
    found = script.get_revision(revision)
    assert found is not None, revision
    module = found.module
    value = getattr(module, MARKER, None)
    if not isinstance(value, bool):
        raise ValueError(f"migration {revision} must declare `{MARKER} = True | False` "
                         "(see worker/adapters/postgres/schema.py)")
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


def judge(script: Migrations, ledger: str | None, recorded_from: str | None,
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


def schema_status(conn: Connection, script: Migrations) -> SchemaStatus:
    ledger, recorded_from = read_ledger(conn)
    return judge(script, ledger, recorded_from)

