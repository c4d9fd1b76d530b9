"""retention: settled events can be pruned, and the audit trail only by the retention job

- ``events.pruned_at`` / ``events.outcome``: a pruned event keeps its row, emptied of the
  customer, metadata and payload, for the event-id window, so that a redelivery still meets
  the ``ON CONFLICT (event_id)`` of the intake and is not issued again (docs/retention.md);
- ``ix_events_prunable``: the settled events not yet pruned, by age;
- ``maintenance_runs``: one row per scheduled job, claimed with ``FOR UPDATE SKIP LOCKED`` so
  that one worker of the fleet runs it per interval;
- ``operator_actions``: the foreign key to ``entities`` goes (its ``ON DELETE SET NULL`` was an
  UPDATE of an audit row, which the append-only trigger refuses, so no entity could ever be
  deleted; an audit row keeps the id it acted on), and the trigger lets the retention job, and
  only it, delete rows past the audit retention.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 13:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Nullable columns, an index, a new table, one foreign key fewer and a trigger that still
# refuses every change the previous release could make (it never deletes an audit row).
backward_compatible = True
lint_exceptions = {
    "prefer-robust-stmts": "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
    "ban-drop-constraint": "the foreign key operator_actions -> entities goes on purpose: its "
                           "ON DELETE SET NULL rewrote audit rows, which the append-only "
                           "trigger refuses (dropping it takes a brief lock, no table scan)",
}

#: The youngest audit row the database lets even the retention job delete, in days: a floor
#: below ``COUPONS_RETENTION_AUDIT_DAYS`` (whose own minimum is the same) against a job
#: misconfigured by hand. Written out, not imported: a migration is a snapshot.
AUDIT_FLOOR_DAYS = 90

_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION operator_actions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'operator_actions is an append-only audit log (% refused)', TG_OP;
END
$$
"""

# The retention job says who it is and the age it keeps, for its own transaction only
# (set_config(..., true)); any other DELETE, and every UPDATE, is still refused.
_RETENTION_MAY_DELETE = f"""
CREATE OR REPLACE FUNCTION operator_actions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    keep_days integer;
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('coupons.retention_job', true) = 'audit' THEN
        keep_days := nullif(current_setting('coupons.audit_retention_days', true), '')::integer;
        IF keep_days >= {AUDIT_FLOOR_DAYS}
           AND OLD.at < now() - make_interval(days => keep_days) THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'audit row % is within the audit retention (% days, at least {AUDIT_FLOOR_DAYS})',
            OLD.id, keep_days;
    END IF;
    RAISE EXCEPTION 'operator_actions is an append-only audit log (% refused)', TG_OP;
END
$$
"""


def upgrade() -> None:
    op.add_column("events", sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("events", sa.Column("outcome", postgresql.JSONB(astext_type=sa.Text()),
                                      nullable=True))
    op.create_table(
        "maintenance_runs",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_by", sa.Text(), nullable=True),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()),
                  server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_runs")),
    )
    op.drop_constraint(op.f("fk_operator_actions_entity_id_entities"), "operator_actions",
                       type_="foreignkey")
    op.execute(_RETENTION_MAY_DELETE)
    # A table the running workers write: built concurrently, outside the migration's
    # transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_events_prunable", "events", ["received_at", "event_id"],
                        postgresql_where=sa.text("pruned_at IS NULL AND state = 'completed'"),
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_events_prunable", table_name="events")
    op.execute(_APPEND_ONLY)
    # Audit rows may name entities pruned meanwhile: the key is back for new rows only.
    op.create_foreign_key(op.f("fk_operator_actions_entity_id_entities"), "operator_actions",
                          "entities", ["entity_id"], ["id"], ondelete="SET NULL",
                          postgresql_not_valid=True)
    op.drop_table("maintenance_runs")
    op.drop_column("events", "outcome")
    op.drop_column("events", "pruned_at")
