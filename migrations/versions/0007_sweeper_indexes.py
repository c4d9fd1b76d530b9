"""indexes for the sweeper's two scans: events left processing, rejections not yet announced

Every worker sweeps once a second. Without these, two of its statements read a whole table
each time (events by state, rejected messages by whether they were announced on the dead
queue), a cost that grows with the ledger rather than with the work to do.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 13:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Indexes only.
backward_compatible = True
lint_exceptions = {
    "prefer-robust-stmts": "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
}


def upgrade() -> None:
    # Tables the running workers write: built concurrently, outside the migration's
    # transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_events_processing", "events", ["event_id"],
                        postgresql_where=sa.text("state = 'processing'"),
                        postgresql_concurrently=True)
        op.create_index("ix_rejected_events_unannounced", "rejected_events", ["id"],
                        postgresql_where=sa.text("dead_published_at IS NULL"),
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_rejected_events_unannounced", table_name="rejected_events")
    op.drop_index("ix_events_processing", table_name="events")
