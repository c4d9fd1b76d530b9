"""a person may give up on a waiting entity: the move retry_wait -> dead is allowed

The console's Waiting view (and ``waiting give-up``) makes an entity waiting for a retry, or
for an unknown outcome to settle, a dead letter with the operator's reason.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 16:10:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# One more allowed move; the previous release never makes it.
backward_compatible = True


def upgrade() -> None:
    op.execute("INSERT INTO entity_transitions (from_state, to_state) "
               "VALUES ('retry_wait', 'dead') ON CONFLICT DO NOTHING")


def downgrade() -> None:
    op.execute("DELETE FROM entity_transitions "
               "WHERE from_state = 'retry_wait' AND to_state = 'dead'")
