"""Indexes for reading allocators by page: the default listing order (allocator id) and a
zone's allocators in that order, so the database reads one page and not the fleet; and
placement's order, a zone's allocators outside maintenance by free memory (an expression,
written exactly as `muster.storage._deployments` queries it), so a placement reads the few
fullest allocators that fit. PostgreSQL's are built in the "C" collation, the code point order
Muster sorts ids in (whatever the database's own collation), and the queries name it.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


FREE_MB = {
    "sqlite": "coalesce(json_extract(settings, '$.capacity'), capacity_mb) - memory_used_mb",
    "postgresql": "coalesce((settings ->> 'capacity')::integer, capacity_mb) - memory_used_mb",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute('CREATE INDEX ix_allocators_id_c ON allocators (allocator_id COLLATE "C")')
        op.execute(
            "CREATE INDEX ix_allocators_zone_id_c "
            'ON allocators (zone_id COLLATE "C", allocator_id COLLATE "C")'
        )
        op.execute(
            "CREATE INDEX ix_allocators_placement ON allocators "
            f'(zone_id, maintenance, ({FREE_MB[dialect]}), allocator_id COLLATE "C")'
        )
    else:  # SQLite: the primary key's index already orders by id (BINARY: code points)
        op.create_index("ix_allocators_zone_id_c", "allocators", ["zone_id", "allocator_id"])
        op.execute(
            "CREATE INDEX ix_allocators_placement ON allocators "
            f"(zone_id, maintenance, ({FREE_MB[dialect]}), allocator_id)"
        )


def downgrade() -> None:
    op.drop_index("ix_allocators_placement", table_name="allocators")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_allocators_id_c", table_name="allocators")
    op.drop_index("ix_allocators_zone_id_c", table_name="allocators")
