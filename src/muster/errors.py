"""The one exception tree of Muster, and the `muster` command's exit code for each error.

    MusterError                      500  (code, message; never a secret in either)
     +-- InvalidInputError           400  bad request body, query, flag, variable or host.json key
     +-- UnauthenticatedError        401  no or wrong credentials
     |    +-- HostRemovedError       401  (agent side) this host's runner was deleted
     +-- ForbiddenError              403  authenticated, not allowed
     |    +-- TokenRefusedError      403  a roles token that may not join (status by `reason`)
     +-- NotFoundError               404  no such token, allocator, runner, key
     +-- ConflictError               409  already exists / in the wrong state
     |    +-- AlreadyInstalledError  409  the storage path holds an installation
     |    +-- RunnerIdTakenError     409  another runner has this id
     |    +-- PortInUseError         409  (host side) something listens on the API port
     |    +-- AlreadyRunningError    409  (host side) a process runs this storage path
     +-- PayloadTooLargeError        413
     +-- RateLimitedError            429  too many failures from one address
     +-- StoreError                  503  the store cannot be reached or written
     +-- CoordinatorUnreachableError 503  (client side) no coordinator answered
     +-- CAMismatchError             495  (client side) coordinator's CA is not the pinned one
     +-- UntrustedCertificateError   495  (client side) coordinator's certificate is not trusted
          +-- CertificateNameError   495  (client side) ... names not the address dialled

Each class carries its HTTP status (a TokenRefusedError's depends on its reason: TOKEN_REFUSALS);
`muster.api.app` renders any of them, `muster.client` maps statuses and codes back to the same
classes, and EXIT_CODES below gives the `muster` command's exit code for each.
"""

from __future__ import annotations


class MusterError(Exception):
    """Base of every Muster error. `code` is ECE's structured error code."""

    code = "root.unexpected_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, fields: list[str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fields = fields or []

    def __str__(self) -> str:
        return self.message


class InvalidInputError(MusterError):
    code = "root.invalid_input"
    status = 400


class UnauthenticatedError(MusterError):
    code = "root.unauthenticated"
    status = 401


class HostRemovedError(UnauthenticatedError):
    """The coordinator no longer knows this host's runner (it was deleted): the agent stops."""

    code = "runners.certificate_revoked"


class ForbiddenError(MusterError):
    code = "root.unauthorized.rbac"
    status = 403


class TokenRefusedError(ForbiddenError):
    """A roles token that may not be used to join. `reason` is one of TOKEN_REFUSALS."""

    def __init__(self, reason: str, message: str, *, token_id: str | None = None):
        super().__init__(message, code=f"enrollment_tokens.{reason}")
        self.reason = reason
        self.token_id = token_id


class NotFoundError(MusterError):
    code = "root.resource_not_found"
    status = 404


class ConflictError(MusterError):
    code = "root.conflict"
    status = 409


class AlreadyInstalledError(ConflictError):
    """`muster install` on a storage path that already holds an installation."""

    code = "install.already_installed"


class RunnerIdTakenError(ConflictError):
    """A join (or a runner's creation) with a runner id another runner has."""

    code = "runners.runner_id_taken"


class PortInUseError(ConflictError):
    """`muster install` or `muster start` on an API port something else listens on."""

    code = "server.port_in_use"


class AlreadyRunningError(ConflictError):
    """`muster start` on a storage path that a running process holds."""

    code = "server.already_running"


class PayloadTooLargeError(MusterError):
    code = "root.payload_too_large"
    status = 413


class RateLimitedError(MusterError):
    code = "root.rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class StoreError(MusterError):
    code = "root.store_unavailable"
    status = 503


class CoordinatorUnreachableError(MusterError):
    code = "client.coordinator_unreachable"
    status = 503


class CAMismatchError(MusterError):
    code = "client.ca_mismatch"
    status = 495


class UntrustedCertificateError(MusterError):
    code = "client.untrusted_certificate"
    status = 495


class CertificateNameError(UntrustedCertificateError):
    """The coordinator's certificate is the platform's, but does not name the address the host
    dialled (e.g. a first host installed with --host-ip 127.0.0.1, joined from elsewhere)."""

    code = "client.certificate_name_mismatch"


# Exit codes of the `muster` command. Scripts depend on them: a code never changes meaning, and
# README.md documents every one (tests/test_errors.py checks both).
EXIT_ERROR = 1  # any other failure
EXIT_USAGE = 2  # a bad flag, environment variable or host.json value

# The one table: error class, or a TokenRefusedError's reason, -> exit code. An error not listed
# takes the code of its nearest listed base class, else EXIT_ERROR.
EXIT_CODES: dict[type[MusterError] | str, int] = {
    InvalidInputError: EXIT_USAGE,
    AlreadyInstalledError: 3,
    UnauthenticatedError: 4,
    ForbiddenError: 5,
    NotFoundError: 6,
    RateLimitedError: 7,
    PortInUseError: 8,
    AlreadyRunningError: 9,
    "malformed_token": 10,
    "invalid_signature": 11,
    "unknown_token": 12,
    "revoked_token": 13,
    "expired_token": 14,
    "exhausted_token": 15,
    "roles_not_granted": 16,
    CAMismatchError: 20,
    CoordinatorUnreachableError: 21,
    RunnerIdTakenError: 22,
    CertificateNameError: 23,
    HostRemovedError: 24,
}

# A refused roles token: reason -> (HTTP status, exit code).
TOKEN_REFUSALS: dict[str, tuple[int, int]] = {
    reason: (status, EXIT_CODES[reason])
    for reason, status in {
        "malformed_token": 400,
        "invalid_signature": 401,
        "unknown_token": 401,
        "revoked_token": 401,
        "expired_token": 401,
        "exhausted_token": 403,
        "roles_not_granted": 403,
    }.items()
}


def exit_code_of(exc: MusterError) -> int:
    """The `muster` command's exit code for `exc` (EXIT_CODES)."""
    if isinstance(exc, TokenRefusedError) and exc.reason in EXIT_CODES:
        return EXIT_CODES[exc.reason]
    listed = [cls for cls in EXIT_CODES if isinstance(cls, type) and isinstance(exc, cls)]
    if not listed:
        return EXIT_ERROR
    return EXIT_CODES[max(listed, key=lambda cls: len(cls.__mro__))]
