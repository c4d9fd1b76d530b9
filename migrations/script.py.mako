"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# Rolling upgrades (docs/operator-guide.md, Upgrading): does the previous revision's code run on this schema?
# True for an expand step (it only adds); False for a contract step, run with the previous
# release's workers stopped. `make lint` and the tests fail until this is decided.
backward_compatible = None
# Squawk rules this migration breaks on purpose, each with why it is safe (or delete this).
lint_exceptions: dict[str, str] = {}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
