"""Which ledger schema a worker may run on, judged from this release's migrations and what
`migrate` recorded; and the build-info metric that says which release runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from worker import __version__
from worker.adapters.postgres.migrate import script_directory, shipped_revisions
from worker.adapters.postgres.schema import (
    MARKER,
    ShippedRevisions,
    Verdict,
    compatible_from,
    judge,
)
from worker.metrics import Metrics, exposition_registry


@pytest.fixture(scope="module")
def script() -> ScriptDirectory:
    return script_directory()


def _head(script: ScriptDirectory) -> str:
    head = script.get_current_head()
    assert head
    return head


def test_every_migration_says_whether_the_previous_release_runs_on_it(
        script: ScriptDirectory) -> None:
    for revision in script.walk_revisions():
        assert isinstance(getattr(revision.module, MARKER, None), bool), (
            f"migration {revision.revision} must declare `{MARKER} = True | False`: does the "
            "previous release's code run on its schema? (docs/operator-guide.md, Upgrading)")


def test_compatibility_reaches_back_over_expand_steps_and_stops_at_a_contract_step(
        script: ScriptDirectory) -> None:
    # 0004 (expand) serves 0003's code; 0003 dropped a constraint 0002's code relied on
    assert compatible_from(script, "0004") == "0003"
    assert compatible_from(script, "0003") == "0003"
    # 0002 (expand) serves 0001's code; 0001 is the first
    assert compatible_from(script, "0002") == "0001"


def test_a_worker_runs_on_its_own_head_or_a_newer_compatible_schema_only(
        script: ScriptDirectory) -> None:
    head = _head(script)
    assert judge(script, head, head).verdict is Verdict.CURRENT
    # A later release's schema that serves this release's code (or older)
    newer = judge(script, "9999", head)
    assert newer.verdict is Verdict.NEWER_COMPATIBLE and newer.runnable
    assert judge(script, "9999", "0001").runnable
    # A later release's contract step, or a schema migrated before compatibility was recorded
    for recorded in ("9999", None):
        refused = judge(script, "9999", recorded)
        assert refused.verdict is Verdict.NEWER_INCOMPATIBLE and not refused.runnable
        assert "upgrade this worker" in refused.explain()
    # Older than this release, or never migrated: the operator is told what to run
    for ledger, verdict in (("0001", Verdict.OLDER), (None, Verdict.EMPTY)):
        status = judge(script, ledger, None)
        assert status.verdict is verdict and not status.runnable
        assert "run `coupon-worker migrate`" in status.explain()


def test_the_build_info_metric_names_version_and_schemas() -> None:
    from prometheus_client import generate_latest

    labels = {"version": __version__, "schema": "0004", "ledger_schema": "0005"}
    registry = exposition_registry(Metrics().registry, None, labels)
    text = generate_latest(registry).decode()
    assert (f'coupon_worker_build_info{{ledger_schema="0005",schema="0004",'
            f'version="{__version__}"}} 1.0') in text


def test_the_start_up_check_reads_the_same_chain_as_alembic(script: ScriptDirectory) -> None:
    # Given the revisions read from the migration files, without Alembic
    shipped = shipped_revisions()
    # Then they are Alembic's: the same head and the same chain down to the first
    assert shipped.get_current_head() == _head(script)
    assert [r.revision for r in shipped.walk_revisions()] == [
        r.revision for r in script.walk_revisions()]
    assert [(r.revision, r.down_revision) for r in shipped.iterate_revisions("0004", "base")] \
        == [(r.revision, r.down_revision) for r in script.iterate_revisions("0004", "base")]
    # And a worker judges every ledger the same way with either
    head = _head(script)
    for ledger, recorded in ((head, head), ("9999", head), ("9999", None), ("0001", None),
                             (None, None)):
        assert judge(shipped, ledger, recorded) == judge(script, ledger, recorded)


def test_migrations_with_two_heads_are_refused(tmp_path: Path) -> None:
    for name, revision, down in (("a", "0001", None), ("b", "0002", "0001"),
                                 ("c", "0003", "0001")):
        (tmp_path / f"{name}.py").write_text(
            f"revision: str = {revision!r}\ndown_revision: str | None = {down!r}\n")
    with pytest.raises(ValueError, match="several heads"):
        ShippedRevisions.read(tmp_path).get_current_head()
