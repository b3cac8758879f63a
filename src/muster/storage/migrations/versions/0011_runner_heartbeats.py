"""Each runner's latest heartbeat time moves to a narrow table of its own, `runner_heartbeats`:
the liveness flush writes it for every connected host every heartbeat interval, and rewriting
the runner's whole row (its report and certificate fields) for it spread the writes over ten
times the pages. Every runner gets a row, with the time it had (NULL before its first heartbeat).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runner_heartbeats",
        sa.Column(
            "runner_id", sa.String(255), sa.ForeignKey("runners.runner_id"), primary_key=True
        ),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sqlite_with_rowid=False,
    )
    op.execute(
        "INSERT INTO runner_heartbeats (runner_id, last_heartbeat_at) "
        "SELECT runner_id, last_heartbeat_at FROM runners"
    )
    # SQLite drops a column in place since 3.35 (no copy of the table, which the new table's
    # foreign key would refuse).
    op.drop_column("runners", "last_heartbeat_at")


def downgrade() -> None:
    op.add_column("runners", sa.Column("last_heartbeat_at", sa.DateTime(timezone=True)))
    op.execute(
        "UPDATE runners SET last_heartbeat_at = (SELECT last_heartbeat_at FROM runner_heartbeats"
        " WHERE runner_heartbeats.runner_id = runners.runner_id)"
    )
    op.drop_table("runner_heartbeats")
