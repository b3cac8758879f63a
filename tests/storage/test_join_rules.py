"""Join rules that depend on the store, run on each backend: who may take the coordinator role
and be advertised to agents, retries of a join whose answer was lost, and certificate renewals
(limited per runner, audited)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from muster.clock import FakeClock
from muster.domain import audit, enrollment, pki, renewal
from muster.domain.identities import CoordinatorDirectory
from muster.domain.platform import Platform, create_platform, load_platform
from muster.domain.runners import JoinRequest, join_host
from muster.domain.users import Principal
from muster.errors import (
    ConflictError,
    InvalidInputError,
    RateLimitedError,
    TokenRefusedError,
)
from muster.storage import Store

ADMIN = Principal(name="admin", role="admin", method="basic")


@pytest.fixture
def platform(store: Store) -> Platform:
    clock = FakeClock()
    create_platform(store, clock)
    return load_platform(store, clock)


def _token(platform: Platform, roles: tuple[str, ...] = ("allocator",), **limits: Any) -> str:
    _record, token = enrollment.create_token(
        platform, ADMIN, source="test", roles=list(roles), persistent=True, **limits
    )
    return token


def _request(token: str, runner_id: str = "host-1", **extra: Any) -> JoinRequest:
    return JoinRequest(
        token=token,
        csr_pem=pki.build_csr(pki.generate_private_key(), runner_id),
        runner_id=runner_id,
        host_ip="10.1.0.2",
        **extra,
    )


def _is_sqlite(platform: Platform) -> bool:
    return platform.store.url.startswith("sqlite")


def _addresses(platform: Platform) -> list[str]:
    with platform.store.read() as tx:
        return tx.list_api_addresses()


def _kinds(platform: Platform) -> list[str]:
    with platform.store.read() as tx:
        events, _total = tx.list_audit(limit=1000)
    return [e.kind for e in events]


def _uses(platform: Platform) -> list[int]:
    with platform.store.read() as tx:
        return sorted(t.uses for t in tx.list_tokens() if t.created_by == "admin")


# -- the coordinator role ---------------------------------------------------------------------
def test_a_coordinator_join_without_a_server_csr_is_never_advertised(platform: Platform) -> None:
    token = _token(platform, ("coordinator", "allocator"))
    request = _request(token, roles=("coordinator",), api_port=9999)
    if _is_sqlite(platform):
        with pytest.raises(InvalidInputError) as refused:
            join_host(platform, request, source="10.1.0.2")
        assert refused.value.code == "runners.coordinator_needs_shared_store"
        with platform.store.read() as tx:
            assert tx.list_runners() == []
    else:
        joined = join_host(platform, request, source="10.1.0.2")
        assert joined.runner.api_address is None
        assert joined.server_certificate_pem is None
    assert _addresses(platform) == []


def test_only_a_host_with_a_server_certificate_is_advertised(platform: Platform) -> None:
    token = _token(platform, ("coordinator",))
    server_key = pki.generate_private_key()
    request = _request(
        token,
        roles=("coordinator",),
        api_port=12443,
        server_csr_pem=pki.build_csr(server_key, "10.1.0.2"),
    )
    if _is_sqlite(platform):
        with pytest.raises(InvalidInputError) as refused:
            join_host(platform, request, source="10.1.0.2")
        assert refused.value.code == "runners.coordinator_needs_shared_store"
        assert _addresses(platform) == []
        return
    joined = join_host(platform, request, source="10.1.0.2")
    assert joined.server_certificate_pem is not None
    assert _addresses(platform) == ["10.1.0.2:12443"]


def test_the_first_hosts_own_join_takes_the_coordinator_role_on_any_store(
    platform: Platform,
) -> None:
    token = _token(platform, ("coordinator", "allocator"))
    request = _request(token, roles=("coordinator", "allocator"), api_port=12443, first_host=True)
    joined = join_host(platform, request, source="install")
    assert joined.runner.roles == ("coordinator", "allocator")
    assert _addresses(platform) == ["10.1.0.2:12443"]


def test_an_address_recorded_before_joins_were_checked_is_not_advertised_on_sqlite(
    platform: Platform,
) -> None:
    token = _token(platform, ("allocator",))
    joined = join_host(platform, _request(token, "old-host"), source="10.1.0.2")
    with platform.store.write() as tx:  # as a join before this check could leave it
        tx.update_runner("old-host", api_address="203.0.113.9:9999")
    directory = CoordinatorDirectory(platform, ["10.0.0.1:12443"])
    directory.refresh()
    expected = ["10.0.0.1:12443"]
    if not _is_sqlite(platform):  # a shared store: every coordinator recorded is listed
        expected.append("203.0.113.9:9999")
    assert list(directory.addresses()) == expected
    assert joined.runner.api_address is None


# -- retries of a join whose answer was lost --------------------------------------------------
@pytest.mark.parametrize("max_uses", [None, 1], ids=["unlimited", "one-use"])
def test_a_retried_join_gets_the_same_answer_and_uses_the_token_once(
    platform: Platform, max_uses: int | None
) -> None:
    token = _token(platform, max_uses=max_uses)
    request = _request(token)
    first = join_host(platform, request, source="10.1.0.2")
    platform.clock.advance(30)  # type: ignore[attr-defined]
    again = join_host(platform, request, source="10.1.0.2")
    assert again.runner == first.runner
    assert again.certificate_pem == first.certificate_pem or (
        pki.load_certificate(again.certificate_pem).tbs_certificate_bytes
        == pki.load_certificate(first.certificate_pem).tbs_certificate_bytes
    )
    assert _uses(platform) == [1]
    assert _kinds(platform).count(audit.RUNNER_JOIN_RETRIED) == 1
    assert _kinds(platform).count(audit.RUNNER_JOINED) == 1


def test_a_join_with_another_key_for_a_taken_id_is_still_a_conflict(platform: Platform) -> None:
    token = _token(platform)
    join_host(platform, _request(token), source="10.1.0.2")
    with pytest.raises(ConflictError) as taken:
        join_host(platform, _request(token), source="10.1.0.2")  # a new key, so a new CSR
    assert taken.value.code == "runners.runner_id_taken"
    assert _uses(platform) == [1]
    assert audit.RUNNER_JOIN_RETRIED not in _kinds(platform)


def test_a_join_with_another_token_for_a_taken_id_is_still_a_conflict(platform: Platform) -> None:
    request = _request(_token(platform))
    join_host(platform, request, source="10.1.0.2")
    with pytest.raises(ConflictError):
        join_host(platform, replace(request, token=_token(platform)), source="10.1.0.2")


def test_a_retry_after_the_certificate_was_renewed_is_refused(platform: Platform) -> None:
    token = _token(platform, max_uses=1)
    request = _request(token)
    join_host(platform, request, source="10.1.0.2")
    runner = Principal(name="host-1", role="runner", method="certificate")
    renewal.renew_certificate(
        platform, runner, pki.build_csr(pki.generate_private_key(), "host-1"), source="10.1.0.2"
    )
    with pytest.raises(TokenRefusedError) as refused:
        join_host(platform, request, source="10.1.0.2")
    assert refused.value.reason == "exhausted_token"


def test_a_retry_with_a_revoked_token_is_refused(platform: Platform) -> None:
    record, token = enrollment.create_token(
        platform, ADMIN, source="test", roles=["allocator"], persistent=True
    )
    request = _request(token)
    join_host(platform, request, source="10.1.0.2")
    enrollment.revoke_token(platform, ADMIN, record.token_id, source="test")
    with pytest.raises(TokenRefusedError) as refused:
        join_host(platform, request, source="10.1.0.2")
    assert refused.value.reason == "revoked_token"


# -- renewals ---------------------------------------------------------------------------------
def test_renewals_are_limited_per_runner_and_each_is_audited(platform: Platform) -> None:
    token = _token(platform)
    join_host(platform, _request(token, "host-1"), source="10.1.0.2")
    join_host(platform, _request(token, "host-2"), source="10.1.0.3")
    one = Principal(name="host-1", role="runner", method="certificate")
    two = Principal(name="host-2", role="runner", method="certificate")

    def renew(runner: Principal) -> Any:
        csr = pki.build_csr(pki.generate_private_key(), runner.name)
        return renewal.renew_certificate(platform, runner, csr, source="10.1.0.2")

    allowed = platform.renewals.max_failures
    for _ in range(allowed):
        renew(one)
    with pytest.raises(RateLimitedError) as limited:
        renew(one)
    assert limited.value.code == "runners.too_many_renewals"
    assert limited.value.retry_after_s > 0
    renew(two)  # another runner is not affected
    assert _kinds(platform).count(audit.RUNNER_CERTIFICATE_RENEWED) == allowed + 1
    platform.clock.advance(platform.renewals.window_s)  # type: ignore[attr-defined]
    renew(one)
