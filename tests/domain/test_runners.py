"""Joins refused too often with one token. (The coordinator directory agents learn from join
and heartbeat replies: tests/domain/test_identities.py.)"""

from __future__ import annotations

import pytest

from muster.clock import FakeClock
from muster.domain import enrollment, pki
from muster.domain.platform import Platform
from muster.domain.runners import JoinRequest, join_host
from muster.domain.users import Principal
from muster.errors import RateLimitedError, TokenRefusedError

ADMIN = Principal(name="admin", role="admin", method="basic")


def token(platform: Platform) -> str:
    _record, text = enrollment.create_token(
        platform, ADMIN, source="198.51.100.1", roles=["allocator"], persistent=True
    )
    return text


def join(platform: Platform, token: str, runner_id: str, source: str, **kw: object) -> None:
    request = JoinRequest(
        token=token,
        csr_pem=pki.build_csr(pki.generate_private_key(), runner_id),
        runner_id=runner_id,
        host_ip="10.0.0.2",
        capacity_mb=2048,
        **kw,  # type: ignore[arg-type]
    )
    join_host(platform, request, source=source)


def test_a_token_failing_from_many_addresses_is_refused_for_a_while(
    platform: Platform, clock: FakeClock
) -> None:
    probed, other = token(platform), token(platform)
    limit = platform.token_join_failures.max_failures
    for n in range(limit):  # each address fails once: no per-address limit is reached
        with pytest.raises(TokenRefusedError):
            join(platform, probed, f"host-{n}", f"10.1.{n // 250}.{n % 250}", roles=("proxy",))
    with pytest.raises(RateLimitedError) as info:
        join(platform, probed, "good-host", "10.9.9.9")
    assert "this roles token" in info.value.message
    assert info.value.retry_after_s > 0
    join(platform, other, "other-host", "10.9.9.9")  # another token is not held back
    clock.advance(platform.token_join_failures.window_s + 1)
    join(platform, probed, "good-host", "10.9.9.9")


def test_forged_signatures_do_not_count_against_the_token_they_name(platform: Platform) -> None:
    """Only a token whose signature held counts: a stranger who knows a token's id cannot lock
    that token out by sending forgeries naming it."""
    real = token(platform)
    header, claims, signature = real.split(".")
    forged = f"{header}.{claims}.{signature[:-4]}AAAA"
    for n in range(platform.token_join_failures.max_failures + 5):
        with pytest.raises(TokenRefusedError):
            join(platform, forged, f"host-{n}", f"10.2.{n // 250}.{n % 250}")
    join(platform, real, "good-host", "10.9.9.9")


def test_refusals_that_restate_the_tokens_state_do_not_count(platform: Platform) -> None:
    """Hosts racing for a token's last use hear 'exhausted', never 'try later'."""
    _record, once = enrollment.create_token(
        platform, ADMIN, source="198.51.100.1", roles=["allocator"], persistent=True, max_uses=1
    )
    join(platform, once, "first", "10.9.9.1")
    for n in range(platform.token_join_failures.max_failures + 5):
        with pytest.raises(TokenRefusedError) as info:
            join(platform, once, f"late-{n}", f"10.3.{n // 250}.{n % 250}")
        assert info.value.reason == "exhausted_token"
