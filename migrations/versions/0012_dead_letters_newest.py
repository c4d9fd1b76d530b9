"""an index for the dead letters newest first: ``dlq list`` and the console's page read a page

``dlq list`` (and the console's dead-letter page) shows the newest dead entities first
(``ORDER BY dead_at DESC NULLS LAST, id DESC LIMIT n``). ``ix_entities_dead`` holds the dead
entities in ``dead_at`` order, but a backward walk of it gives NULLS FIRST and no ``id`` order,
so PostgreSQL read every dead entity and sorted them to return a page: a cost that grew with
the dead letters of the ledger's whole life (60,000 in a ledger of two million entities).
Walked in this index's order, a page costs the page.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 16:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# An index only.
backward_compatible = True
lint_exceptions = {
    "prefer-robust-stmts": "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
}


def upgrade() -> None:
    # A table the running workers write: built concurrently, outside the migration's
    # transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_entities_dead_newest", "entities",
                        [sa.text("dead_at DESC NULLS LAST"), sa.text("id DESC")],
                        postgresql_where=sa.text("state = 'dead'"),
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_entities_dead_newest", table_name="entities")
