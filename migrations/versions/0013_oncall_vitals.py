"""what on-call reads from the ledger at every scrape: since when the circuit is open (or
closed), and the oldest waiting retry and unknown outcome, each found by an index

``circuit_breakers.state_since`` is moved by a trigger whenever the circuit opens or closes
(whoever writes the row: a worker, ``coupon-worker circuit``, the console, an older release),
so the metrics can say for how long the fleet has been paused. A probe's half-open is still
"open": the fleet is paused until the probe closes it.

Two partial indexes make the metrics' oldest-age queries one index probe each instead of a
scan of ``entities``: the oldest first attempt of the entities waiting for a retry, and the
earliest settle time of the unknown outcomes not yet reconciled.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 16:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# A nullable column the previous release never names (the trigger keeps it), and indexes.
backward_compatible = True
lint_exceptions = {
    "prefer-robust-stmts": "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
}


def upgrade() -> None:
    op.add_column("circuit_breakers",
                  sa.Column("state_since", sa.DateTime(timezone=True), nullable=True))
    # Only a move between closed and not closed counts: open <-> half_open is one outage.
    op.execute(
        """
        CREATE FUNCTION circuit_breakers_state_since() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' OR (OLD.state = 'closed') IS DISTINCT FROM
                                   (NEW.state = 'closed') THEN
                NEW.state_since := now();
            ELSE
                NEW.state_since := OLD.state_since;
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER circuit_breakers_state_since BEFORE INSERT OR UPDATE
        ON circuit_breakers FOR EACH ROW EXECUTE FUNCTION circuit_breakers_state_since()
        """
    )
    # Tables the running workers write: built concurrently, outside the migration's
    # transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_entities_waiting_retry", "entities", ["first_attempt_at"],
                        postgresql_where=sa.text("state IN ('retry_wait', 'queued')"),
                        postgresql_concurrently=True)
        op.create_index("ix_entities_unknown_outcome", "entities", ["settles_at"],
                        postgresql_where=sa.text(
                            "needs_reconcile AND state IN ('retry_wait', 'queued', "
                            "'in_flight')"),
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_entities_unknown_outcome", table_name="entities")
    op.drop_index("ix_entities_waiting_retry", table_name="entities")
    op.execute("DROP TRIGGER circuit_breakers_state_since ON circuit_breakers")
    op.execute("DROP FUNCTION circuit_breakers_state_since()")
    op.drop_column("circuit_breakers", "state_since")
