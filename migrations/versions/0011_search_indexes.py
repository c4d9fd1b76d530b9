"""indexes for support's searches: an event found by a coupon code or a Capillary request id

"A customer sent us this coupon code (or this X-Cap-Requestid): which event was that?" Without
these, each search read the whole coupons or api_calls table.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 15:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# Indexes only.
backward_compatible = True
lint_exceptions = {
    "prefer-robust-stmts": "a concurrent index that fails is left INVALID, and IF NOT EXISTS "
                           "would then skip it: it must be dropped and the migration rerun",
}


def upgrade() -> None:
    # Tables the running workers write: built concurrently, outside the migration's
    # transaction, so a large ledger keeps taking writes meanwhile.
    with op.get_context().autocommit_block():
        op.create_index("ix_coupons_code", "coupons", ["code"], postgresql_concurrently=True)
        op.create_index("ix_api_calls_request_id", "api_calls", ["request_id"],
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_api_calls_request_id", table_name="api_calls")
    op.drop_index("ix_coupons_code", table_name="coupons")
