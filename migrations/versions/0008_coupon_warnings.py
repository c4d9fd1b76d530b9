"""coupon warnings: what Capillary's answer warned of when it issued the coupon

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 13:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# A nullable column: the previous release does not write it, and reads no column by position.
backward_compatible = True


def upgrade() -> None:
    # A JSON list of the warnings' text, NULL when there were none.
    op.add_column("coupons", sa.Column("warnings", postgresql.JSONB(astext_type=sa.Text())))


def downgrade() -> None:
    op.drop_column("coupons", "warnings")
