"""Indexes for what every coordinator process reads about once a second, so that the reads
stay cheap at 100,000 hosts: the newest runner certificate's expiry (a lookup at the end of
ix_runners_cert_expires_at instead of a read of every runner's row; the certificates joined or
renewed since are read along it too) and the placement marks (a count and a sum over the small
ix_allocators_instances_version instead of every allocator's row).

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runners_cert_expires_at", "runners", ["cert_expires_at"])
    op.create_index("ix_allocators_instances_version", "allocators", ["instances_version"])


def downgrade() -> None:
    op.drop_index("ix_allocators_instances_version", table_name="allocators")
    op.drop_index("ix_runners_cert_expires_at", table_name="runners")
