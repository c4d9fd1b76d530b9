"""event traces: the W3C traceparent of an event's first delivery, when traces are recorded

Retries and replays of the event's entities run in traces of their own, linked to this one
(docs/tracing.md). NULL when tracing is off.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 17:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# A nullable column: the previous release does not write it, and reads no column by position.
backward_compatible = True


def upgrade() -> None:
    op.add_column("events", sa.Column("traceparent", sa.Text()))


def downgrade() -> None:
    op.drop_column("events", "traceparent")
