"""The first schema: settings, users, API keys, sessions, tokens, runners, allocators, audit.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "platform_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("username", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, index=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
    )
    op.create_table(
        "sessions",
        sa.Column("token_hash", sa.String(128), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False, index=True),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_id", sa.String(64), primary_key=True),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("persistent", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "runners",
        sa.Column("runner_id", sa.String(255), primary_key=True),
        sa.Column("host_ip", sa.String(64), nullable=False),
        sa.Column("public_hostname", sa.String(255), nullable=False),
        sa.Column("zone_id", sa.String(255), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("previous_cert_serial", sa.String(64), nullable=True),
        sa.Column("cert_expires_at", TS, nullable=False),
        sa.Column("token_id", sa.String(64), nullable=True),
        sa.Column("joined_at", TS, nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=True),
        sa.Column("report", sa.JSON, nullable=False),
    )
    op.create_table(
        "allocators",
        sa.Column("allocator_id", sa.String(255), primary_key=True),
        sa.Column("zone_id", sa.String(255), nullable=False, index=True),
        sa.Column("capacity_mb", sa.Integer, nullable=False),
        sa.Column("maintenance", sa.Boolean, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
    )
    op.create_table(
        "revoked_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("runner_id", sa.String(255), nullable=False),
        sa.Column("revoked_at", TS, nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False, index=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("token_id", sa.String(64), nullable=True),
        sa.Column("runner_id", sa.String(255), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "audit_events",
        "revoked_certificates",
        "allocators",
        "runners",
        "enrollment_tokens",
        "sessions",
        "api_keys",
        "users",
        "platform_settings",
    ):
        op.drop_table(table)
