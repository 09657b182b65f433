"""Admin and auditor authentication (DESIGN.md §4).

Admin and audit calls carry ``Authorization: Bearer <JWT>``, verified like a subject token but
for ``access.audience`` only, so a token minted for the exchange audience is not an admin
credential. The caller, written ``ISSUER/NAMESPACE/SERVICE_ACCOUNT`` (oidc: ``ISSUER/SUBJECT``)
with the issuer's configured name, must be listed for the operation: 401 without a valid token,
403 when not listed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from broker.errors import Forbidden, InvalidSubjectToken, Unauthorized
from broker.identity import Verifier
from broker.model import WorkloadIdentity
from broker.settings import AccessSettings


class Permission(Enum):
    ADMIN = "admin"
    AUDITOR = "auditor"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated admin or auditor."""

    identity: WorkloadIdentity
    permissions: frozenset[Permission]

    @property
    def principal(self) -> str:
        return self.identity.principal


class AccessControl:
    """Authenticates bearer tokens for ``access.audience`` and checks the access lists."""

    def __init__(self, verifier: Verifier, settings: AccessSettings) -> None:
        self._verifier = verifier
        self._audience = (settings.audience,)
        self._lists = {
            Permission.ADMIN: frozenset(settings.admins),
            Permission.AUDITOR: frozenset(settings.auditors),
        }

    def authenticate(self, authorization: str | None) -> Caller:
        """Verify the bearer token; raise :class:`Unauthorized` when absent or invalid."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "this endpoint needs Authorization: Bearer <JWT> for the admin audience",
                reason="missing_bearer",
            )
        try:
            identity = self._verifier.verify(token.strip(), audiences=self._audience)
        except InvalidSubjectToken as exc:
            raise Unauthorized(
                f"bearer token refused: {exc.description}", reason=exc.reason
            ) from exc
        principal = identity.principal
        perms = frozenset(p for p, names in self._lists.items() if principal in names)
        return Caller(identity=identity, permissions=perms)

    def require(self, authorization: str | None, allowed: Collection[Permission]) -> Caller:
        """Authenticate and demand one of ``allowed``; raise 401 / 403 accordingly."""
        caller = self.authenticate(authorization)
        if not caller.permissions & frozenset(allowed):
            need = " or ".join(sorted(f"access.{p.value}s" for p in allowed))
            raise Forbidden(f"{caller.principal} is not listed in {need}", reason="not_listed")
        return caller
