"""Session families under concurrent `_refresh`, on SQLite and PostgreSQL: ten threads over two
coordinators (each with its own engine, as two processes would have) refreshing one session must
leave one line of tokens, never a fork, and a logout must end every token of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from muster.domain import sessions
from muster.domain.platform import Platform, load_platform
from muster.domain.users import hash_secret
from muster.errors import UnauthenticatedError
from muster.storage import open_store
from tests.conftest import Installed
from tests.storage._joining import race

THREADS = 10


@pytest.fixture
def coordinators(installed: Installed, store_url: str) -> Iterator[tuple[Platform, Platform]]:
    second = open_store(store_url)
    try:
        yield installed.platform, load_platform(second, installed.clock)
    finally:
        second.close()


def family_of(platform: Platform, token: str) -> list[tuple[int, str]]:
    """(generation, token hash) of every session in `token`'s family."""
    with platform.store.read() as tx:
        session = tx.find_session(hash_secret(token))
        assert session is not None
        return [(s.generation, s.token_hash) for s in tx.list_sessions(family_id=session.family_id)]


def test_parallel_refreshes_of_one_token_all_get_its_one_successor(
    installed: Installed, coordinators: tuple[Platform, Platform]
) -> None:
    login = sessions.log_in(installed.platform, *installed.admin, source="10.0.0.1")
    calls = [
        partial(sessions.refresh_session, coordinators[i % 2], login.token, source="10.0.0.1")
        for i in range(THREADS)
    ]
    results = race(calls)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.token for r in results}) == 1
    successor = results[0].token
    assert family_of(installed.platform, login.token) == sorted(
        [(0, hash_secret(login.token)), (1, hash_secret(successor))]
    )
    with installed.platform.store.read() as tx:
        session = tx.find_session(hash_secret(successor))
        assert session is not None
        assert tx.find_session_generation(session.family_id) == 1


def refresh_chain(platform: Platform, token: str, times: int) -> list[str]:
    tokens = []
    for _ in range(times):
        token = sessions.refresh_session(platform, token, source="10.0.0.1").token
        tokens.append(token)
    return tokens


def test_parallel_refresh_chains_stay_one_line_and_logout_ends_every_token(
    installed: Installed, coordinators: tuple[Platform, Platform]
) -> None:
    login = sessions.log_in(installed.platform, *installed.admin, source="10.0.0.1")
    calls = [partial(refresh_chain, coordinators[i % 2], login.token, 3) for i in range(THREADS)]
    results = race(calls)
    assert not [r for r in results if isinstance(r, Exception)], results
    # Every thread walked the same line: one token per generation, one newest.
    assert len({tuple(chain) for chain in results}) == 1
    family = family_of(installed.platform, login.token)
    assert [generation for generation, _ in family] == [0, 1, 2, 3]
    everyone = [login.token, *results[0]]
    for token in everyone:
        assert sessions.principal_from_session(installed.platform, token, source="10.0.0.1")

    # Logouts racing with refreshes of the newest token: the family ends whole, and no
    # refresh that lost the race leaves a live token behind.
    newest = results[0][-1]
    racers: list[Callable[[], Any]] = [
        partial(sessions.log_out, coordinators[0], login.token, source="10.0.0.1"),
        *[
            partial(sessions.refresh_session, coordinators[i % 2], newest, source="10.0.0.1")
            for i in range(THREADS - 1)
        ],
    ]
    outcome = race(racers)
    assert outcome[0] is True
    issued = [r.token for r in outcome[1:] if not isinstance(r, Exception)]
    refused = [r for r in outcome[1:] if isinstance(r, Exception)]
    assert all(isinstance(r, UnauthenticatedError) for r in refused)
    with installed.platform.store.read() as tx:
        assert [tx.find_session(hash_secret(t)) for t in [*everyone, *issued]] == [None] * (
            len(everyone) + len(issued)
        )
        assert tx.list_sessions(username="admin") == []
    with pytest.raises(UnauthenticatedError):
        sessions.principal_from_session(installed.platform, newest, source="10.0.0.2")
