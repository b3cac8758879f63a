"""The store's failed-sign-in counts (`login_failures`), on every backend: one more per key and
bucket, none lost when workers count at once, old buckets deleted as new ones are written."""

from __future__ import annotations

import threading

from muster.domain.store import Store

BUCKET = 1_800_000_000


def counts(store: Store, keys: list[str], since: int = 0) -> list[tuple[str, int, int]]:
    with store.read() as tx:
        return sorted(tx.list_login_failures(keys, since))


def test_failures_count_per_key_and_bucket(store: Store) -> None:
    assert counts(store, ["password 10.0.0.1"]) == []
    with store.write() as tx:
        tx.record_login_failures(["password 10.0.0.1", "a b"], BUCKET, expired=0)
    with store.write() as tx:
        tx.record_login_failures(["password 10.0.0.1"], BUCKET, expired=0)
        tx.record_login_failures(["password 10.0.0.1"], BUCKET + 10, expired=0)
    assert counts(store, ["password 10.0.0.1", "a b", "other"]) == [
        ("a b", BUCKET, 1),
        ("password 10.0.0.1", BUCKET, 2),
        ("password 10.0.0.1", BUCKET + 10, 1),
    ]
    assert counts(store, ["password 10.0.0.1"], since=BUCKET + 1) == [
        ("password 10.0.0.1", BUCKET + 10, 1)
    ]
    assert counts(store, []) == []


def test_a_key_counted_twice_in_one_call_counts_once(store: Store) -> None:
    with store.write() as tx:
        tx.record_login_failures(["k", "k"], BUCKET, expired=0)
    assert counts(store, ["k"]) == [("k", BUCKET, 1)]


def test_old_buckets_of_every_key_are_deleted_on_write(store: Store) -> None:
    with store.write() as tx:
        tx.record_login_failures(["old", "kept"], BUCKET, expired=0)
        tx.record_login_failures(["kept"], BUCKET + 60, expired=0)
    with store.write() as tx:
        tx.record_login_failures(["new"], BUCKET + 70, expired=BUCKET + 10)
    assert counts(store, ["old", "kept", "new"]) == [
        ("kept", BUCKET + 60, 1),
        ("new", BUCKET + 70, 1),
    ]


def test_concurrent_failures_are_all_counted(store: Store) -> None:
    errors: list[BaseException] = []

    def count() -> None:
        try:
            for _ in range(10):
                with store.write() as tx:
                    tx.record_login_failures(["shared", "both"], BUCKET, expired=BUCKET)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert counts(store, ["shared", "both"]) == [("both", BUCKET, 40), ("shared", BUCKET, 40)]
