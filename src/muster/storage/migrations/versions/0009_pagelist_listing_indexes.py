"""Indexes for listing allocators by page: the default order (allocator id) and a zone's
allocators in that order, so the database reads one page and not the fleet. PostgreSQL's are
built in the "C" collation, the code point order the listing sorts strings in (whatever the
database's own collation), and the queries name that collation to use them.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('CREATE INDEX ix_allocators_id_c ON allocators (allocator_id COLLATE "C")')
        op.execute(
            "CREATE INDEX ix_allocators_zone_id_c "
            'ON allocators (zone_id COLLATE "C", allocator_id COLLATE "C")'
        )
    else:  # SQLite: the primary key's index already orders by id (BINARY: code points)
        op.create_index("ix_allocators_zone_id_c", "allocators", ["zone_id", "allocator_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_allocators_id_c", table_name="allocators")
    op.drop_index("ix_allocators_zone_id_c", table_name="allocators")
