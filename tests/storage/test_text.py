"""The store contract for text no store can keep: NUL characters, in a column or inside a JSON
value, are refused the same way on SQLite and PostgreSQL (InvalidInputError, never a driver
error), and a refused write leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from muster.domain.models import HostReport, UserRecord
from muster.domain.store import Transaction
from muster.errors import InvalidInputError
from muster.storage import Store
from tests.storage.test_contract import T0, allocator, runner, token

NUL = "a\x00b"


def user(name: str) -> UserRecord:
    return UserRecord(name, "$argon2id$hash", ("ece_platform_viewer",), T0)


def _update_metadata(tx: Transaction, metadata: dict[str, str]) -> None:
    tx.create_allocator(allocator())
    tx.update_allocator("10.0.0.2", metadata=metadata)


WRITES: dict[str, Callable[[Transaction], Any]] = {
    "setting value": lambda tx: tx.put_setting("name", NUL),
    "setting name": lambda tx: tx.put_setting(NUL, "value"),
    "user name": lambda tx: tx.create_user(user(NUL)),
    "token description": lambda tx: tx.create_token(token(description=NUL)),
    "runner id": lambda tx: tx.create_runners([runner(NUL)]),
    "runner report check": lambda tx: tx.create_runners(
        [runner(report=HostReport(checks={NUL: True}))]
    ),
    "allocator metadata key": lambda tx: _update_metadata(tx, {NUL: "v"}),
    "allocator tag value": lambda tx: tx.create_allocators([allocator(tags={"t": NUL})]),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_text_with_nul_is_refused_alike_and_writes_nothing(store: Store, write: str) -> None:
    with pytest.raises(InvalidInputError), store.write() as tx:
        WRITES[write](tx)
    with store.read() as tx:
        assert tx.find_setting("name") is None
        assert tx.list_users() == []
        assert tx.list_tokens() == []
        assert tx.find_runner("10.0.0.2") is None
        assert tx.find_allocator("10.0.0.2") is None


def test_a_lookup_by_text_with_nul_is_refused_alike(store: Store) -> None:
    with store.write() as tx:
        tx.create_runners([runner()])
    with pytest.raises(InvalidInputError), store.read() as tx:
        tx.find_runner("10.0.0.2\x00")
    with pytest.raises(InvalidInputError), store.read() as tx:
        tx.find_allocator(NUL)


def test_a_user_name_with_nul_finds_no_user(store: Store) -> None:
    """Sign-ins look users up by the name typed: one with NUL is simply unknown, so the sign-in
    fails (and is counted) like any other."""
    with store.write() as tx:
        tx.create_user(user("admin"))
    with store.read() as tx:
        assert tx.find_user("admin\x00") is None
        assert tx.find_user("admin") is not None


def test_text_without_nul_is_kept_exactly(store: Store) -> None:
    odd = "\u00e9\u2028\x01\\u0000 \U0001f600"
    with store.write() as tx:
        tx.create_runners([replace(runner(), report=HostReport(checks={odd: True}))])
        tx.put_setting("name", odd)
    with store.read() as tx:
        assert tx.get_runner("10.0.0.2").report.checks == {odd: True}
        assert tx.find_setting("name") == odd
