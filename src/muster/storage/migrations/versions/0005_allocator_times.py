"""Allocators record when they were created and when their maintenance mode, metadata and
settings last changed (ECE's `maintenance_mode_timestamp`, `x-cloud-resource-created` and
`x-cloud-resource-last-modified`).

Allocators made before this revision take their runner's join time as their creation time;
their change times stay empty until the next change.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("created_at", "maintenance_changed_at", "metadata_changed_at", "settings_changed_at")


def upgrade() -> None:
    with op.batch_alter_table("allocators") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE allocators SET created_at = "
        "(SELECT joined_at FROM runners WHERE runners.runner_id = allocators.allocator_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("allocators") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
