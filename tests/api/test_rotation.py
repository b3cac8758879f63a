"""The rotation API in-process (admin only, ECE's error shape, region paths, audited), and the
server's reloading TLS context over real TLS handshakes: new connections get the new
certificate and trust without a restart, and a retired CA's client certificate is refused."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from muster.api.tls import ServerTLS
from muster.clock import SystemClock
from muster.domain import pki
from tests.conftest import Installed, create_token, join

ROTATION = "/api/v1/platform/configuration/security/rotation"


def test_readonly_reads_the_status_but_cannot_rotate(
    client: TestClient, installed: Installed
) -> None:
    status = client.get(ROTATION, auth=installed.readonly)
    assert status.status_code == 200
    assert status.json()["ca"]["fingerprint"] == installed.platform.ca_fingerprint
    for path in (
        "/signing-key/_rotate",
        "/signing-key/_retire-previous",
        "/ca/_rotate",
        "/ca/_retire-previous",
        "/server-certificate/_rotate",
    ):
        refused = client.post(ROTATION + path, auth=installed.readonly)
        assert refused.status_code == 403, path
        assert refused.headers["x-cloud-error-codes"] == "root.unauthorized.rbac"
    assert client.post(ROTATION + "/ca/_rotate").status_code == 401
    assert client.get(ROTATION, auth=installed.readonly).json() == status.json()


def test_a_signing_key_rotation_through_the_api(client: TestClient, installed: Installed) -> None:
    before = create_token(client, installed)["token"]
    rotated = client.post(
        "/api/v1/regions/ece-region/platform/configuration/security/rotation/signing-key/_rotate",
        auth=installed.admin,
    )
    assert rotated.status_code == 200, rotated.text
    assert len(rotated.json()["previous_signing_key_ids"]) == 1
    assert join(client, before, "10.0.0.5").status_code == 200
    retired = client.post(ROTATION + "/signing-key/_retire-previous", auth=installed.admin)
    assert retired.json()["previous_signing_key_ids"] == []
    refused = join(client, before, "10.0.0.6")
    assert refused.headers["x-cloud-error-codes"] == "enrollment_tokens.invalid_signature"
    again = client.post(ROTATION + "/signing-key/_retire-previous", auth=installed.admin)
    assert again.status_code == 409
    assert again.json()["errors"][0]["code"] == "security.nothing_to_retire"
    kinds = [
        e["kind"]
        for e in client.get("/api/v1/platform/audit", auth=installed.admin).json()["events"]
    ]
    assert {"signing_key.rotated", "signing_key.retired"} <= set(kinds)


def test_a_ca_rotation_through_the_api_names_both_cas_to_agents(
    client: TestClient, installed: Installed
) -> None:
    old = installed.platform.ca_fingerprint
    assert join(client, create_token(client, installed)["token"], "10.0.0.5").status_code == 200
    rotated = client.post(ROTATION + "/ca/_rotate", auth=installed.admin).json()
    new = rotated["ca"]["fingerprint"]
    assert rotated["previous_cas"][0]["fingerprint"] == old
    assert rotated["runners_on_previous_ca"] == ["10.0.0.5"]
    ca = client.get("/api/v1/agent/ca").json()
    assert ca["ca_fingerprint"] == new
    assert [pki.spki_fingerprint(pki.load_certificate(p)) for p in ca["ca_certificates"]] == [
        new,
        old,
    ]
    refused = client.post(ROTATION + "/ca/_retire-previous", auth=installed.admin)
    assert refused.status_code == 409
    assert refused.json()["errors"][0]["code"] == "security.ca_in_use"
    forced = client.post(ROTATION + "/ca/_retire-previous?force=true", auth=installed.admin)
    assert forced.status_code == 200
    assert forced.json()["previous_cas"] == []


def test_an_app_without_certificate_files_says_so(client: TestClient, installed: Installed) -> None:
    refused = client.post(ROTATION + "/server-certificate/_rotate", auth=installed.admin)
    assert refused.status_code == 409
    assert refused.json()["errors"][0]["code"] == "security.no_server_certificate"


# ---- the reloading server context over real TLS --------------------------------------------------


def _write_server(folder: Path, ca: pki.CertificateAuthority) -> tuple[Path, Path]:
    key = pki.generate_private_key()
    cert = pki.issue_server_certificate(
        ca,
        key.public_key(),
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        now=SystemClock().now(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.crt").write_text(pki.certificate_to_pem(cert))
    (folder / "server.key").write_text(pki.private_key_to_pem(key))
    return folder / "server.crt", folder / "server.key"


def _client_identity(folder: Path, ca: pki.CertificateAuthority, name: str) -> tuple[str, str]:
    key = pki.generate_private_key()
    cert = pki.issue_client_certificate(
        ca, key.public_key(), runner_id=name, now=SystemClock().now()
    )
    (folder / f"{name}.crt").write_text(pki.certificate_to_pem(cert))
    (folder / f"{name}.key").write_text(pki.private_key_to_pem(key))
    return str(folder / f"{name}.crt"), str(folder / f"{name}.key")


class Handshakes:
    """A TLS server on a thread that records, per connection, the client certificate's common
    name it verified (or the handshake's error)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _addr = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    der = conn.getpeercert(binary_form=True)
                    name = (
                        pki.certificate_common_name(
                            pki.load_certificate(ssl.DER_cert_to_PEM_cert(der))
                        )
                        if der
                        else "-"
                    )
                    self.seen.append(name)
                    conn.sendall(b"x")
            except (ssl.SSLError, OSError) as exc:
                self.seen.append(f"refused: {type(exc).__name__}")

    def connect(self, trust: list[pki.CertificateAuthority], identity: tuple[str, str]) -> str:
        """The server certificate's issuer fingerprint as this client verified it, or the
        error."""
        context = ssl.create_default_context(cadata="".join(c.certificate_pem() for c in trust))
        context.load_cert_chain(*identity)
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port)) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as conn,
            ):
                conn.recv(1)
                der = conn.getpeercert(binary_form=True)
                assert der is not None
                served = pki.load_certificate(ssl.DER_cert_to_PEM_cert(der))
                (issuer,) = [c for c in trust if pki.is_issued_by(served, c.certificate)]
                return issuer.fingerprint
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {type(exc).__name__}"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cas() -> tuple[pki.CertificateAuthority, pki.CertificateAuthority]:
    now = SystemClock().now()
    return pki.create_ca(now), pki.create_ca(now, "Muster platform CA 2")


@pytest.fixture
def served(
    tmp_path: Path, cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority]
) -> Iterator[tuple[ServerTLS, Handshakes, list[str]]]:
    old, _new = cas
    certfile, keyfile = _write_server(tmp_path / "coordinator", old)
    bundle = [old.certificate_pem()]
    tls = ServerTLS(certfile=certfile, keyfile=keyfile, ca_pem=lambda: "".join(bundle))
    server = Handshakes(tls.context)
    try:
        yield tls, server, bundle
    finally:
        server.close()


def test_new_connections_use_the_rotated_trust_and_certificate_without_a_restart(
    tmp_path: Path,
    cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority],
    served: tuple[ServerTLS, Handshakes, list[str]],
) -> None:
    tls, server, bundle = served
    old, new = cas
    on_old, on_new = (
        _client_identity(tmp_path, old, "on-old"),
        _client_identity(tmp_path, new, "on-new"),
    )

    assert server.connect([old], on_old) == old.fingerprint
    assert server.connect([old, new], on_new).startswith("refused")  # the new CA: not yet
    assert tls.reload() is False  # nothing changed

    bundle.append(new.certificate_pem())  # the CA rotated: both trusted
    assert tls.reload() is True
    assert server.connect([old, new], on_new) == old.fingerprint
    assert server.connect([old], on_old) == old.fingerprint

    key = pki.generate_private_key()
    cert = pki.issue_server_certificate(
        new,
        key.public_key(),
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        now=SystemClock().now(),
    )
    tls.install(pki.private_key_to_pem(key), pki.certificate_to_pem(cert))
    assert tls.certificate() == cert
    assert server.connect([old, new], on_new) == new.fingerprint  # the new server certificate
    assert server.connect([old], on_old).startswith("refused")  # a client trusting only the old

    bundle.remove(old.certificate_pem())  # the old CA retired
    assert tls.reload() is True
    assert server.connect([old, new], on_old).startswith("refused")
    assert server.connect([old, new], on_new) == new.fingerprint
    assert server.seen.count("on-new") == 3


def test_a_half_written_pair_keeps_the_context_in_use(
    served: tuple[ServerTLS, Handshakes, list[str]],
    cas: tuple[pki.CertificateAuthority, pki.CertificateAuthority],
    tmp_path: Path,
) -> None:
    tls, server, _bundle = served
    old, _new = cas
    tls.keyfile.write_text(pki.private_key_to_pem(pki.generate_private_key()))  # no cert yet
    assert tls.reload() is False
    assert server.connect([old], _client_identity(tmp_path, old, "c")) == old.fingerprint
