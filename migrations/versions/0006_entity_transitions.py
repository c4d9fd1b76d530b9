"""the entity state machine enforced by the database: every state change must be an allowed move

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 10:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Adds a table and a trigger; the previous release makes only moves the trigger allows.
backward_compatible = True

# The moves of ``worker.domain.TRANSITIONS`` at this revision, plus "a coupon proven issued is
# recorded from any state not already issued". Written out, not imported: a migration is a
# snapshot. A test compares this table with the domain's, so a change to the state machine
# needs a migration that changes the table too.
ALLOWED = (
    ("dead", "discarded"), ("dead", "duplicate_issued"), ("dead", "issued"), ("dead", "queued"),
    ("discarded", "duplicate_issued"), ("discarded", "issued"),
    ("in_flight", "dead"), ("in_flight", "duplicate_issued"), ("in_flight", "issued"),
    ("in_flight", "retry_wait"),
    ("issued", "duplicate_issued"),
    ("pending", "duplicate_issued"), ("pending", "in_flight"), ("pending", "issued"),
    ("queued", "duplicate_issued"), ("queued", "in_flight"), ("queued", "issued"),
    ("queued", "retry_wait"),
    ("retry_wait", "duplicate_issued"), ("retry_wait", "in_flight"), ("retry_wait", "issued"),
    ("retry_wait", "queued"),
)


def upgrade() -> None:
    moves = op.create_table(
        "entity_transitions",
        sa.Column("from_state", sa.Text(), nullable=False),
        sa.Column("to_state", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("from_state", "to_state", name=op.f("pk_entity_transitions")),
    )
    op.bulk_insert(moves, [{"from_state": a, "to_state": b} for a, b in ALLOWED])
    # Per row, only when the state changes: a lease renewal (in_flight -> in_flight) and every
    # update of other columns cost one comparison.
    op.execute(
        """
        CREATE FUNCTION entities_allowed_move() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM entity_transitions
                           WHERE from_state = OLD.state AND to_state = NEW.state) THEN
                RAISE EXCEPTION 'entity % cannot move from % to %', OLD.id, OLD.state, NEW.state
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER entities_allowed_move BEFORE UPDATE OF state ON entities
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
        EXECUTE FUNCTION entities_allowed_move()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER entities_allowed_move ON entities")
    op.execute("DROP FUNCTION entities_allowed_move()")
    op.drop_table("entity_transitions")
