"""Domain values shared by the modules of the request path. Frozen, typed, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A caller whose subject token has been verified."""

    issuer_name: str  # issuers[].name from the configuration
    issuer: str  # the token's `iss`
    kind: str  # "kubernetes" | "oidc"
    subject: str  # the token's `sub`
    namespace: str | None = None
    service_account: str | None = None
    service_account_uid: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    node: str | None = None
    jti: str | None = None
    issued_at: float | None = None
    expires_at: float | None = None
    legacy: bool = False

    @property
    def principal(self) -> str:
        """``ISSUER/NAMESPACE/SERVICE_ACCOUNT`` (kubernetes) or ``ISSUER/SUBJECT`` (oidc)."""
        if self.kind == "kubernetes" and self.namespace and self.service_account:
            return f"{self.issuer_name}/{self.namespace}/{self.service_account}"
        return f"{self.issuer_name}/{self.subject}"


@dataclass(frozen=True, slots=True)
class SubjectMatcher:
    """One ``subjects[]`` entry: kubernetes (namespace + service_account) or oidc (subject)."""

    issuer: str
    namespace: str | None = None
    service_account: str | None = None
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    service_account: str
    scopes: tuple[str, ...]
    lifetime_s: int
    subjects: tuple[SubjectMatcher, ...]
    delegates: tuple[str, ...] = ()
    description: str = ""

    def mint_request(self) -> MintRequest:
        """What is asked of IAM for this role: the exchange, the cache's keys and the
        refresher all take it from here, so they cannot disagree."""
        return MintRequest(
            service_account=self.service_account,
            scopes=self.scopes,
            lifetime_s=self.lifetime_s,
            delegates=self.delegates,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer. ``role`` is set exactly when ``allowed``."""

    allowed: bool
    role: Role | None
    reason: str  # stable code: "allowed", "no_role", "ambiguous_role", "role_not_admitted", ...
    reasons: tuple[str, ...] = ()  # human sentences, every step that led here


@dataclass(frozen=True, slots=True)
class MintRequest:
    """What is asked of IAM: also the identity of a cache entry."""

    service_account: str
    scopes: tuple[str, ...]
    lifetime_s: int
    delegates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str = field(repr=False)
    expires_at: float  # unix seconds
