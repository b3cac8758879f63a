"""Runner identities and the coordinator directory answer from memory; only their refresh, in
its own thread, reads the store; with the store down the last good snapshot answers, without a
store call per request; a forgotten runner is refused at once."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any, cast

import pytest
from cryptography import x509

from muster.clock import FakeClock
from muster.domain import enrollment, pki
from muster.domain.desired import InstanceVersions
from muster.domain.identities import (
    FULL_RELOAD_S,
    CoordinatorDirectory,
    Refresher,
    RunnerIdentities,
)
from muster.domain.models import HostReport, RunnerRecord, RunnerSerials
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.runners import JoinRequest, delete_runner, join_host
from muster.domain.store import Store, Transaction
from muster.domain.users import Principal
from muster.errors import StoreError, UnauthenticatedError
from muster.storage import open_store
from tests.conftest import Installed
from tests.pgdb import fresh_database

SECOND = timedelta(seconds=1)
ADMIN = Principal(name="admin", role="admin", method="basic")


class RecordingStore:
    """The real store, recording which thread opened each transaction and whether an event loop
    was running there; `down` makes every transaction fail as an unreachable store does."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self.down = False
        self.calls: list[tuple[str, bool]] = []  # (thread name, on an event loop)

    def read(self) -> AbstractContextManager[Transaction]:
        self._record()
        return self.store.read()

    def write(self) -> AbstractContextManager[Transaction]:
        self._record()
        return self.store.write()

    def close(self) -> None:
        self.store.close()

    def on_the_loop(self) -> list[str]:
        return [thread for thread, on_loop in self.calls if on_loop]

    def _record(self) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((threading.current_thread().name, on_loop))
        if self.down:
            raise StoreError("the store cannot be reached (test)")


@pytest.fixture
def recording(installed: Installed) -> RecordingStore:
    return RecordingStore(installed.platform.store)


@pytest.fixture
def platform(installed: Installed, recording: RecordingStore) -> Platform:
    return load_platform(recording, installed.clock)


def joined(platform: Platform, runner_id: str) -> x509.Certificate:
    _record, token = enrollment.create_token(
        platform, ADMIN, source="198.51.100.1", roles=["allocator"], persistent=True
    )
    request = JoinRequest(
        token=token,
        csr_pem=pki.build_csr(pki.generate_private_key(), runner_id),
        runner_id=runner_id,
        host_ip="10.0.0.2",
        capacity_mb=2048,
    )
    return pki.load_certificate(join_host(platform, request, source="10.0.0.2").certificate_pem)


@pytest.fixture
def identities(platform: Platform) -> RunnerIdentities:
    return RunnerIdentities(platform, ttl_s=2.0)


def test_a_runner_in_the_snapshot_is_vouched_for_without_a_store_read(
    platform: Platform, identities: RunnerIdentities, recording: RecordingStore
) -> None:
    cert = joined(platform, "host-a")
    assert identities.vouch(cert) is None  # not loaded yet: only the store can tell
    assert identities.refresh() is True
    before = len(recording.calls)
    runner = identities.vouch(cert)
    assert runner is not None
    assert (runner.name, runner.role) == ("host-a", "runner")
    assert identities.authenticate(cert).name == "host-a"
    assert len(recording.calls) == before
    # Every heartbeat is vouched for: the runner's principal is made once and handed out again.
    assert identities.vouch(cert) is runner
    assert identities.authenticate(cert) is runner


def test_a_certificate_memory_cannot_vouch_for_is_read_once_then_cached(
    platform: Platform, identities: RunnerIdentities, recording: RecordingStore
) -> None:
    identities.refresh()
    cert = joined(platform, "host-b")  # joined since the refresh
    assert identities.vouch(cert) is None
    before = len(recording.calls)
    assert identities.authenticate(cert).name == "host-b"
    assert len(recording.calls) == before + 1
    assert identities.vouch(cert) is not None  # the store's answer, for ttl_s
    assert len(recording.calls) == before + 1


def test_a_stale_snapshot_is_not_trusted_while_the_store_answers(
    platform: Platform, identities: RunnerIdentities, clock: FakeClock
) -> None:
    cert = joined(platform, "host-c")
    identities.refresh()
    clock.advance(identities.ttl_s)  # no refresh since: the snapshot may miss a deletion
    assert identities.vouch(cert) is None
    delete_runner(platform, ADMIN, "host-c", source="elsewhere")
    with pytest.raises(UnauthenticatedError):
        identities.authenticate(cert)


def test_forget_refuses_a_deleted_runner_at_once_and_a_later_refresh_keeps_it_out(
    platform: Platform, identities: RunnerIdentities
) -> None:
    cert = joined(platform, "host-d")
    identities.refresh()
    assert identities.authenticate(cert).name == "host-d"
    delete_runner(platform, ADMIN, "host-d", source="test")
    identities.forget("host-d")
    assert "host-d" not in identities._principals  # nothing kept of a forgotten runner
    assert identities.vouch(cert) is None
    with pytest.raises(UnauthenticatedError) as info:
        identities.authenticate(cert)
    assert info.value.code == "runners.certificate_revoked"
    identities.refresh(full=True)
    assert identities.vouch(cert) is None


@pytest.mark.parametrize("and_a_join", [False, True], ids=["alone", "and-a-join"])
def test_a_deletion_elsewhere_is_seen_by_the_next_refresh(
    platform: Platform, identities: RunnerIdentities, and_a_join: bool
) -> None:
    cert = joined(platform, "host-e")
    identities.refresh()
    assert identities.refresh() is False  # nothing moved: confirmed without reading serials
    delete_runner(platform, ADMIN, "host-e", source="elsewhere")  # no forget here
    # With a join in the same second the count does not fall: the revocation still makes the
    # refresh read every runner, not only the certificates joined since.
    later = joined(platform, "host-e2") if and_a_join else None
    assert identities.refresh() is True
    assert identities.vouch(cert) is None
    with pytest.raises(UnauthenticatedError):
        identities.authenticate(cert)
    if later is not None:
        assert identities.vouch(later) is not None
    assert platform.liveness.fleet_size == (1 if and_a_join else 0)


def test_with_the_store_down_the_last_good_snapshot_answers_without_store_calls(
    platform: Platform, identities: RunnerIdentities, recording: RecordingStore, clock: FakeClock
) -> None:
    known = joined(platform, "host-f")
    identities.refresh()
    later = joined(platform, "host-g")  # not in the last good snapshot
    recording.down = True
    with pytest.raises(StoreError):
        identities.refresh()
    assert identities.store_down
    clock.advance(10 * identities.ttl_s)  # long stale
    before = len(recording.calls)
    for _ in range(3):
        assert identities.vouch(known) is not None
        assert identities.authenticate(known).name == "host-f"
        with pytest.raises(StoreError):
            identities.authenticate(later)  # only the store could tell: 503, no call
    assert len(recording.calls) == before
    recording.down = False
    identities.refresh()
    assert not identities.store_down
    assert identities.authenticate(later).name == "host-g"


def read_then_rewritten(
    platform: Platform, identities: RunnerIdentities, clock: FakeClock, runner_id: str
) -> x509.Certificate:
    """`runner_id` joined and read, then its serial rewritten in place: a change no mark moves
    (never made by Muster), which shows which read a refresh made, as only a read of every
    runner sees it. A later runner (`runner_id`b, 5 s later) holds the newest certificate at the
    read, which is read again after it. Returns `runner_id`'s certificate."""
    first = joined(platform, runner_id)
    clock.advance(5)
    joined(platform, f"{runner_id}b")
    identities.refresh()
    with platform.store.write() as tx:
        tx.update_runner(runner_id, cert_serial="rewritten")
    return first


def test_joins_since_the_last_read_are_added_without_reading_every_runner(
    platform: Platform, identities: RunnerIdentities, clock: FakeClock
) -> None:
    first = read_then_rewritten(platform, identities, clock, "host-j1")
    clock.advance(5)  # a later certificate, as any join's after the last read (no full read due)
    second = joined(platform, "host-j2")
    assert identities.refresh() is True
    assert identities.vouch(second) is not None  # the join, read along the expiry
    assert identities.vouch(first) is not None  # host-j1's row was not read again
    assert platform.liveness.fleet_size == 3
    identities.refresh(full=True)
    assert identities.vouch(first) is None


class ReadingHook:
    """The store, calling `during` whenever a transaction lists every runner's serials."""

    def __init__(self, store: Store, during: Callable[[], None]) -> None:
        self.store, self.url, self.during = store, store.url, during

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self.store.read() as tx:
            yield cast(Transaction, _HookedTransaction(tx, self.during))

    def write(self) -> AbstractContextManager[Transaction]:
        return self.store.write()

    def close(self) -> None:
        self.store.close()


class _HookedTransaction:
    def __init__(self, tx: Transaction, during: Callable[[], None]) -> None:
        self._tx, self._during = tx, during

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def list_runner_serials(self, **kwargs: Any) -> RunnerSerials:
        if not kwargs:
            self._during()
        return self._tx.list_runner_serials(**kwargs)


class ServedFleet(ReadingHook):
    """The store, except that a read of runners' serials answers `fleet()` when it gives one (a
    fleet of a size a test cannot join), else the store's own."""

    def __init__(self, store: Store, fleet: Callable[[], RunnerSerials | None]) -> None:
        super().__init__(store, lambda: None)
        self.fleet = fleet

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self.store.read() as tx:
            yield cast(Transaction, _ServedTransaction(tx, self.fleet))


class _ServedTransaction:
    def __init__(self, tx: Transaction, fleet: Callable[[], RunnerSerials | None]) -> None:
        self._tx, self._fleet = tx, fleet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def list_runner_serials(self, **kwargs: Any) -> RunnerSerials:
        served = self._fleet()
        return served if served is not None else self._tx.list_runner_serials(**kwargs)


def test_the_periodic_full_read_is_apart_from_the_confirmations(
    installed: Installed, clock: FakeClock
) -> None:
    seen: list[Principal | None] = []
    hooked = ReadingHook(installed.platform.store, lambda: seen.append(identities.vouch(cert)))
    platform = load_platform(cast(Store, hooked), clock)
    identities = RunnerIdentities(platform, ttl_s=2.0)
    cert = joined(platform, "host-m")
    identities.refresh()
    seen.clear()
    clock.advance(FULL_RELOAD_S * 1.25)  # nothing moved, but the periodic full read is due
    assert identities.vouch(cert) is None  # stale: not confirmed for ttl_s
    assert identities.refresh() is False  # a confirmation reads the version alone
    assert seen == []
    assert identities.reload_if_due() is True  # the other thread's full read
    assert [p.name if p else None for p in seen] == ["host-m"]  # vouched for meanwhile
    assert identities.reload_if_due() is False  # not due again for FULL_RELOAD_S


def test_a_large_fleets_full_read_comes_less_often(installed: Installed, clock: FakeClock) -> None:
    large = [RunnerSerials({f"filler-{n}": "x" for n in range(100_000)}, {})]
    platform = load_platform(
        cast(Store, ServedFleet(installed.platform.store, lambda: large[0] if large else None)),
        clock,
    )
    identities = RunnerIdentities(platform, ttl_s=2.0)
    joined(platform, "host-q")
    identities.refresh()  # 100,000 read
    large.clear()  # the store's own from now on
    clock.advance(FULL_RELOAD_S * 1.25)
    assert identities.reload_if_due() is False  # at 100,000 runners: every 100 s, give or take
    clock.advance(100)
    assert identities.reload_if_due() is True
    assert platform.liveness.fleet_size == 1  # the store's, read again


def test_each_snapshot_draws_its_own_spacing_for_the_full_reads(
    platform: Platform, clock: FakeClock
) -> None:
    """A coordinator's workers start together: were the full reads spaced alike, every worker
    would read every runner in the same second (docs/benchmarks.md, "The full reads'
    garbage")."""
    joined(platform, "host-s")
    waits = []
    for _ in range(6):
        identities = RunnerIdentities(platform, ttl_s=2.0)
        identities.refresh()  # its first full read
        waited = 0.0
        while not identities.reload_if_due():
            clock.advance(0.25)
            waited += 0.25
        waits.append(waited)
    assert all(FULL_RELOAD_S * 0.8 <= w <= FULL_RELOAD_S * 1.2 + 0.25 for w in waits), waits
    assert len(set(waits)) > 1, waits


def test_a_full_read_leaves_no_object_per_runner_for_the_garbage_collector(
    installed: Installed, clock: FakeClock
) -> None:
    """At 100,000 runners a tuple per runner was 100,000 objects for every young-generation
    collection to scan, in every worker at once: the snapshot holds dicts of strings."""
    fleet = RunnerSerials(
        {f"filler-{n}": f"serial-{n}" for n in range(5_000)},
        {f"filler-{n}": f"old-{n}" for n in range(0, 5_000, 2)},
    )

    def served() -> RunnerSerials:
        return RunnerSerials(dict(fleet.current), dict(fleet.previous))

    platform = load_platform(cast(Store, ServedFleet(installed.platform.store, served)), clock)
    identities = RunnerIdentities(platform, ttl_s=2.0)
    identities.refresh()
    gc.collect()
    gc.disable()  # a collection would untrack tuples of strings and hide them
    try:
        before = len(gc.get_objects())
        assert identities.refresh(full=True) is True
        held = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert held < 100, held
    assert identities.vouch_names(("filler-7", "serial-7")) is not None
    assert identities.vouch_names(("filler-8", "old-8")) is not None
    assert identities.vouch_names(("filler-7", "old-8")) is None
    assert platform.liveness.fleet_size == 5_000


def test_a_full_read_overtaken_by_a_later_one_is_not_installed(
    installed: Installed, clock: FakeClock
) -> None:
    def meanwhile() -> None:
        # While the periodic read runs on one thread, the runner is deleted elsewhere and the
        # other thread's refresh reads every serial again (the revocation moved the version).
        if not done:
            done.append(True)
            delete_runner(platform, ADMIN, "host-p", source="elsewhere")
            assert identities.refresh() is True

    done: list[bool] = [True]  # not during the first read
    hooked = ReadingHook(installed.platform.store, meanwhile)
    platform = load_platform(cast(Store, hooked), clock)
    identities = RunnerIdentities(platform, ttl_s=2.0)
    cert = joined(platform, "host-p")
    identities.refresh()
    clock.advance(FULL_RELOAD_S * 1.25)
    done.clear()
    assert identities.reload_if_due() is True  # its rows, read before the deletion, hold host-p
    assert done
    assert identities.vouch(cert) is None
    with pytest.raises(UnauthenticatedError):
        identities.authenticate(cert)


def test_a_stuck_fleet_refresher_does_not_hold_up_the_snapshot(
    platform: Platform, identities: RunnerIdentities
) -> None:
    directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"])
    release = threading.Event()
    refresher = Refresher(identities, directory, also={"stuck": lambda: release.wait(30)})
    refresher.start()
    try:
        cert = joined(platform, "host-n")  # after the first refresh, most likely: read later
        found = threading.Event()
        for _ in range(500):
            if identities.vouch(cert) is not None:
                found.set()
                break
            found.wait(0.01)
        assert found.is_set()  # while the other thread still waits in "stuck"
        assert not release.is_set()
    finally:
        release.set()
        refresher.stop()


def test_the_refresher_reads_the_store_from_its_own_thread_only(
    platform: Platform, identities: RunnerIdentities, recording: RecordingStore
) -> None:
    cert = joined(platform, "host-h")
    directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"])
    versions = InstanceVersions(platform)
    before = len(recording.calls)
    refresher = Refresher(identities, directory, also={"versions": versions.refresh})
    refresher.start()
    try:
        loaded = threading.Event()
        for _ in range(500):
            if identities.vouch(cert) is not None and versions.known():
                loaded.set()
                break
            loaded.wait(0.01)
        assert loaded.is_set()
    finally:
        refresher.stop()
    threads = {thread for thread, _on_loop in recording.calls[before:]}
    # The snapshot's thread, and the other refreshers' (the versions' read) apart from it.
    assert threads == {"identities-refresh", "fleet-refresh"}
    assert recording.on_the_loop() == []


def test_a_join_stored_after_a_later_certificate_is_added_without_reading_every_runner(
    platform: Platform, identities: RunnerIdentities, clock: FakeClock
) -> None:
    first = read_then_rewritten(platform, identities, clock, "host-k1")
    newest = first.not_valid_after_utc + SECOND * 5  # host-k1b's
    with platform.store.write() as tx:
        tx.create_runner(
            replace(runner("host-k3", None, clock), cert_expires_at=newest + 120 * SECOND)
        )
    assert identities.refresh() is True
    # host-k2's certificate was issued before host-k3's, its join stored after it (it waited for
    # its group's commit): its expiry is older than the newest the last refresh read (by a
    # second, and by 20 s: past the first read back).
    for n, (name, earlier) in enumerate([("host-k2", SECOND), ("host-k2b", 20 * SECOND)]):
        with platform.store.write() as tx:
            late = replace(
                runner(name, None, clock), cert_expires_at=newest + 120 * SECOND - earlier
            )
            tx.create_runner(late)
        assert identities.refresh() is True
        assert platform.liveness.fleet_size == 4 + n  # read
    assert identities.vouch(first) is not None  # host-k1's row was not read again


def test_the_versions_are_read_again_when_an_allocator_goes_not_when_one_joins(
    platform: Platform,
) -> None:
    """Joins add allocators at version 0, which is what a version not read is taken to be: while
    hosts joined, every process read every allocator's version again each second (~180 ms at
    100,000 allocators)."""
    joined(platform, "host-v1")
    versions = InstanceVersions(platform)
    versions.refresh()
    assert versions.known() == 1
    joined(platform, "host-v2")
    joined(platform, "host-v3")
    versions.refresh()
    assert versions.known() == 1  # nothing read again
    assert versions.version("host-v3") == 0
    delete_runner(platform, ADMIN, "host-v1", source="test")
    versions.refresh()
    assert versions.known() == 2  # read again: host-v2 and host-v3


def runner(runner_id: str, api_address: str | None, clock: FakeClock) -> RunnerRecord:
    return RunnerRecord(
        runner_id=runner_id,
        host_ip="10.0.0.9",
        public_hostname="10.0.0.9",
        zone_id="ece-zone-1",
        roles=("coordinator",),
        cert_serial="01",
        cert_expires_at=clock.now() + timedelta(days=1),
        joined_at=clock.now(),
        report=HostReport(),
        api_address=api_address,
    )


def test_a_coordinator_admitted_here_is_listed_before_the_next_refresh(
    platform: Platform, clock: FakeClock
) -> None:
    directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"], ttl_s=3600)
    assert directory.addresses() == ("10.0.0.1:12443",)
    directory.admitted(runner("coord-b", "10.0.0.9:12443", clock))
    directory.admitted(runner("host-1", None, clock))  # serves no API: not listed
    assert directory.addresses() == ("10.0.0.1:12443", "10.0.0.9:12443")
    directory.admitted(runner("coord-b", "10.0.0.9:12443", clock))
    assert directory.addresses() == ("10.0.0.1:12443", "10.0.0.9:12443")  # listed once


@pytest.mark.postgres
def test_the_directory_lists_stored_coordinators_and_keeps_them_while_the_store_is_down() -> None:
    # A shared store (PostgreSQL): coordinators recorded there are listed to agents.
    with fresh_database("directory") as url:
        store = open_store(url)
        try:
            clock = FakeClock()
            create_platform(store, clock)
            recording = RecordingStore(store)
            platform = load_platform(recording, clock)
            joined(platform, "coord-c")
            with store.write() as tx:  # as a coordinator's join records it
                tx.update_runner("coord-c", api_address="10.0.0.3:12443")
            directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"])
            before = len(recording.calls)
            first = directory.addresses()
            assert first == ("10.0.0.1:12443",)  # memory only, until a refresh
            assert len(recording.calls) == before
            directory.refresh()
            assert directory.addresses() == ("10.0.0.1:12443", "10.0.0.3:12443")
            unchanged = directory.addresses()
            directory.refresh()
            assert directory.addresses() is unchanged  # the same tuple while nothing changed
            recording.down = True
            with pytest.raises(StoreError):
                directory.refresh()
            assert directory.addresses() == ("10.0.0.1:12443", "10.0.0.3:12443")
        finally:
            store.close()


def test_on_sqlite_the_directory_lists_only_this_coordinator_and_reads_no_store(
    platform: Platform, recording: RecordingStore
) -> None:
    joined(platform, "other")
    with platform.store.write() as tx:  # an address recorded before such joins were refused
        tx.update_runner("other", api_address="203.0.113.9:9999")
    directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"])
    before = len(recording.calls)
    directory.refresh()
    assert directory.addresses() == ("10.0.0.1:12443",)
    assert len(recording.calls) == before


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    names = {"identities-refresh", "fleet-refresh"}
    assert not [t for t in threading.enumerate() if t.name in names]
