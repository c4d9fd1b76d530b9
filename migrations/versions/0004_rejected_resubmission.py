"""rejected events can be resubmitted once fixed: a link to the event, the original kept as is

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 07:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Adds nullable columns and a trigger that still lets the previous release record its
# dead-letter announcement (dead_published_at).
backward_compatible = True


def upgrade() -> None:
    op.add_column("rejected_events",
                  sa.Column("resubmitted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("rejected_events", sa.Column("resubmitted_event_id", sa.Text(), nullable=True))
    # What was received is evidence: only the dead-letter announcement and the resubmission
    # link may change, and the link only once.
    op.execute(
        """
        CREATE FUNCTION rejected_events_keep_original() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.id, NEW.received_at, NEW.source, NEW.event_id, NEW.reason, NEW.raw,
                NEW.size_bytes, NEW.content_type)
               IS DISTINCT FROM
               (OLD.id, OLD.received_at, OLD.source, OLD.event_id, OLD.reason, OLD.raw,
                OLD.size_bytes, OLD.content_type) THEN
                RAISE EXCEPTION 'rejected_events keeps the message as received';
            END IF;
            IF OLD.resubmitted_at IS NOT NULL
               AND (NEW.resubmitted_at, NEW.resubmitted_event_id)
                   IS DISTINCT FROM (OLD.resubmitted_at, OLD.resubmitted_event_id) THEN
                RAISE EXCEPTION 'rejected event % was already resubmitted', OLD.id;
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER rejected_events_keep_original
        BEFORE UPDATE ON rejected_events
        FOR EACH ROW EXECUTE FUNCTION rejected_events_keep_original()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER rejected_events_keep_original ON rejected_events")
    op.execute("DROP FUNCTION rejected_events_keep_original()")
    op.drop_column("rejected_events", "resubmitted_event_id")
    op.drop_column("rejected_events", "resubmitted_at")
