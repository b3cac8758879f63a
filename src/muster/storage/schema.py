"""The store's tables, as SQLAlchemy Core objects shared by every backend.

Changes to these tables go through a migration in `muster/storage/migrations/versions/`.
Times are timezone-aware UTC; columns that hold one end in `_at`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    true,
)

metadata = MetaData()

# Platform-wide values and secrets: CA, token signing key, region, session key.
platform_settings = Table(
    "platform_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Migration 0006: ECE's roles and profile replace the single admin/readonly role.
    Column("roles", JSON, nullable=False),
    Column("full_name", Text, nullable=False, server_default=""),
    Column("email", Text, nullable=False, server_default=""),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("builtin", Boolean, nullable=False, server_default=false()),
    Column("created_by", String(64), nullable=False, server_default=""),
    Column("updated_at", DateTime(timezone=True), nullable=True),
    Column("updated_by", String(64), nullable=False, server_default=""),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("username", String(64), nullable=False, index=True),
    Column("description", Text, nullable=False),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

sessions = Table(
    "sessions",
    metadata,
    Column("token_hash", String(128), primary_key=True),
    Column("username", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("max_expires_at", DateTime(timezone=True), nullable=True),
    # Migration 0006: the family of `_refresh`ed tokens this one belongs to.
    Column("family_id", String(128), nullable=False, server_default="", index=True),
    Column("generation", Integer, nullable=False, server_default="0"),
)

# One row per login: its tokens are the sessions with its family_id. `generation` is the
# newest token's; a refresh moves it on with one conditional UPDATE, so the line never forks.
session_families = Table(
    "session_families",
    metadata,
    Column("family_id", String(128), primary_key=True),
    Column("username", String(64), nullable=False, index=True),
    Column("generation", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("roles", JSON, nullable=False),
    Column("persistent", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("max_uses", Integer, nullable=True),
    Column("uses", Integer, nullable=False, default=0),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("description", Text, nullable=False, default=""),
    Column("created_by", String(64), nullable=False),
)

runners = Table(
    "runners",
    metadata,
    Column("runner_id", String(255), primary_key=True),
    Column("host_ip", String(64), nullable=False),
    Column("public_hostname", String(255), nullable=False),
    Column("zone_id", String(255), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("cert_serial", String(64), nullable=False),
    Column("previous_cert_serial", String(64), nullable=True),
    Column("cert_expires_at", DateTime(timezone=True), nullable=False),
    Column("token_id", String(64), nullable=True),
    Column("joined_at", DateTime(timezone=True), nullable=False),
    # The latest report of the agent: memory_mb, storage_mib, cpus, healthy, checks.
    Column("report", JSON, nullable=False),
    # host:port of the API, for runners that serve it (coordinators); migration 0002.
    Column("api_address", String(300), nullable=True),
)

# Each runner's latest heartbeat time, a row of its own beside the runner's (migration 0011): the
# liveness flush writes every connected host's time every heartbeat interval, and rewriting the
# runner's whole row, report and all, spread those writes over ten times the pages (at 25,000
# runners, 7.3 against 2.4 µs a row in SQLite alone; docs/benchmarks.md). Made with the runner
# (NULL until its first heartbeat) and deleted with it. Without a rowid on SQLite: the row lives
# in the primary key's b-tree, not in a table beside an index.
runner_heartbeats = Table(
    "runner_heartbeats",
    metadata,
    Column("runner_id", String(255), ForeignKey("runners.runner_id"), primary_key=True),
    Column("last_heartbeat_at", DateTime(timezone=True), nullable=True),
    sqlite_with_rowid=False,
)

allocators = Table(
    "allocators",
    metadata,
    Column("allocator_id", String(255), primary_key=True),
    Column("zone_id", String(255), nullable=False, index=True),
    Column("capacity_mb", Integer, nullable=False),
    Column("maintenance", Boolean, nullable=False, default=False),
    Column("tags", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("settings", JSON, nullable=False),
    # The sum of its instances' memory_mb, kept by the store in the transaction that places or
    # releases them (migration 0004): placement reads it with the other few columns it needs.
    Column("memory_used_mb", Integer, nullable=False, default=0, server_default="0"),
    # When the allocator was made and when each part last changed; migration 0005.
    Column("created_at", DateTime(timezone=True), nullable=True),
    Column("maintenance_changed_at", DateTime(timezone=True), nullable=True),
    Column("metadata_changed_at", DateTime(timezone=True), nullable=True),
    Column("settings_changed_at", DateTime(timezone=True), nullable=True),
    # Moves whenever its desired instances change (placed, replanned, moved, released), in the
    # same transaction (migration 0007): its host fetches them again when the heartbeat reply
    # carries another version than the one it has.
    Column("instances_version", Integer, nullable=False, default=0, server_default="0"),
)

revoked_certificates = Table(
    "revoked_certificates",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("runner_id", String(255), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("kind", String(64), nullable=False, index=True),
    Column("actor", String(255), nullable=False),
    Column("source", String(64), nullable=False),
    Column("outcome", String(64), nullable=False),
    Column("token_id", String(64), nullable=True),
    Column("runner_id", String(255), nullable=True),
    Column("detail", JSON, nullable=False),
)

# ---- deployments (migration 0004) ---------------------------------------------------------------

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("version", Integer, nullable=False),
)

deployment_resources = Table(
    "deployment_resources",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("deployment_id", String(64), ForeignKey("deployments.id"), nullable=False, index=True),
    Column("ref_id", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("region", String(64), nullable=False),
    Column("plan", JSON, nullable=False),
    Column("plan_version", Integer, nullable=False),
    Column("next_instance", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("deployment_id", "kind", "ref_id"),
)

plan_attempts = Table(
    "plan_attempts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column(
        "resource_id",
        String(64),
        ForeignKey("deployment_resources.id"),
        nullable=False,
        index=True,
    ),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("plan", JSON, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("steps", JSON, nullable=False),
    Column("error", Text, nullable=True),
)

# No foreign key to allocators: deleting a host's runner (and allocator) must not fail while
# instances are still recorded on it; the constructor moves or releases them.
instances = Table(
    "instances",
    metadata,
    Column("resource_id", String(64), ForeignKey("deployment_resources.id"), primary_key=True),
    Column("instance_name", String(32), primary_key=True),
    Column("deployment_id", String(64), nullable=False, index=True),
    Column("allocator_id", String(255), nullable=False, index=True),
    Column("zone_id", String(255), nullable=False),
    Column("memory_mb", Integer, nullable=False),
    Column("port", Integer, nullable=False),
    Column("plan_version", Integer, nullable=False),
    Column("topology_element", Integer, nullable=False),
    Column("desired", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("moving", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # What its host last reported (migration 0007); `state` above sums it up.
    Column("reported_plan_version", Integer, nullable=True),
    Column("restarts", Integer, nullable=False, default=0, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("container_id", String(64), nullable=True),
    Column("reported_at", DateTime(timezone=True), nullable=True),
    # A port belongs to one instance on its allocator: the last guard if two placements raced.
    UniqueConstraint("allocator_id", "port"),
)

# Named leases (the constructor's): one holder at a time until `expires_at`, renewed by it.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Failed sign-ins per key (address, or address and user name) per bucket of wall-clock seconds:
# every worker and coordinator counts against one limit (migration 0008).
login_failures = Table(
    "login_failures",
    metadata,
    Column("key", String(160), primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
    Index("ix_login_failures_bucket", "bucket"),
)
