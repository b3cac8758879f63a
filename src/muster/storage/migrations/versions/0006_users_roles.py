"""Users take ECE's roles and profile; `_refresh`ed tokens form session families.

The single `role` column becomes the `roles` list (admin -> ece_platform_admin, readonly ->
ece_platform_viewer); every user before this revision is one of the two made at install, so
each is marked built-in. Each existing session becomes a family of its own (named by its hash).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
ROLES = {"admin": "ece_platform_admin", "readonly": "ece_platform_viewer"}

users = sa.table(
    "users",
    sa.column("username", sa.String),
    sa.column("role", sa.String),
    sa.column("roles", sa.JSON),
    sa.column("builtin", sa.Boolean),
)
sessions = sa.table(
    "sessions",
    sa.column("token_hash", sa.String),
    sa.column("username", sa.String),
    sa.column("created_at", TS),
    sa.column("family_id", sa.String),
)
families = sa.table(
    "session_families",
    sa.column("family_id", sa.String),
    sa.column("username", sa.String),
    sa.column("generation", sa.Integer),
    sa.column("created_at", TS),
)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("roles", sa.JSON, nullable=True))
        batch.add_column(sa.Column("full_name", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("email", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.add_column(
            sa.Column("builtin", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("updated_at", TS, nullable=True))
        batch.add_column(sa.Column("updated_by", sa.String(64), nullable=False, server_default=""))
    bind = op.get_bind()
    for username, role in bind.execute(sa.select(users.c.username, users.c.role)).all():
        bind.execute(
            users.update()
            .where(users.c.username == username)
            .values(roles=[ROLES.get(role, "ece_platform_viewer")], builtin=True)
        )
    with op.batch_alter_table("users") as batch:
        batch.alter_column("roles", existing_type=sa.JSON, nullable=False)
        batch.drop_column("role")

    op.create_table(
        "session_families",
        sa.Column("family_id", sa.String(128), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, index=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("family_id", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("generation", sa.Integer, nullable=False, server_default="0"))
        batch.create_index("ix_sessions_family_id", ["family_id"])
    bind.execute(sessions.update().values(family_id=sessions.c.token_hash))
    bind.execute(
        families.insert().from_select(
            ["family_id", "username", "generation", "created_at"],
            sa.select(
                sessions.c.token_hash, sessions.c.username, sa.literal(0), sessions.c.created_at
            ),
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_family_id")
        batch.drop_column("generation")
        batch.drop_column("family_id")
    op.drop_table("session_families")
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("role", sa.String(32), nullable=False, server_default="readonly")
        )
    bind = op.get_bind()
    for username, roles in bind.execute(sa.select(users.c.username, users.c.roles)).all():
        role = "admin" if "ece_platform_admin" in (roles or []) else "readonly"
        bind.execute(users.update().where(users.c.username == username).values(role=role))
    with op.batch_alter_table("users") as batch:
        for name in (
            "updated_by",
            "updated_at",
            "created_by",
            "builtin",
            "enabled",
            "email",
            "full_name",
            "roles",
        ):
            batch.drop_column(name)
