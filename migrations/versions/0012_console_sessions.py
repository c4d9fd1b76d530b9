"""console sessions kept server-side, and failed-login counters shared by the console processes

Sessions were signed cookies, which nothing could revoke before they expired: a cookie copied
before logout still worked, and a removed user stayed logged in. Now the cookie holds a random
id whose digest is a row of ``console_sessions``; logout, a revocation or a changed entry in
the users file deletes it. ``login_attempts`` holds the login limits' counters, taken with one
atomic upsert, so concurrent guesses cannot all slip under the limit.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 16:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (README, Upgrading): does the previous revision's code run on this schema?
# New tables only; the previous console never reads them.
backward_compatible = True
lint_exceptions = {
    "prefer-bigint-over-int": "a count of failed logins, bounded by the backoff",
}


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.Text(), nullable=False),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.Text(), nullable=False),
        sa.Column("user_agent", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()),
                  server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_user_name"), "console_sessions", ["user_name"])
    op.create_table(
        "login_attempts",
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_allowed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_hash", name=op.f("pk_login_attempts")),
    )


def downgrade() -> None:
    op.drop_table("login_attempts")
    op.drop_index(op.f("ix_console_sessions_user_name"), table_name="console_sessions")
    op.drop_table("console_sessions")
