"""a message that fails for a reason not its own is tried again, then kept as a dead letter

Before this, an unexpected error in our code or a database error that was not an outage (a
pooler refusing a prepared statement, say) recorded the message as *rejected*, as if its bytes
were wrong. Now such a message goes back to its queue a few times, counted here per message
(``message_failures``), and past the limit it is kept in ``rejected_events`` with the kind of
failure (``internal_error`` or ``infrastructure``) instead of ``invalid``: a dead letter to
resubmit as received, never a rejection.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 14:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# A new table and a column with a default: the previous release inserts rejections without it
# and gets 'invalid', which is what it meant.
backward_compatible = True
lint_exceptions = {
    "prefer-bigint-over-int": "a count of failed deliveries, bounded by the failure limit",
    "adding-field-with-default": "a constant default is a catalog-only change since "
                                 "PostgreSQL 11: no rewrite, no long lock",
    "constraint-missing-not-valid": "the constraint is added with the column, whose every "
                                    "row takes the default that satisfies it",
}


def upgrade() -> None:
    op.add_column("rejected_events",
                  sa.Column("kind", sa.Text(), server_default=sa.text("'invalid'"),
                            nullable=False))
    op.create_check_constraint(
        op.f("ck_rejected_events_kind"), "rejected_events",
        "kind IN ('invalid', 'internal_error', 'infrastructure')")
    op.create_table(
        "message_failures",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_message_failures")),
    )


def downgrade() -> None:
    op.drop_table("message_failures")
    op.drop_constraint(op.f("ck_rejected_events_kind"), "rejected_events", type_="check")
    op.drop_column("rejected_events", "kind")
