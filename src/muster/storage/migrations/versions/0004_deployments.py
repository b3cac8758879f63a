"""Deployments: their resources, plan attempts and instances; allocators count the memory their
instances use; named leases for the one constructor at a time.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("allocators") as batch:
        batch.add_column(
            sa.Column("memory_used_mb", sa.Integer, nullable=False, server_default="0")
        )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "deployment_resources",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "deployment_id",
            sa.String(64),
            sa.ForeignKey("deployments.id"),
            nullable=False,
            index=True,
        ),
        sa.Column("ref_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),
        sa.Column("plan_version", sa.Integer, nullable=False),
        sa.Column("next_instance", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("deployment_id", "kind", "ref_id"),
    )
    op.create_table(
        "plan_attempts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "resource_id",
            sa.String(64),
            sa.ForeignKey("deployment_resources.id"),
            nullable=False,
            index=True,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("steps", sa.JSON, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "instances",
        sa.Column(
            "resource_id",
            sa.String(64),
            sa.ForeignKey("deployment_resources.id"),
            primary_key=True,
        ),
        sa.Column("instance_name", sa.String(32), primary_key=True),
        sa.Column("deployment_id", sa.String(64), nullable=False, index=True),
        sa.Column("allocator_id", sa.String(255), nullable=False, index=True),
        sa.Column("zone_id", sa.String(255), nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("plan_version", sa.Integer, nullable=False),
        sa.Column("topology_element", sa.Integer, nullable=False),
        sa.Column("desired", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("moving", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("allocator_id", "port"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("leases", "instances", "plan_attempts", "deployment_resources", "deployments"):
        op.drop_table(table)
    with op.batch_alter_table("allocators") as batch:
        batch.drop_column("memory_used_mb")
