"""The deployment domain (ECE's `deployment_domain_name`): the DNS name under which every
deployment is reached through the proxies, `<deployment id>.<domain>`; a platform setting,
changed by admins only, each change audited."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from muster.domain import audit
from muster.domain.platform import Platform
from muster.domain.store import Transaction
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError

# platform_settings name; the value is JSON {"value", "version", "created_at", "modified_at"}.
DEPLOYMENT_DOMAIN = "networking.deployment_domain_name"
DEFAULT_DOMAIN = "muster.localhost"
# The proxies' ports (ECE's: 9200 plain HTTP, 9243 HTTPS).
HTTP_PORT = 9200
HTTPS_PORT = 9243
PORTS = {"http": HTTP_PORT, "https": HTTPS_PORT}

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# A name is at most 253 characters; the endpoint puts a 32-character id and a dot before it.
MAX_DOMAIN_CHARS = 253 - 33


@dataclass(frozen=True)
class DeploymentDomain:
    """The domain and ECE's resource stamp of the setting (version 0, no dates: never set,
    the default holds)."""

    value: str
    version: int = 0
    created_at: datetime | None = None
    modified_at: datetime | None = None


def check_domain(value: str) -> str:
    """`value` as stored: lower case, without a trailing dot. Raises InvalidInputError (field
    `value`) for anything that is not a DNS host name a wildcard certificate can cover."""
    name = value.strip().lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > MAX_DOMAIN_CHARS or not all(_LABEL.match(x) for x in labels):
        raise InvalidInputError(
            f"value: {value[:100]!r} is not a host name; give DNS labels of letters, digits "
            f"and hyphens separated by dots (such as deployments.example.com), at most "
            f"{MAX_DOMAIN_CHARS} characters",
            code="networking.cname.invalid_value",
            fields=["value"],
        )
    return name


def read_domain(tx: Transaction) -> DeploymentDomain:
    """The setting in `tx` (the default when never set)."""
    stored = tx.find_setting(DEPLOYMENT_DOMAIN)
    if stored is None:
        return DeploymentDomain(DEFAULT_DOMAIN)
    data = json.loads(stored)
    return DeploymentDomain(
        value=str(data["value"]),
        version=int(data["version"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        modified_at=datetime.fromisoformat(data["modified_at"]),
    )


def get_deployment_domain(platform: Platform) -> DeploymentDomain:
    with platform.store.read() as tx:
        return read_domain(tx)


def set_deployment_domain(
    platform: Platform,
    principal: Principal,
    value: str,
    *,
    version: str | None = None,
    source: str,
) -> DeploymentDomain:
    """Set the domain (idempotent for the same value, audited every time). With `version`
    (ECE's optimistic lock): raises InvalidInputError (networking.cname.bad_version_format)
    if it is not a number, NotFoundError (networking.cname.not_found) if the setting was never
    set, ConflictError (networking.cname.version_conflict) if it is not the current one."""
    name = check_domain(value)
    expected: int | None = None
    if version is not None:
        if not version.isascii() or not version.isdigit() or len(version) > 18:
            raise InvalidInputError(
                f"version: {version[:40]!r} is not a version; send the number the GET's "
                "x-cloud-resource-version header gave",
                code="networking.cname.bad_version_format",
                fields=["version"],
            )
        expected = int(version)
    now = platform.clock.now()
    with platform.store.write() as tx:
        current = read_domain(tx)
        if expected is not None and current.version == 0:
            raise NotFoundError(
                "no deployment domain name was set yet; send the change without a version",
                code="networking.cname.not_found",
            )
        if expected is not None and expected != current.version:
            raise ConflictError(
                f"the deployment domain name is at version {current.version}, not {expected}; "
                "read it again and retry",
                code="networking.cname.version_conflict",
            )
        created_at = current.created_at or now
        updated = DeploymentDomain(name, current.version + 1, created_at, now)
        tx.put_setting(DEPLOYMENT_DOMAIN, _stored(name, updated.version, created_at, now))
        audit.record(
            tx,
            platform.clock,
            audit.DEPLOYMENT_DOMAIN_CHANGED,
            actor=principal.name,
            source=source,
            value=name,
            previous_value=current.value,
        )
    if name != current.value:
        # The proxies' certificate for the new domain now, not a second later from the
        # refresher's thread (imported here: proxy_tls reads the domain through this module).
        from muster.domain.proxy_tls import ensure_proxy_chain

        ensure_proxy_chain(platform)
    return updated


def endpoint(deployment_id: str, domain: str) -> str:
    """The name a deployment is reached by through the proxies."""
    return f"{deployment_id}.{domain}"


def _stored(value: str, version: int, created_at: datetime, modified_at: datetime) -> str:
    return json.dumps(
        {
            "value": value,
            "version": version,
            "created_at": created_at.isoformat(),
            "modified_at": modified_at.isoformat(),
        }
    )
