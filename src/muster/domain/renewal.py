"""Runner certificate renewal: a runner, over mTLS, trades a CSR for its new key for a new
certificate. Limited per runner and audited, since each renewal signs and writes."""

from __future__ import annotations

from muster.domain import audit, pki
from muster.domain.platform import Platform
from muster.domain.runners import JoinResult
from muster.domain.users import Principal
from muster.errors import RateLimitedError


def renew_certificate(
    platform: Platform, runner: Principal, csr_pem: str, *, source: str
) -> JoinResult:
    """A new certificate for the calling runner's new key; the previous one stays valid until
    the next renewal, so a lost answer does not lock the host out. Audited
    (runner.certificate_renewed).

    Raises RateLimitedError (runners.too_many_renewals) past `platform.renewals`' allowance
    for this runner (every attempt counts: each costs a CSR check), InvalidInputError for a bad
    CSR, NotFoundError if the runner is gone.
    """
    now_s = platform.clock.monotonic()
    wait = platform.renewals.retry_after_s(runner.name, now_s=now_s)
    if wait:
        raise RateLimitedError(
            f"runner {runner.name} renewed its certificate too often; try again later",
            retry_after_s=wait,
            code="runners.too_many_renewals",
        )
    platform.renewals.record(runner.name, now_s=now_s)
    public_key = pki.load_csr_public_key(csr_pem)
    now = platform.clock.now()
    with platform.store.write() as tx:
        record = tx.get_runner(runner.name)
        cert = pki.issue_client_certificate(platform.ca, public_key, runner_id=runner.name, now=now)
        serial = pki.serial_hex(cert)
        tx.update_runner(
            runner.name,
            cert_serial=serial,
            previous_cert_serial=record.cert_serial,
            cert_expires_at=cert.not_valid_after_utc,
        )
        audit.record(
            tx,
            platform.clock,
            audit.RUNNER_CERTIFICATE_RENEWED,
            actor=runner.name,
            source=source,
            runner_id=runner.name,
            serial=serial,
            previous_serial=record.cert_serial,
        )
        updated = tx.get_runner(runner.name)
    return JoinResult(
        runner=updated,
        certificate_pem=pki.certificate_to_pem(cert),
        ca_pem=platform.ca_bundle_pem,
        heartbeat_interval_s=platform.liveness.interval_s,
    )
