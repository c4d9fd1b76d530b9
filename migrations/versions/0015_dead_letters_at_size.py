"""dead letters at size: newest first a page at a time, and their groups from an index alone

``dlq list`` (and the console's dead-letter page) shows the newest dead entities first
(``ORDER BY dead_at DESC NULLS LAST, id DESC LIMIT n``). ``ix_entities_dead`` holds the dead
entities in ``dead_at`` order, but a backward walk of it gives NULLS FIRST and no ``id`` order,
so PostgreSQL read every dead entity and sorted them to return a page: a cost that grew with
the dead letters of the ledger's whole life (60,000 in a ledger of two million entities).
Walked in this index's order, a page costs the page.

The console's dead-letter groups (cause x series x message, with the first and last
``dead_at``) read ``ix_entities_dead_groups`` and then every dead entity's row for its
``dead_at``: ``ix_entities_dead_causes`` carries ``dead_at`` (INCLUDE), so the groups are
counted from the index alone (an index-only scan), and replaces it. The groups still cost in
proportion to the dead letters kept (discarding or replaying them is what shrinks it).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 16:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# Indexes only: the previous release's statements read the same rows.
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
        op.create_index("ix_entities_dead_causes", "entities",
                        ["last_error_code", "series_id", "last_error_message"],
                        postgresql_where=sa.text("state = 'dead'"),
                        postgresql_include=["dead_at"], postgresql_concurrently=True)
        op.drop_index("ix_entities_dead_groups", table_name="entities",
                      postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index("ix_entities_dead_groups", "entities",
                        ["last_error_code", "series_id", "last_error_message"],
                        postgresql_where=sa.text("state = 'dead'"),
                        postgresql_concurrently=True)
        op.drop_index("ix_entities_dead_causes", table_name="entities",
                      postgresql_concurrently=True)
        op.drop_index("ix_entities_dead_newest", table_name="entities",
                      postgresql_concurrently=True)
