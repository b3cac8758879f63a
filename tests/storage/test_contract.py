"""The Store contract, written once and run on every backend (see `store` in conftest.py):
each Transaction method, its errors and codes, atomicity, and migrations."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, DateTime, bindparam, insert, text

from muster.domain.models import (
    AllocatorRecord,
    ApiKeyRecord,
    AuditEvent,
    HostReport,
    RunnerRecord,
    RunnerSerials,
    SessionRecord,
    TokenRecord,
    UserRecord,
)
from muster.errors import ConflictError, MusterError, NotFoundError
from muster.storage import Store, open_store
from muster.storage import schema as tables
from muster.storage._rows import runner_row
from muster.storage.migrations import alembic_config, current_revision, upgrade

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@contextmanager
def at_revision(store: Store, revision: str) -> Iterator[Connection]:
    """The store migrated back to `revision`, and a transaction on it to write rows as that
    revision's tables hold them (the test then upgrades the store again)."""
    config = alembic_config()
    with store._writer.begin() as conn:  # type: ignore[attr-defined]
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
        yield conn


def token(tid: str = "tok-1", **kw: Any) -> TokenRecord:
    base = TokenRecord(
        token_id=tid,
        roles=("allocator", "proxy"),
        persistent=True,
        created_at=T0,
        created_by="admin",
        description="for the rack",
    )
    return replace(base, **kw)


def runner(runner_id: str = "10.0.0.2", **kw: Any) -> RunnerRecord:
    base = RunnerRecord(
        runner_id=runner_id,
        host_ip="10.0.0.2",
        public_hostname="host-2.example",
        zone_id="ece-zone-1",
        roles=("allocator",),
        cert_serial=f"{runner_id}-serial-1",
        cert_expires_at=at(86400),
        joined_at=T0,
        report=HostReport(memory_mb=8192, storage_mib=1000, cpus=4, checks={"disk": True}),
        token_id="tok-1",
        last_heartbeat_at=T0,
    )
    return replace(base, **kw)


def allocator(allocator_id: str = "10.0.0.2", **kw: Any) -> AllocatorRecord:
    base = AllocatorRecord(
        allocator_id=allocator_id, zone_id="ece-zone-1", capacity_mb=4096, tags={"ssd": "true"}
    )
    return replace(base, **kw)


def event(kind: str, n: int) -> AuditEvent:
    return AuditEvent(
        kind=kind,
        actor="admin",
        source="192.0.2.1",
        outcome="success",
        at=at(n),
        token_id=f"tok-{n}",
        detail={"n": n, "roles": ["allocator"]},
    )


def raises(exc: type[MusterError], code: str, action: Callable[[], Any]) -> None:
    with pytest.raises(exc) as info:
        action()
    assert info.value.code == code


# -- settings ----------------------------------------------------------------------------------
def test_setting_is_created_then_replaced(store: Store) -> None:
    with store.read() as tx:
        assert tx.find_setting("platform.region") is None
    with store.write() as tx:
        tx.put_setting("platform.region", "ece-region")
    with store.write() as tx:
        tx.put_setting("platform.region", "eu-west")
    with store.read() as tx:
        assert tx.find_setting("platform.region") == "eu-west"


def test_setting_holds_long_text(store: Store) -> None:
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 5000 + "\n-----END CERTIFICATE-----\n"
    with store.write() as tx:
        tx.put_setting("ca.certificate", pem)
    with store.read() as tx:
        assert tx.find_setting("ca.certificate") == pem


# -- users, API keys, sessions ----------------------------------------------------------------
def test_users_are_created_found_and_listed_by_name(store: Store) -> None:
    users = [
        UserRecord(name, f"$argon2id${name}", ("ece_platform_viewer",), T0)
        for name in ("zed", "admin")
    ]
    with store.write() as tx:
        for user in users:
            tx.create_user(user)
    with store.read() as tx:
        assert tx.find_user("admin") == users[1]
        assert tx.find_user("nobody") is None
        assert [u.username for u in tx.list_users()] == ["admin", "zed"]


def test_duplicate_user_is_a_conflict(store: Store) -> None:
    user = UserRecord("admin", "$argon2id$x", ("ece_platform_admin",), T0)
    with store.write() as tx:
        tx.create_user(user)
    with store.write() as tx:
        raises(ConflictError, "user.user_name.conflict", lambda: tx.create_user(user))


def test_user_round_trips_every_field(store: Store) -> None:
    user = UserRecord(
        "ops",
        "$argon2id$ops",
        ("ece_deployment_manager", "ece_platform_viewer"),
        T0,
        full_name="Öps Tëam ✓",
        email="ops@example.com",
        enabled=False,
        builtin=True,
        created_by="admin",
        updated_at=at(60),
        updated_by="root",
    )
    with store.write() as tx:
        tx.create_user(user)
    with store.read() as tx:
        found = tx.find_user("ops")
    assert found == user
    assert found is not None
    assert found.updated_at is not None
    assert found.updated_at.utcoffset() == timedelta(0)


def test_user_is_updated_field_by_field(store: Store) -> None:
    with store.write() as tx:
        tx.create_user(UserRecord("ops", "h1", ("ece_platform_viewer",), T0))
        tx.update_user("ops", roles=("ece_platform_admin",), email="a@b.c", updated_at=at(5))
    with store.read() as tx:
        assert tx.find_user("ops") == UserRecord(
            "ops", "h1", ("ece_platform_admin",), T0, email="a@b.c", updated_at=at(5)
        )
    with store.write() as tx:
        raises(NotFoundError, "user.not_found", lambda: tx.update_user("nobody", email=""))


def test_deleting_a_user_deletes_its_keys_and_sessions_only(store: Store) -> None:
    with store.write() as tx:
        for name in ("ops", "dev"):
            tx.create_user(UserRecord(name, "h", ("ece_platform_viewer",), T0))
            tx.create_api_key(ApiKeyRecord(f"k-{name}", name, "ci", f"h-{name}", T0))
            tx.create_session_family(f"f-{name}", name, T0)
            tx.create_session(SessionRecord(f"s-{name}", name, T0, at(60), family_id=f"f-{name}"))
    with store.write() as tx:
        tx.delete_user("ops")
        raises(NotFoundError, "user.not_found", lambda: tx.delete_user("ops"))
    with store.read() as tx:
        assert [u.username for u in tx.list_users()] == ["dev"]
        assert [k.id for k in tx.list_api_keys()] == ["k-dev"]
        assert [s.token_hash for s in tx.list_sessions()] == ["s-dev"]
        assert tx.find_session_generation("f-ops") is None
        assert tx.find_session_generation("f-dev") == 0


def family_session(name: str, generation: int, family: str = "f1") -> SessionRecord:
    return SessionRecord(name, "admin", T0, at(3600), family_id=family, generation=generation)


def test_session_family_advances_one_generation_at_a_time(store: Store) -> None:
    with store.write() as tx:
        tx.create_session_family("f1", "admin", T0)
        raises(ConflictError, "root.conflict", lambda: tx.create_session_family("f1", "admin", T0))
        assert tx.find_session_generation("f1") == 0
        assert tx.advance_session_family("f1", 0) is True
        assert tx.advance_session_family("f1", 0) is False  # already moved on: no fork
        assert tx.advance_session_family("f1", 5) is False
        assert tx.advance_session_family("nope", 0) is False
        assert tx.find_session_generation("f1") == 1
        assert tx.find_session_generation("nope") is None


def test_deleting_a_family_ends_every_member_and_nothing_else(store: Store) -> None:
    with store.write() as tx:
        tx.create_session_family("f1", "admin", T0)
        tx.create_session_family("f2", "admin", T0)
        for n in range(3):
            tx.create_session(family_session(f"s{n}", n))
        tx.create_session(family_session("other", 0, "f2"))
    with store.read() as tx:
        assert [s.generation for s in tx.list_sessions(family_id="f1")] == [0, 1, 2]
        assert len(tx.list_sessions(username="admin")) == 4
        assert tx.find_session("s2") == family_session("s2", 2)
    with store.write() as tx:
        assert tx.delete_session_family("f1") == 3
        assert tx.delete_session_family("f1") == 0
    with store.read() as tx:
        assert [s.token_hash for s in tx.list_sessions()] == ["other"]
        assert tx.find_session_generation("f1") is None
        assert tx.find_session_generation("f2") == 0


def test_expiry_sweeps_families_left_without_a_session(store: Store) -> None:
    with store.write() as tx:
        tx.create_session_family("f1", "admin", T0)
        tx.create_session_family("f2", "admin", T0)
        tx.create_session(SessionRecord("a", "admin", T0, at(60), family_id="f1"))
        tx.create_session(SessionRecord("b", "admin", T0, at(60), family_id="f2"))
        tx.create_session(SessionRecord("c", "admin", T0, at(600), family_id="f2", generation=1))
    with store.write() as tx:
        assert tx.delete_sessions_expired(at(60)) == 2
    with store.read() as tx:
        assert tx.find_session_generation("f1") is None
        assert tx.find_session_generation("f2") == 0
    with store.write() as tx:
        assert tx.delete_user_sessions("admin") == 1
        assert tx.delete_empty_session_families() == 0
    with store.read() as tx:
        assert tx.list_sessions() == []
        assert tx.find_session_generation("f2") is None


def test_parallel_advances_of_one_generation_have_one_winner(store: Store) -> None:
    with store.write() as tx:
        tx.create_session_family("f1", "admin", T0)
    results: list[bool] = []
    barrier = threading.Barrier(10)

    def advance() -> None:
        barrier.wait()
        with store.write() as tx:
            results.append(tx.advance_session_family("f1", 0))

    threads = [threading.Thread(target=advance) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 9 + [True]
    with store.read() as tx:
        assert tx.find_session_generation("f1") == 1


def test_api_keys_are_found_by_hash_and_id_and_listed_per_user(store: Store) -> None:
    keys = [
        ApiKeyRecord("k2", "admin", "ci", "h2", at(2), expires_at=at(3600)),
        ApiKeyRecord("k1", "admin", "laptop", "h1", at(1)),
        ApiKeyRecord("k3", "readonly", "dash", "h3", at(3)),
    ]
    with store.write() as tx:
        for key in keys:
            tx.create_api_key(key)
    with store.read() as tx:
        assert tx.find_api_key_by_hash("h2") == keys[0]
        assert tx.find_api_key_by_hash("nope") is None
        assert tx.get_api_key("k3") == keys[2]
        assert [k.id for k in tx.list_api_keys("admin")] == ["k1", "k2"]
        assert [k.id for k in tx.list_api_keys()] == ["k1", "k2", "k3"]


def test_api_key_delete_and_its_errors(store: Store) -> None:
    key = ApiKeyRecord("k1", "admin", "ci", "h1", T0)
    with store.write() as tx:
        tx.create_api_key(key)
    with store.write() as tx:
        raises(ConflictError, "root.conflict", lambda: tx.create_api_key(key))
        raises(
            ConflictError, "root.conflict", lambda: tx.create_api_key(replace(key, id="k2"))
        )  # the same hash twice
        tx.delete_api_key("k1")
    with store.read() as tx:
        assert tx.find_api_key_by_hash("h1") is None
        raises(NotFoundError, "api_keys.key_not_found", lambda: tx.get_api_key("k1"))
    with store.write() as tx:
        raises(NotFoundError, "api_keys.key_not_found", lambda: tx.delete_api_key("k1"))


def test_sessions_are_found_deleted_and_expired(store: Store) -> None:
    sessions = [SessionRecord(f"s{n}", "admin", T0, at(n * 100)) for n in (1, 2, 3)]
    with store.write() as tx:
        for session in sessions:
            tx.create_session(session)
        raises(ConflictError, "root.conflict", lambda: tx.create_session(sessions[0]))
    with store.write() as tx:
        assert tx.delete_session("s3") is True
        assert tx.delete_session("s3") is False
        assert tx.delete_sessions_expired(at(200)) == 2  # expiry is inclusive
    with store.read() as tx:
        assert tx.find_session("s1") is None
        assert tx.find_session("s2") is None


def test_session_round_trips(store: Store) -> None:
    session = SessionRecord("hash", "admin", T0, at(3600))
    with store.write() as tx:
        tx.create_session(session)
    with store.read() as tx:
        assert tx.find_session("hash") == session
        assert tx.find_session("hash").expires_at.utcoffset() == timedelta(0)  # type: ignore[union-attr]


# -- enrollment tokens -------------------------------------------------------------------------
def test_token_round_trips_with_every_field(store: Store) -> None:
    record = token(expires_at=at(3600), max_uses=3, persistent=False, description="ünïcode ✓")
    with store.write() as tx:
        tx.create_token(record)
    with store.read() as tx:
        found = tx.find_token("tok-1")
    assert found == record
    assert found is not None
    assert found.created_at.tzinfo is not None


def test_duplicate_token_id_is_a_conflict(store: Store) -> None:
    with store.write() as tx:
        tx.create_token(token())
    with store.write() as tx:
        raises(ConflictError, "root.conflict", lambda: tx.create_token(token()))


def test_listing_tokens_skips_revoked_keeps_expired_oldest_first(store: Store) -> None:
    with store.write() as tx:
        tx.create_token(token("b", created_at=at(2)))
        tx.create_token(token("a", created_at=at(3), expires_at=at(4), persistent=False))
        tx.create_token(token("c", created_at=at(1)))
        tx.create_token(token("gone", created_at=at(0)))
        tx.revoke_token("gone", at(5))
    with store.read() as tx:
        assert [t.token_id for t in tx.list_tokens()] == ["c", "b", "a"]
        assert tx.find_token("gone").revoked_at == at(5)  # type: ignore[union-attr]


def test_token_use_is_counted_with_its_time(store: Store) -> None:
    with store.write() as tx:
        tx.create_token(token())
    with store.write() as tx:
        assert tx.record_token_use("tok-1", at(10)) == 1
        assert tx.record_token_use("tok-1", at(20)) == 2
    with store.read() as tx:
        found = tx.find_token("tok-1")
    assert found is not None
    assert (found.uses, found.last_used_at) == (2, at(20))


def test_using_or_revoking_an_unknown_token_is_not_found(store: Store) -> None:
    with store.write() as tx:
        code = "enrollment_tokens.invalid_token_id"
        raises(NotFoundError, code, lambda: tx.record_token_use("nope", T0))
        raises(NotFoundError, code, lambda: tx.revoke_token("nope", T0))
        tx.create_token(token())
        tx.revoke_token("tok-1", T0)
        raises(NotFoundError, code, lambda: tx.revoke_token("tok-1", at(1)))


def test_concurrent_uses_under_row_lock_respect_the_limit(store: Store) -> None:
    with store.write() as tx:
        tx.create_token(token(max_uses=5))
    admitted: list[int] = []
    errors: list[BaseException] = []

    def use() -> None:
        try:
            for _ in range(3):
                with store.write() as tx:
                    record = tx.find_token("tok-1", for_update=True)
                    assert record is not None
                    if record.max_uses is None or record.uses < record.max_uses:
                        admitted.append(tx.record_token_use("tok-1", T0))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(admitted) == [1, 2, 3, 4, 5]
    with store.read() as tx:
        assert tx.find_token("tok-1").uses == 5  # type: ignore[union-attr]


# -- runners -----------------------------------------------------------------------------------
def test_runners_are_created_found_and_listed_by_id(store: Store) -> None:
    records = [runner("10.0.0.3"), runner("10.0.0.2", api_address="10.0.0.2:12443")]
    with store.write() as tx:
        for record in records:
            tx.create_runner(record)
    with store.read() as tx:
        assert tx.get_runner("10.0.0.2") == records[1]
        assert tx.find_runner("10.0.0.3") == records[0]
        assert tx.find_runner("10.0.0.9") is None
        assert [r.runner_id for r in tx.list_runners()] == ["10.0.0.2", "10.0.0.3"]
        assert tx.list_api_addresses() == ["10.0.0.2:12443"]


def test_runner_errors_carry_runner_codes(store: Store) -> None:
    with store.write() as tx:
        tx.create_runner(runner())
    with store.write() as tx:
        raises(ConflictError, "runners.runner_id_taken", lambda: tx.create_runner(runner()))
        raises(NotFoundError, "runners.runner_not_found", lambda: tx.get_runner("nope"))
        raises(
            NotFoundError, "runners.runner_not_found", lambda: tx.update_runner("nope", zone_id="z")
        )
        raises(NotFoundError, "runners.runner_not_found", lambda: tx.delete_runner("nope", T0))


def test_runner_update_sets_the_given_columns(store: Store) -> None:
    with store.write() as tx:
        tx.create_runner(runner())
    report = HostReport(memory_mb=1, healthy=False, checks={"disk": False}, version="1.2")
    with store.write() as tx:
        tx.update_runner("10.0.0.2", roles=("proxy", "director"), report=report, zone_id="z2")
    with store.read() as tx:
        updated = tx.get_runner("10.0.0.2")
    assert updated == runner(roles=("proxy", "director"), report=report, zone_id="z2")


def test_deleting_a_runner_revokes_its_certificates_and_drops_its_allocator(store: Store) -> None:
    with store.write() as tx:
        tx.create_runner(runner(previous_cert_serial="old-serial"))
        tx.create_allocator(allocator())
        tx.create_runner(runner("10.0.0.3"))
        tx.create_allocator(allocator("10.0.0.3"))
    with store.write() as tx:
        deleted = tx.delete_runner("10.0.0.2", at(60))
    assert deleted.runner_id == "10.0.0.2"
    with store.read() as tx:
        assert tx.find_runner("10.0.0.2") is None
        assert tx.find_allocator("10.0.0.2") is None
        assert tx.is_certificate_revoked("10.0.0.2-serial-1")
        assert tx.is_certificate_revoked("old-serial")
        assert not tx.is_certificate_revoked("10.0.0.3-serial-1")
        assert tx.find_allocator("10.0.0.3") is not None


def test_a_runner_id_can_be_reused_after_deletion(store: Store) -> None:
    with store.write() as tx:
        tx.create_runner(runner())
    with store.write() as tx:
        tx.record_heartbeats([("10.0.0.2", at(9), None)])
    with store.write() as tx:
        tx.delete_runner("10.0.0.2", T0)
    with store.write() as tx:
        tx.create_runner(runner(cert_serial="new-serial", last_heartbeat_at=None))
    with store.read() as tx:
        assert tx.is_certificate_revoked("10.0.0.2-serial-1")
        assert not tx.is_certificate_revoked("new-serial")
        # The heartbeat time went with the runner: the new one has not heartbeat yet.
        assert tx.get_runner("10.0.0.2").last_heartbeat_at is None
        assert tx.list_runner_columns(["last_heartbeat_at"]) == [("10.0.0.2", None)]


def test_heartbeats_are_recorded_in_one_batch(store: Store) -> None:
    ids = [f"10.0.1.{n}" for n in range(50)]
    with store.write() as tx:
        for runner_id in ids:
            tx.create_runner(runner(runner_id))
    beats = [(rid, at(n), HostReport(memory_mb=n, cpus=2)) for n, rid in enumerate(ids)]
    with store.write() as tx:
        tx.record_heartbeats([*beats, ("deleted-runner", at(99), HostReport())])
        tx.record_heartbeats([])
    with store.read() as tx:
        found = {r.runner_id: r for r in tx.list_runners()}
        assert tx.find_runner("deleted-runner") is None
    for n, rid in enumerate(ids):
        assert found[rid].last_heartbeat_at == at(n)
        assert found[rid].report == HostReport(memory_mb=n, cpus=2)
    # A time without a report keeps the report stored; both kinds in one batch.
    with store.write() as tx:
        tx.record_heartbeats([(ids[0], at(60), None), (ids[1], at(61), HostReport(memory_mb=7))])
    with store.read() as tx:
        first, second = tx.get_runner(ids[0]), tx.get_runner(ids[1])
    assert (first.last_heartbeat_at, first.report) == (at(60), HostReport(memory_mb=0, cpus=2))
    assert (second.last_heartbeat_at, second.report) == (at(61), HostReport(memory_mb=7))


# -- allocators --------------------------------------------------------------------------------
def test_allocators_are_created_found_listed_and_updated(store: Store) -> None:
    with store.write() as tx:
        tx.create_allocator(allocator("b"))
        tx.create_allocator(allocator("a", zone_id="ece-zone-2"))
    with store.write() as tx:
        tx.update_allocator(
            "a", maintenance=True, tags={"x": "1"}, metadata={"rack": "r1"}, settings={"k": [1]}
        )
    with store.read() as tx:
        assert [a.allocator_id for a in tx.list_allocators()] == ["a", "b"]
        assert tx.get_allocator("a") == allocator(
            "a",
            zone_id="ece-zone-2",
            maintenance=True,
            tags={"x": "1"},
            metadata={"rack": "r1"},
            settings={"k": [1]},
        )
        assert tx.find_allocator("b") == allocator("b")
        assert tx.find_allocator("c") is None


def test_allocators_keep_when_they_were_made_and_last_changed(store: Store) -> None:
    with store.write() as tx:
        tx.create_allocator(allocator("a", created_at=at(1)))
        tx.create_allocator(allocator("b"))
    with store.write() as tx:
        tx.update_allocator(
            "a", maintenance_changed_at=at(2), metadata_changed_at=at(3), settings_changed_at=at(4)
        )
    with store.read() as tx:
        a = tx.get_allocator("a")
        assert (a.created_at, a.maintenance_changed_at) == (at(1), at(2))
        assert (a.metadata_changed_at, a.settings_changed_at) == (at(3), at(4))
        assert a.created_at is not None
        assert a.created_at.utcoffset() == timedelta(0)
        assert tx.get_allocator("b").created_at is None
        assert tx.list_allocators_by_id(["a"]) == [a]


def test_migration_0005_dates_existing_allocators_by_their_runners_join(
    store: Store,
) -> None:
    with at_revision(store, "0004") as conn:
        conn.execute(insert(tables.runners).values(runner_row(runner("a", joined_at=at(7)))))
        for allocator_id in ("a", "orphan"):
            # The allocators table as revision 0004 has it (later revisions add columns).
            conn.execute(
                text(
                    "INSERT INTO allocators (allocator_id, zone_id, capacity_mb, maintenance, "
                    "tags, metadata, settings, memory_used_mb) "
                    "VALUES (:id, 'z', 1, false, '{}', '{}', '{}', 0)"
                ),
                {"id": allocator_id},
            )
    upgrade(store)
    with store.read() as tx:
        assert tx.get_allocator("a").created_at == at(7)
        assert tx.get_allocator("orphan").created_at is None
        assert tx.get_allocator("a").maintenance_changed_at is None


def test_migration_0011_moves_each_runners_heartbeat_time_to_its_own_table(
    store: Store,
) -> None:
    with at_revision(store, "0010") as conn:
        # The runners table as revision 0010 has it, the time in the runner's row.
        stamp = text("UPDATE runners SET last_heartbeat_at = :at WHERE runner_id = :id")
        stamp = stamp.bindparams(bindparam("at", type_=DateTime(timezone=True)))
        for runner_id, beat in (("beating", at(42)), ("silent", None)):
            conn.execute(insert(tables.runners).values(runner_row(runner(runner_id))))
            conn.execute(stamp, {"at": beat, "id": runner_id})
    upgrade(store)
    with store.read() as tx:
        assert tx.get_runner("beating").last_heartbeat_at == at(42)
        assert tx.get_runner("silent").last_heartbeat_at is None
        assert tx.list_runner_columns(["last_heartbeat_at"]) == [
            ("beating", at(42)),
            ("silent", None),
        ]
    with store.write() as tx:
        tx.record_heartbeats([("silent", at(43), None)])
        tx.delete_runner("beating", at(44))
    with store.read() as tx:
        assert [(r.runner_id, r.last_heartbeat_at) for r in tx.list_runners()] == [
            ("silent", at(43))
        ]


def test_allocator_errors_carry_allocator_codes(store: Store) -> None:
    code = "allocators.allocator_not_found"
    with store.write() as tx:
        tx.create_allocator(allocator())
    with store.write() as tx:
        raises(ConflictError, "root.conflict", lambda: tx.create_allocator(allocator()))
        raises(NotFoundError, code, lambda: tx.get_allocator("nope"))
        raises(NotFoundError, code, lambda: tx.update_allocator("nope", maintenance=True))
        raises(NotFoundError, code, lambda: tx.delete_allocator("nope"))
        tx.delete_allocator("10.0.0.2")
    with store.read() as tx:
        assert tx.list_allocators() == []


# -- audit -------------------------------------------------------------------------------------
def test_audit_pages_newest_first_with_total(store: Store) -> None:
    kinds = ["token.created", "token.used", "token.refused"]
    with store.write() as tx:
        for n in range(10):
            tx.append_audit(event(kinds[n % 3], n))
    with store.read() as tx:
        first, total = tx.list_audit(limit=4)
        second, _ = tx.list_audit(limit=4, offset=4)
        last, _ = tx.list_audit(limit=4, offset=8)
        beyond, total_beyond = tx.list_audit(limit=4, offset=20)
    assert total == total_beyond == 10
    assert [e.detail["n"] for e in first + second + last] == list(range(9, -1, -1))
    assert beyond == []
    ids = [e.id for e in first + second + last]
    assert ids == sorted(ids, reverse=True)  # type: ignore[type-var]
    newest = first[0]
    assert newest == replace(event("token.created", 9), id=newest.id)


def test_audit_kind_filter_counts_only_that_kind(store: Store) -> None:
    with store.write() as tx:
        for n in range(7):
            tx.append_audit(event("token.refused" if n % 2 else "login.failed", n))
    with store.read() as tx:
        refused, total = tx.list_audit(limit=2, kind="token.refused")
        none, zero = tx.list_audit(limit=10, kind="runner.deleted")
    assert total == 3
    assert [e.detail["n"] for e in refused] == [5, 3]
    assert (none, zero) == ([], 0)


# -- transactions ------------------------------------------------------------------------------
def test_exception_inside_write_rolls_everything_back(store: Store) -> None:
    def write_then_fail() -> None:
        with store.write() as tx:
            tx.create_token(token())
            tx.create_runner(runner())
            tx.put_setting("x", "y")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_then_fail()
    with store.read() as tx:
        assert tx.find_token("tok-1") is None
        assert tx.find_runner("10.0.0.2") is None
        assert tx.find_setting("x") is None


def test_muster_error_inside_write_passes_through_and_rolls_back(store: Store) -> None:
    def create_then_revoke_unknown() -> None:
        with store.write() as tx:
            tx.create_token(token())
            tx.revoke_token("nope", T0)

    raises(NotFoundError, "enrollment_tokens.invalid_token_id", create_then_revoke_unknown)
    with store.read() as tx:
        assert tx.find_token("tok-1") is None


def test_caught_conflict_leaves_the_rest_of_the_transaction_usable(store: Store) -> None:
    with store.write() as tx:
        tx.create_token(token())
    with store.write() as tx:
        with pytest.raises(ConflictError):
            tx.create_token(token())
        tx.create_token(token("tok-2"))
    with store.read() as tx:
        assert [t.token_id for t in tx.list_tokens()] == ["tok-1", "tok-2"]


def test_second_store_on_the_same_database_sees_a_revocation_at_once(
    store: Store, store_url: str
) -> None:
    other = open_store(store_url)
    try:
        with store.write() as tx:
            tx.create_token(token())
        with other.read() as tx:
            assert tx.find_token("tok-1").revoked_at is None  # type: ignore[union-attr]
        with store.write() as tx:
            tx.revoke_token("tok-1", at(5))
        with other.read() as tx:
            assert tx.find_token("tok-1").revoked_at == at(5)  # type: ignore[union-attr]
    finally:
        other.close()


def test_migrations_are_idempotent(store: Store, store_url: str) -> None:
    with store.write() as tx:
        tx.create_token(token())
    revision = current_revision(store)
    assert revision is not None
    again = open_store(store_url)
    try:
        assert current_revision(again) == revision
        with again.read() as tx:
            assert tx.find_token("tok-1") == token()
    finally:
        again.close()


# -- runner certificates in bulk (the coordinator's in-memory snapshot) -------------------------


def test_runner_serials_list_current_and_previous_of_every_runner(store: Store) -> None:
    with store.read() as tx:
        assert tx.list_runner_serials() == RunnerSerials({}, {})
    with store.write() as tx:
        tx.create_runner(runner("10.0.0.3"))
        tx.create_runner(runner("10.0.0.2", previous_cert_serial="old-serial"))
    with store.read() as tx:
        assert tx.list_runner_serials() == RunnerSerials(
            {"10.0.0.2": "10.0.0.2-serial-1", "10.0.0.3": "10.0.0.3-serial-1"},
            {"10.0.0.2": "old-serial"},
        )


def test_every_runners_serials_are_exact_whatever_their_ids_hold(store: Store) -> None:
    """Every serial is read as one aggregated value split on a space and a newline; ids that
    hold them (written around the API, which allows neither) are read row by row instead."""
    with store.write() as tx:
        for n in range(30):
            previous = f"old-{n}" if n % 2 else None
            tx.create_runner(runner(f"10.0.1.{n}", previous_cert_serial=previous))
    expected = RunnerSerials(
        {f"10.0.1.{n}": f"10.0.1.{n}-serial-1" for n in range(30)},
        {f"10.0.1.{n}": f"old-{n}" for n in range(1, 30, 2)},
    )
    with store.read() as tx:
        assert tx.list_runner_serials() == expected
    for odd in ("host with spaces", "host\nand a line"):
        with store.write() as tx:
            tx.create_runner(runner(odd, previous_cert_serial=f"{odd} before"))
        expected.current[odd] = f"{odd}-serial-1"
        expected.previous[odd] = f"{odd} before"
        with store.read() as tx:
            assert tx.list_runner_serials() == expected


def test_every_allocators_version_is_listed_by_id(store: Store) -> None:
    with store.read() as tx:
        assert tx.list_allocator_versions() == {}
    with store.write() as tx:
        tx.create_allocators([allocator("a b"), allocator("10.0.0.3"), allocator("10.0.0.2")])
    with store.read() as tx:
        versions = tx.list_allocator_versions()
        assert versions == {"10.0.0.2": 0, "10.0.0.3": 0, "a b": 0}
        assert versions == dict(tx.list_allocator_columns(["instances_version"]))


def test_bulk_reads_leave_no_object_per_row_for_the_garbage_collector(store: Store) -> None:
    """Every runner's serials and every allocator's version, which each coordinator process
    reads again at intervals: at 100,000 hosts a tuple a row was 100,000 objects that every
    young-generation collection scanned (docs/benchmarks.md, "The full reads' garbage")."""
    with store.write() as tx:
        for n in range(2_000):
            previous = f"old-{n}" if n % 2 else None
            tx.create_runner(runner(f"10.3.{n // 250}.{n % 250}", previous_cert_serial=previous))
        tx.create_allocators([allocator(f"10.3.{n // 250}.{n % 250}") for n in range(2_000)])
    with store.read() as tx:
        tx.list_runner_serials(), tx.list_allocator_versions()  # statements compiled, cached
        gc.collect()
        gc.disable()  # a collection would untrack tuples of strings and hide them
        try:
            before = len(gc.get_objects())
            read = (tx.list_runner_serials(), tx.list_allocator_versions())
            held = len(gc.get_objects()) - before
        finally:
            gc.enable()
    assert len(read[0]) == len(read[1]) == 2_000
    assert held < 200, held  # the statements' and results' own objects, not one per row


def test_runner_serials_from_an_expiry_on_are_those_joined_or_renewed_since(
    store: Store,
) -> None:
    with store.write() as tx:
        tx.create_runner(runner("10.0.0.4", cert_expires_at=at(100)))
        tx.create_runner(runner("10.0.0.3", cert_expires_at=at(200)))
        tx.create_runner(runner("10.0.0.2", cert_expires_at=at(300)))
    with store.read() as tx:
        assert tx.list_runner_serials(expiring_from=at(200)) == RunnerSerials(
            # 10.0.0.3's at the expiry itself: included
            {"10.0.0.2": "10.0.0.2-serial-1", "10.0.0.3": "10.0.0.3-serial-1"},
            {},
        )
        assert tx.list_runner_serials(expiring_from=at(301)) == RunnerSerials({}, {})
    with store.write() as tx:  # a renewal expires later than every earlier certificate
        tx.update_runner(
            "10.0.0.4",
            cert_serial="renewed",
            previous_cert_serial="10.0.0.4-serial-1",
            cert_expires_at=at(400),
        )
    with store.read() as tx:
        assert tx.list_runner_serials(expiring_from=at(301)) == RunnerSerials(
            {"10.0.0.4": "renewed"}, {"10.0.0.4": "10.0.0.4-serial-1"}
        )


def test_revoked_serials_are_listed_once_a_runner_is_deleted(store: Store) -> None:
    with store.write() as tx:
        tx.create_runner(runner(previous_cert_serial="old-serial"))
        tx.create_runner(runner("10.0.0.3"))
    with store.read() as tx:
        assert tx.list_revoked_serials() == []
    with store.write() as tx:
        tx.delete_runner("10.0.0.2", at(60))
    with store.read() as tx:
        assert sorted(tx.list_revoked_serials()) == ["10.0.0.2-serial-1", "old-serial"]
        assert tx.list_runner_serials() == RunnerSerials({"10.0.0.3": "10.0.0.3-serial-1"}, {})


def test_certificates_version_moves_with_joins_renewals_and_deletions_only(store: Store) -> None:
    def version() -> tuple[int, datetime | None, int]:
        with store.read() as tx:
            return tx.get_certificates_version()

    empty = version()
    assert empty == (0, None, 0)
    with store.write() as tx:
        tx.create_runner(runner("10.0.0.2"))
        tx.create_runner(runner("10.0.0.3", cert_expires_at=at(90000)))
    joined = version()
    assert joined == (2, at(90000), 0)
    with store.write() as tx:
        tx.record_heartbeats([("10.0.0.2", at(5), HostReport(memory_mb=1))])
    assert version() == joined  # heartbeats do not move it
    with store.write() as tx:  # a renewal: a new serial expiring later than every earlier one
        tx.update_runner(
            "10.0.0.2",
            cert_serial="renewed",
            previous_cert_serial="10.0.0.2-serial-1",
            cert_expires_at=at(100000),
        )
    renewed = version()
    assert renewed == (2, at(100000), 0)
    with store.write() as tx:
        tx.delete_runner("10.0.0.3", at(60))
    assert version() == (1, at(100000), 1)


# -- listings at fleet scale -------------------------------------------------------------------
def test_allocator_columns_hold_what_the_records_hold_and_none_without_a_runner(
    store: Store,
) -> None:
    host = runner("10.0.0.2", roles=("allocator", "proxy"), last_heartbeat_at=at(5))
    placed = allocator("10.0.0.2", maintenance=True, metadata={"k": "v"}, settings={"capacity": 8})
    orphan = allocator("10.0.0.1", zone_id="ece-zone-2")  # its runner is gone
    with store.write() as tx:
        tx.create_runner(host)
        tx.create_allocator(placed)
        tx.create_allocator(orphan)
    own = ["zone_id", "capacity_mb", "maintenance", "tags", "metadata", "settings"]
    theirs = ["runner_id", "host_ip", "roles", "report", "last_heartbeat_at", "joined_at"]
    with store.read() as tx:
        assert tx.list_allocator_columns([]) == [("10.0.0.1",), ("10.0.0.2",)]
        rows = tx.list_allocator_columns(own + [f"runner.{name}" for name in theirs])
        with pytest.raises(ValueError, match="no column"):
            tx.list_allocator_columns(["runner.nope"])
    assert rows == [
        (orphan.allocator_id, *(getattr(orphan, name) for name in own), *[None] * len(theirs)),
        (
            placed.allocator_id,
            *(getattr(placed, name) for name in own),
            *(getattr(host, name) for name in theirs),
        ),
    ]


def test_runner_columns_hold_what_the_records_hold(store: Store) -> None:
    records = [runner("10.0.0.3", last_heartbeat_at=None), runner("10.0.0.2", zone_id="z2")]
    with store.write() as tx:
        for record in records:
            tx.create_runner(record)
    names = ["zone_id", "roles", "report", "joined_at", "last_heartbeat_at", "api_address"]
    with store.read() as tx:
        rows = tx.list_runner_columns(names)
        with pytest.raises(ValueError, match="no column"):
            tx.list_runner_columns(["capacity_mb"])
    assert rows == [(r.runner_id, *(getattr(r, name) for name in names)) for r in reversed(records)]


def test_runner_columns_of_some_runners_or_of_a_role(store: Store) -> None:
    """The routing table reads only the proxies and the hosts of its instances, not the fleet:
    a role matches a whole role (not `proxyish`), ids past one IN list are all read."""
    roles = {
        "10.0.0.1": ("allocator", "proxy"),
        "10.0.0.2": ("allocator",),
        "10.0.0.3": ("proxy",),
        "10.0.0.4": ("allocator", "coordinator"),
    }
    ids = [f"10.1.{i // 250}.{i % 250}" for i in range(1100)]
    with store.write() as tx:
        for rid, held in roles.items():
            tx.create_runner(runner(rid, roles=held, host_ip=rid))
        tx.create_runners(runner(rid, cert_serial=f"{rid}-s") for rid in ids)
    with store.read() as tx:
        proxies = tx.list_runner_columns(["host_ip"], role="proxy")
        none = tx.list_runner_columns([], role="prox")
        some = tx.list_runner_columns(["roles"], runner_ids=["10.0.0.3", "10.0.0.2", "10.9.9.9"])
        both = tx.list_runner_columns([], runner_ids=["10.0.0.2", "10.0.0.3"], role="proxy")
        many = tx.list_runner_columns([], runner_ids=[*ids, "10.9.9.9"])
    assert proxies == [("10.0.0.1", "10.0.0.1"), ("10.0.0.3", "10.0.0.3")]
    assert none == []
    assert some == [("10.0.0.2", ("allocator",)), ("10.0.0.3", ("proxy",))]
    assert both == [("10.0.0.3",)]
    assert [row[0] for row in many] == sorted(ids)


def test_records_by_id_skip_unknown_ids_past_any_parameter_limit(store: Store) -> None:
    ids = [f"10.0.{i // 250}.{i % 250}" for i in range(1100)]  # more than one IN list holds
    with store.write() as tx:
        for rid in ids:
            tx.create_allocator(allocator(rid))
        for rid in ids[:3]:
            tx.create_runner(runner(rid))
    with store.read() as tx:
        found = tx.list_allocators_by_id([*reversed(ids), "nope", ids[0]])
        hosts = tx.list_runners_by_id([ids[2], "nope", ids[0]])
        assert tx.list_allocators_by_id([]) == []
        assert tx.list_runners_by_id([]) == []
    assert sorted(found, key=lambda a: a.allocator_id) == [allocator(rid) for rid in sorted(ids)]
    assert sorted(r.runner_id for r in hosts) == [ids[0], ids[2]]
    assert hosts == [runner(r.runner_id) for r in hosts]


# -- sliding sessions ------------------------------------------------------------------------------
def test_session_round_trips_its_maximum_life(store: Store) -> None:
    session = SessionRecord("ui", "admin", T0, at(3600), max_expires_at=at(43200))
    with store.write() as tx:
        tx.create_session(session)
    with store.read() as tx:
        found = tx.find_session("ui")
    assert found == session
    assert found.max_expires_at.utcoffset() == timedelta(0)  # type: ignore[union-attr]


def test_session_is_extended_later_only_and_never_past_its_maximum(store: Store) -> None:
    with store.write() as tx:
        tx.create_session(SessionRecord("ui", "admin", T0, at(3600), max_expires_at=at(43200)))
        assert tx.extend_session("ui", at(5400)) is True
        assert tx.extend_session("ui", at(5400)) is False  # no later than its end
        assert tx.extend_session("ui", at(4000)) is False  # never back
        assert tx.extend_session("ui", at(43201)) is False  # past its maximum
        assert tx.extend_session("ui", at(43200)) is True  # up to it
    with store.read() as tx:
        assert tx.find_session("ui") == SessionRecord(
            "ui", "admin", T0, at(43200), max_expires_at=at(43200)
        )


def test_session_without_a_maximum_or_gone_is_never_extended(store: Store) -> None:
    with store.write() as tx:
        tx.create_session(SessionRecord("api", "admin", T0, at(3600)))
        tx.create_session(SessionRecord("ui", "admin", T0, at(3600), max_expires_at=at(43200)))
        assert tx.extend_session("api", at(5400)) is False
        assert tx.delete_session("ui") is True
        assert tx.extend_session("ui", at(5400)) is False
        assert tx.extend_session("unknown", at(5400)) is False
    with store.read() as tx:
        assert tx.find_session("api") == SessionRecord("api", "admin", T0, at(3600))
        assert tx.find_session("ui") is None  # a logout racing an extension stays a logout


def test_sessions_from_before_the_sliding_revision_keep_their_end(store: Store) -> None:
    with at_revision(store, "0002") as conn:
        conn.execute(
            insert(tables.sessions).values(
                token_hash="old", username="admin", created_at=T0, expires_at=at(3600)
            )
        )
    upgrade(store)
    with store.write() as tx:
        assert tx.find_session("old") == SessionRecord(
            "old", "admin", T0, at(3600), family_id="old"
        )
        assert tx.extend_session("old", at(5400)) is False


def test_users_and_sessions_from_before_the_roles_revision_are_carried_over(
    store: Store,
) -> None:
    with at_revision(store, "0005") as conn:
        for name, role in (("admin", "admin"), ("readonly", "readonly")):
            conn.execute(
                text(
                    "INSERT INTO users (username, password_hash, role, created_at) "
                    "VALUES (:name, 'h', :role, :at)"
                ),
                {"name": name, "role": role, "at": T0},
            )
        conn.execute(
            text(
                "INSERT INTO sessions (token_hash, username, created_at, expires_at) "
                "VALUES ('old', 'admin', :at, :end)"
            ),
            {"at": T0, "end": at(3600)},
        )
    upgrade(store)
    with store.write() as tx:
        admin, readonly = tx.find_user("admin"), tx.find_user("readonly")
        assert admin is not None
        assert readonly is not None
        assert (admin.roles, admin.builtin, admin.enabled) == (("ece_platform_admin",), True, True)
        assert (readonly.roles, readonly.builtin) == (("ece_platform_viewer",), True)
        old = tx.find_session("old")
        assert old is not None
        assert (old.family_id, old.generation) == ("old", 0)
        assert tx.find_session_generation("old") == 0
        assert tx.advance_session_family("old", 0) is True
