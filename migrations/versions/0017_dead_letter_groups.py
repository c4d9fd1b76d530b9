"""dead-letter groups kept by a trigger: the console's groups cost the same at any size

The console's dead-letter groups (cause x series x message: how many, the oldest and newest
``dead_at``) counted every dead entity the ledger holds, from ``ix_entities_dead_causes`` (0015):
a cost that grew with the dead letters kept (60,000 in a ledger of two million entities, 6.5
times an empty ledger's). ``dead_letter_groups`` holds them ready: a trigger on ``entities``
adds a row of +1 for every entity that enters the dead state (or is inserted dead) and of -1
for every one that leaves it (replayed, discarded, issued after all, deleted by retention), and
a -1/+1 pair when a dead entity's cause, series, message or ``dead_at`` changes. Whoever
writes, one row at a time or in bulk, the trigger sees it; ``TRUNCATE entities`` empties it.

Deltas rather than a row per group updated in place: an outage dead-letters thousands of
entities at once, from every worker, mostly into a handful of groups; a counter row per group
would make each of those transactions wait for the one before it to commit (and two
transactions dead-lettering two groups in opposite orders would deadlock). An INSERT waits for
nobody. The sweeper folds the deltas into one row per group within a second
(``worker.adapters.postgres.dead_letter_groups``), so the read sums a row per group and the
few deltas since the last fold.

The backfill counts the dead letters already there in one statement, after the trigger is in
place and in the same transaction: ``CREATE TRIGGER`` locks out writers to ``entities`` until
the commit, so every dead letter is counted once, by the backfill or by the trigger.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 19:10:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# A new table and a trigger: the previous release's writes are counted by the trigger, and it
# reads its groups from the entities as before.
backward_compatible = True
lint_exceptions = {
    "prefer-identity": "ids are SQLAlchemy's autoincrement BigInteger (bigserial), as in 0001",
    "prefer-bigint-over-int": "a series id (an int in Capillary's API) and a group's count",
}


def upgrade() -> None:
    op.create_table(
        "dead_letter_groups",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("dead", sa.Integer(), nullable=False),
        sa.Column("first_dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("folded", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_groups")),
    )
    op.create_index("ix_dead_letter_groups_unfolded", "dead_letter_groups", ["id"],
                    postgresql_where=sa.text("NOT folded"))
    op.execute(
        """
        CREATE FUNCTION dead_letter_groups_count() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                IF OLD.state = 'dead' THEN
                    INSERT INTO dead_letter_groups
                        (error_code, series_id, message, dead, first_dead_at, last_dead_at)
                    VALUES (OLD.last_error_code, OLD.series_id, OLD.last_error_message, -1,
                            OLD.dead_at, OLD.dead_at);
                END IF;
            END IF;
            IF TG_OP <> 'DELETE' THEN
                IF NEW.state = 'dead' THEN
                    INSERT INTO dead_letter_groups
                        (error_code, series_id, message, dead, first_dead_at, last_dead_at)
                    VALUES (NEW.last_error_code, NEW.series_id, NEW.last_error_message, 1,
                            NEW.dead_at, NEW.dead_at);
                END IF;
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION dead_letter_groups_empty() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM dead_letter_groups;
            RETURN NULL;
        END
        $$
        """
    )
    # The WHEN clauses are evaluated without calling the function: an update that neither
    # touches a dead entity nor makes one (every step of the event path) costs a comparison.
    op.execute(
        """
        CREATE TRIGGER dead_letter_groups_insert AFTER INSERT ON entities
        FOR EACH ROW WHEN (NEW.state = 'dead')
        EXECUTE FUNCTION dead_letter_groups_count()
        """
    )
    op.execute(
        """
        CREATE TRIGGER dead_letter_groups_update
        AFTER UPDATE OF state, last_error_code, series_id, last_error_message, dead_at
        ON entities
        FOR EACH ROW WHEN ((OLD.state = 'dead' OR NEW.state = 'dead') AND
            (OLD.state, OLD.last_error_code, OLD.series_id, OLD.last_error_message, OLD.dead_at)
            IS DISTINCT FROM
            (NEW.state, NEW.last_error_code, NEW.series_id, NEW.last_error_message, NEW.dead_at))
        EXECUTE FUNCTION dead_letter_groups_count()
        """
    )
    op.execute(
        """
        CREATE TRIGGER dead_letter_groups_delete AFTER DELETE ON entities
        FOR EACH ROW WHEN (OLD.state = 'dead')
        EXECUTE FUNCTION dead_letter_groups_count()
        """
    )
    op.execute(
        """
        CREATE TRIGGER dead_letter_groups_truncate AFTER TRUNCATE ON entities
        FOR EACH STATEMENT EXECUTE FUNCTION dead_letter_groups_empty()
        """
    )
    # After the triggers: their lock keeps writers out until this transaction commits.
    op.execute(
        """
        INSERT INTO dead_letter_groups
            (error_code, series_id, message, dead, first_dead_at, last_dead_at, folded)
        SELECT last_error_code, series_id, last_error_message, count(*), min(dead_at),
               max(dead_at), true
        FROM entities WHERE state = 'dead'
        GROUP BY last_error_code, series_id, last_error_message
        """
    )


def downgrade() -> None:
    for trigger in ("truncate", "delete", "update", "insert"):
        op.execute(f"DROP TRIGGER dead_letter_groups_{trigger} ON entities")
    op.execute("DROP FUNCTION dead_letter_groups_empty()")
    op.execute("DROP FUNCTION dead_letter_groups_count()")
    op.drop_table("dead_letter_groups")
