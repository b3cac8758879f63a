"""Allocator hosts run their instances: each allocator's desired-instances version (moved in the
transaction that places, changes or releases its instances, so a host learns when to fetch
them again) and what the host last reported of each instance.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("allocators") as batch:
        batch.add_column(
            sa.Column("instances_version", sa.Integer, nullable=False, server_default="0")
        )
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("reported_plan_version", sa.Integer, nullable=True))
        batch.add_column(sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.Text, nullable=True))
        batch.add_column(sa.Column("container_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for column in (
            "reported_at",
            "container_id",
            "last_error",
            "restarts",
            "reported_plan_version",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("allocators") as batch:
        batch.drop_column("instances_version")
