"""operator_actions is append-only: an audit row cannot be changed or deleted

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 02:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Adds a trigger only: the previous release never updates or deletes an audit row.
backward_compatible = True


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION operator_actions_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'operator_actions is an append-only audit log (% refused)', TG_OP;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER operator_actions_append_only
        BEFORE UPDATE OR DELETE ON operator_actions
        FOR EACH ROW EXECUTE FUNCTION operator_actions_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER operator_actions_append_only ON operator_actions")
    op.execute("DROP FUNCTION operator_actions_append_only()")
