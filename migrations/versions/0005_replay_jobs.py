"""replay jobs: replays confirmed in the console, run by the workers at a chosen velocity

Also the indexes the console's pages need on a large ledger (dead-letter groups, recent
activity, coupons per minute, the audit by time).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# New tables and indexes only; the previous release never reads or writes the new tables.
backward_compatible = True
lint_exceptions = {
    "prefer-identity": "ids are SQLAlchemy's autoincrement BigInteger (bigserial), as in 0001",
    "prefer-bigint-over-int": "32-bit columns hold a velocity and item counts, never row ids",
    "prefer-robust-stmts": "the new tables are made in one transaction that rolls back whole; "
                           "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
}


def upgrade() -> None:
    op.create_table(
        "replay_jobs",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("selection", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()),
                  server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("velocity_per_min", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), server_default="running", nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('running', 'paused', 'cancelled', 'done')",
                           name=op.f("ck_replay_jobs_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_jobs")),
    )
    op.create_index("ix_replay_jobs_due", "replay_jobs", ["next_at"],
                    postgresql_where=sa.text("state = 'running'"))
    op.create_table(
        "replay_job_items",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'done', 'cancelled')",
                           name=op.f("ck_replay_job_items_state")),
        sa.ForeignKeyConstraint(["job_id"], ["replay_jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_replay_job_items_job_id_replay_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_job_items")),
        sa.UniqueConstraint("job_id", "entity_id", name=op.f("uq_replay_job_items_job_id_entity_id")),
    )
    op.create_index("ix_replay_job_items_pending", "replay_job_items", ["job_id", "id"],
                    postgresql_where=sa.text("state = 'pending'"))
    # Tables the running workers write: their indexes are built concurrently, outside the
    # migration's transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_entities_dead_groups", "entities",
                        ["last_error_code", "series_id", "last_error_message"],
                        postgresql_where=sa.text("state = 'dead'"), postgresql_concurrently=True)
        op.create_index("ix_entities_updated_at", "entities", ["updated_at"],
                        postgresql_concurrently=True)
        op.create_index("ix_operator_actions_at", "operator_actions", ["at"],
                        postgresql_concurrently=True)
        op.create_index("ix_coupons_issued_at", "coupons", ["issued_at"],
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_coupons_issued_at", table_name="coupons")
    op.drop_index("ix_operator_actions_at", table_name="operator_actions")
    op.drop_index("ix_entities_updated_at", table_name="entities")
    op.drop_index("ix_entities_dead_groups", table_name="entities")
    op.drop_index("ix_replay_job_items_pending", table_name="replay_job_items")
    op.drop_table("replay_job_items")
    op.drop_index("ix_replay_jobs_due", table_name="replay_jobs")
    op.drop_table("replay_jobs")
