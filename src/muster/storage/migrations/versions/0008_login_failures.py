"""Failed sign-ins counted in the store, per key and bucket of wall-clock seconds, so every
worker process and coordinator sharing the store counts against one limit.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(160), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ix_login_failures_bucket", "login_failures", ["bucket"])


def downgrade() -> None:
    op.drop_index("ix_login_failures_bucket", table_name="login_failures")
    op.drop_table("login_failures")
