"""The one exception tree of Muster; every error carries an ECE-style code.

    MusterError                      (code, message; never a secret in either)
     +-- InvalidInputError           400  bad request body, query or flag
     +-- UnauthenticatedError        401  no or wrong credentials
     +-- ForbiddenError              403  authenticated, not allowed
     |    +-- TokenRefusedError      403  a roles token that may not join (see `reason`)
     +-- NotFoundError               404  no such token, allocator, runner, key
     +-- ConflictError               409  already exists / in the wrong state
     +-- PayloadTooLargeError        413
     +-- RateLimitedError            429  too many failures from one address
     +-- StoreError                  503  the store cannot be reached or written
     +-- CoordinatorUnreachableError      (client side) no coordinator answered
     +-- CAMismatchError                  (client side) coordinator's CA is not the pinned one

The API maps class -> status in one table (`muster.api.app`); `muster.client` maps statuses back.
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


class ForbiddenError(MusterError):
    code = "root.unauthorized.rbac"
    status = 403


class TokenRefusedError(ForbiddenError):
    """A roles token that may not be used to join. `reason` is one of TOKEN_REFUSALS."""

    def __init__(self, reason: str, message: str, *, token_id: str | None = None):
        super().__init__(message, code=f"enrollment_tokens.{reason}")
        self.reason = reason
        self.token_id = token_id


# reason -> (HTTP status, CLI exit code). Exit codes are stable: scripts depend on them.
TOKEN_REFUSALS: dict[str, tuple[int, int]] = {
    "malformed_token": (400, 10),
    "invalid_signature": (401, 11),
    "unknown_token": (401, 12),
    "revoked_token": (401, 13),
    "expired_token": (401, 14),
    "exhausted_token": (403, 15),
    "roles_not_granted": (403, 16),
}


class NotFoundError(MusterError):
    code = "root.resource_not_found"
    status = 404


class ConflictError(MusterError):
    code = "root.conflict"
    status = 409


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
