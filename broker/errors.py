"""One exception hierarchy for the broker.

Each class carries its RFC 6749 / RFC 8693 ``error`` code and HTTP status; the single error
handler in :mod:`broker.app` turns them into responses. ``reason`` is a short, stable machine
code (used in audit records and metrics); ``description`` is the human sentence sent to the
caller. Nothing here imports Flask.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    error: str = "server_error"
    status: int = 500
    default_reason: str = "internal_error"
    # Extra members of the error body (e.g. the list of problems of a refused role table).
    extra: dict[str, object] | None = None

    def __init__(
        self,
        description: str,
        *,
        reason: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.reason = reason or self.default_reason
        self.retry_after = retry_after


class InvalidRequest(BrokerError):
    """Malformed request (RFC 6749 §5.2 ``invalid_request``)."""

    error = "invalid_request"
    status = 400
    default_reason = "invalid_request"


class InvalidSubjectToken(InvalidRequest):
    """The subject token failed verification; ``reason`` names why (e.g. ``token_expired``)."""

    default_reason = "invalid_token"


class InvalidTarget(BrokerError):
    """No role admits the caller, or the named role does not (RFC 8693 ``invalid_target``)."""

    error = "invalid_target"
    status = 400
    default_reason = "no_role"


class InvalidScope(BrokerError):
    """The ``scope`` parameter is malformed."""

    error = "invalid_scope"
    status = 400
    default_reason = "invalid_scope"


class UnsupportedGrantType(BrokerError):
    error = "unsupported_grant_type"
    status = 400
    default_reason = "unsupported_grant_type"


class RequestTooLarge(BrokerError):
    error = "invalid_request"
    status = 413
    default_reason = "request_too_large"


class Unauthorized(BrokerError):
    """Admin/audit call without a valid bearer token."""

    error = "invalid_token"
    status = 401
    default_reason = "unauthenticated"


class Forbidden(BrokerError):
    """Authenticated, but not listed for this operation."""

    error = "access_denied"
    status = 403
    default_reason = "forbidden"


class NotFound(BrokerError):
    error = "not_found"
    status = 404
    default_reason = "not_found"


class Conflict(BrokerError):
    """The request contradicts the resource's state (e.g. a write in read-only role mode)."""

    error = "conflict"
    status = 409
    default_reason = "conflict"


class PreconditionFailed(BrokerError):
    """``If-Match`` / ``If-None-Match`` did not hold: someone else changed it first."""

    error = "precondition_failed"
    status = 412
    default_reason = "precondition_failed"


class PreconditionRequired(BrokerError):
    """A write that must be conditional came without ``If-Match`` (RFC 6585 §3)."""

    error = "precondition_required"
    status = 428
    default_reason = "precondition_required"


class RateLimited(BrokerError):
    error = "slow_down"
    status = 429
    default_reason = "rate_limited"


class TemporarilyUnavailable(BrokerError):
    """A dependency (IAM, Redis) failed; the caller should retry after ``retry_after``."""

    error = "temporarily_unavailable"
    status = 503
    default_reason = "unavailable"


class UpstreamRefused(BrokerError):
    """IAM refused permanently (e.g. permission denied): an operator must act, retry won't help."""

    error = "server_error"
    status = 502
    default_reason = "iam_refused"


class StoreUnavailable(TemporarilyUnavailable):
    """Redis could not be reached or refused the write."""

    default_reason = "store_unavailable"


class ConfigError(Exception):
    """Configuration (broker.yaml, roles.yaml) is invalid. ``problems`` lists each with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid configuration\n{lines}")
