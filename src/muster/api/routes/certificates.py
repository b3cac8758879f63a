"""ECE's TLS certificate API: GET and POST /platform/configuration/security/tls/{service_name}
for the proxies' chain (`proxy`) and the Cloud UI and API's (`ui`); admins write, users read.

ECE's POST body is a string: the PEM private key, then the server certificate, then its CA
certificates. It is taken as a JSON string (the spec's `application/json`) or as the PEM text
itself (`curl --data-binary @chain.pem`, whatever the Content-Type).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from muster.api.auth import platform_of, require_admin, require_user, source_of
from muster.api.routes import errors
from muster.api.schemas import Reply
from muster.api.tls import ServerTLS
from muster.domain import proxy_tls, tls_chains
from muster.domain.platform import utc_iso
from muster.domain.users import Principal
from muster.errors import InvalidInputError

router = APIRouter(tags=["PlatformConfigurationSecurity"])
PATH = "/platform/configuration/security/tls/{service_name}"

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "New certificate chain: the PEM encoded private key (RSA or ECDSA), "
        "followed by the server certificate, followed by the CA certificates",
        "content": {
            "application/json": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


class ChainStatus(Reply):
    expiration_date: str
    first_certificate_to_expire: str


class TlsPublicCertChain(Reply):
    user_supplied: bool
    chain: list[str]
    chain_status: ChainStatus
    api_managed: bool = Field(description="Whether this chain can be set through this API")


class UpdatedTlsChain(Reply):
    service: str


def _served(request: Request) -> list[Any]:
    """This coordinator's own certificate and the CA that issued it (what it serves when no ui
    chain is installed); nothing for an app made in-process without certificate files."""
    tls = getattr(request.app.state, "server_tls", None)
    if not isinstance(tls, ServerTLS):
        return []
    platform = platform_of(request)
    return [tls.certificate(), platform.ca.certificate]


def _reply(chain: tls_chains.TlsChain) -> TlsPublicCertChain:
    first = chain.first_to_expire
    return TlsPublicCertChain(
        user_supplied=chain.user_supplied,
        chain=chain.pems,
        chain_status=ChainStatus(
            expiration_date=utc_iso(first.not_valid_after_utc) or "",
            first_certificate_to_expire=first.subject.rfc4514_string(),
        ),
        api_managed=chain.service in tls_chains.INSTALLABLE,
    )


@router.get(
    PATH,
    operation_id="get-tls-certificate",
    response_model=TlsPublicCertChain,
    responses=errors(400, 401, 404),
)
def get_tls_certificate(
    service_name: str, request: Request, _principal: Principal = Depends(require_user)
) -> TlsPublicCertChain:
    """The chain in use for the service, without its key, and whether an admin supplied it:
    `proxy` (the platform's wildcard unless an admin's is installed), `ui` (the installed chain,
    else this coordinator's own certificate and the platform CA), `internalca` (the platform's
    CAs)."""
    chain = proxy_tls.public_chain(platform_of(request), service_name, served=_served(request))
    return _reply(chain)


@router.post(
    PATH,
    operation_id="set-tls-certificate",
    status_code=202,
    response_model=UpdatedTlsChain,
    responses=errors(400, 401, 403, 404),
    openapi_extra=_BODY_DOC,
)
async def set_tls_certificate(
    service_name: str, request: Request, principal: Principal = Depends(require_admin)
) -> UpdatedTlsChain:
    """Install the admin's chain for `proxy` or `ui`: validated (key, chain up to its root,
    dates, and for `proxy` the deployment domain's wildcard), then the proxies fetch it and
    every coordinator serves it (`ui`) without a restart. An installed proxy chain is never
    renewed by the platform."""
    service = tls_chains.service_of(service_name)
    text = _chain_text(await request.body())
    chain = await run_in_threadpool(
        proxy_tls.install_chain,
        platform_of(request),
        principal,
        service,
        text,
        source=source_of(request),
    )
    tls = getattr(request.app.state, "server_tls", None)
    if service == tls_chains.UI and isinstance(tls, ServerTLS):
        # Served by this process at once; the others take it up within a reload.
        tls.use_ui_chain(chain)
        await run_in_threadpool(tls.reload)
    return UpdatedTlsChain(service=service)


def _chain_text(body: bytes) -> str:
    """The PEM text of ECE's body: a JSON string, or the PEM itself. Raises InvalidInputError."""
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            "chain: not text; send the PEM key and certificates", code="tls.malformed_chain"
        ) from exc
    if text.lstrip().startswith('"'):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidInputError(
                "chain: malformed JSON string; send the PEM as one JSON string or as text",
                code="tls.malformed_chain",
            ) from exc
        if isinstance(value, str):
            return value
    if "-----BEGIN" not in text:
        raise InvalidInputError(
            "chain: send the PEM private key, the server certificate and its CA certificates, "
            "as one JSON string or as the PEM text",
            code="tls.malformed_chain",
            fields=["chain"],
        )
    return text
