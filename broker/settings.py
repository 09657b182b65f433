"""Typed settings: ``config/broker.yaml`` plus environment overrides (DESIGN.md §3).

Validation is strict: unknown keys, keys of features that are not built, and unsafe values stop
the process with the file, the dotted path of the key and the reason (:class:`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

API_SERVER_AUDIENCES = (
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


MAX_DURATION_S = 36500 * 86400.0  # 100 years: beyond it, expiry times overflow Redis's


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"7d"`` (or a bare number of seconds) → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h or 7d")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds is None:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 15m, 1h, 7d)")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"{value!r} is not a duration: it must be between 0s and 36500d")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
MIN_AUDIT_RETENTION_S = 3600.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Model):
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @model_validator(mode="after")
    def _not_built(self) -> TLSSettings:
        if self.cert_file or self.key_file or self.client_ca_file:
            raise ValueError(
                "TLS termination in the broker is not built yet; terminate TLS in front of it "
                "(ingress, service mesh) and leave server.tls unset"
            )
        return self


class ServerSettings(_Model):
    bind: str = "127.0.0.1:8080"
    workers: int = Field(2, ge=1, le=64)
    threads: int = Field(8, ge=1, le=256)
    max_request_bytes: int = Field(65536, ge=1024, le=1 << 20)
    trusted_proxies: tuple[str, ...] = ()
    tls: TLSSettings = TLSSettings()

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        digits = port.isascii() and port.isdigit()  # isdigit alone admits "²"
        if not sep or not host or not digits or not 0 <= int(port) < 65536:
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR") from exc
        return v


class RedisSettings(_Model):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "tb:"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("redis", "rediss", "unix", "memory"):
            raise ValueError(f"{v!r}: scheme must be redis, rediss, unix or memory")
        return v


class TokenReviewSettings(_Model):
    enabled: bool = False
    api_server: str | None = None
    ca_file: str | None = None
    token_file: str | None = None

    @model_validator(mode="after")
    def _not_built(self) -> TokenReviewSettings:
        # Its other keys would be silently ignored, which a setting never is.
        if self.enabled or self.api_server or self.ca_file or self.token_file:
            raise ValueError(
                "TokenReview is not built yet; set enabled: false and leave the rest unset"
            )
        return self


class IssuerSettings(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    kind: Literal["kubernetes", "oidc"] = "kubernetes"
    issuer: str = Field(min_length=1)
    audiences: tuple[str, ...] = Field(min_length=1)
    allow_api_server_audience: bool = False
    jwks_file: str | None = None
    jwks_uri: str | None = None
    discovery: bool = False
    jwks_refresh: Annotated[Duration, Field(gt=0)] = 300.0
    jwks_max_stale: Annotated[Duration, Field(gt=0)] = 86400.0
    max_token_lifetime: Annotated[Duration, Field(gt=0)] = 7200.0
    allow_legacy_tokens: bool = False
    token_review: TokenReviewSettings = TokenReviewSettings()

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not a.strip() for a in v):
            raise ValueError("audiences must be non-empty strings")
        return v

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_uri(cls, v: str | None) -> str | None:
        problem = None if v is None else key_url_problem(v)
        if problem:
            raise ValueError(f"jwks_uri {problem}")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerSettings:
        sources = [s for s in (self.jwks_file, self.jwks_uri, self.discovery or None) if s]
        if len(sources) != 1:
            raise ValueError("exactly one of jwks_file, jwks_uri, discovery: true is required")
        problem = key_url_problem(self.issuer) if self.discovery else None
        if problem:
            raise ValueError(f"discovery: true fetches from the issuer, but issuer {problem}")
        if self.jwks_refresh < 1:
            raise ValueError("jwks_refresh must be at least 1s")
        if self.max_token_lifetime <= 0:
            raise ValueError("max_token_lifetime must be positive")
        return self


class GcpSettings(_Model):
    iam_endpoint: str = "https://iamcredentials.googleapis.com"
    credentials: str = "adc"
    allowed_service_accounts: tuple[str, ...] = Field(min_length=1)
    allow_extended_lifetime: bool = False

    @model_validator(mode="after")
    def _endpoint_rule(self) -> GcpSettings:
        parts = urlsplit(self.iam_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"iam_endpoint {self.iam_endpoint!r} is not an http(s) URL")
        google = parts.scheme == "https" and (
            parts.hostname == "googleapis.com" or parts.hostname.endswith(".googleapis.com")
        )
        if not google:
            if self.credentials != "anonymous":
                raise ValueError(
                    "a non-Google iam_endpoint needs credentials: anonymous "
                    "(never send real credentials to an emulator)"
                )
            if not _is_loopback(parts.hostname):
                raise ValueError("a non-Google iam_endpoint must be a loopback address")
        elif self.credentials == "anonymous":
            raise ValueError("credentials: anonymous is for the local emulator only")
        return self


class RolesSettings(_Model):
    """``file``: roles.yaml, read-only, hot reload. ``redis``: edited through the API, each
    version MACed with the key in env ``mac_key_env`` (base64, >= 32 bytes; comma-separated
    for rotation, the first signs), which Redis never sees."""

    source: Literal["file", "redis"] = "file"
    file: str = "config/roles.yaml"
    mac_key_env: str = Field("BROKER_ROLES_MAC_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _no_ignored_keys(self) -> RolesSettings:
        # A setting is never silently ignored: each key belongs to one source.
        if self.source == "redis" and "file" in self.model_fields_set:
            raise ValueError("roles.file is read only with source: file (remove it)")
        if self.source == "file" and "mac_key_env" in self.model_fields_set:
            raise ValueError("roles.mac_key_env is used only with source: redis (remove it)")
        return self


class CacheSettings(_Model):
    keys_env: str = "BROKER_CACHE_KEYS"
    min_remaining: Duration = 300.0
    refresh_ahead: float = Field(0.8, gt=0.0, lt=1.0)
    # Each worker keeps tokens it read from Redis this long (0 = off): a hit then costs one
    # round trip (its audit record). Purges still take effect at once (see broker/tokenmemo.py).
    memo: Duration = 30.0

    @field_validator("memo")
    @classmethod
    def _memo(cls, v: float) -> float:
        if not 0 <= v <= 30:
            raise ValueError("must be between 0s (off) and 30s")
        return v


class AuditSettings(_Model):
    retention: Duration = 30 * 86400.0
    signing_key_env: str = "BROKER_AUDIT_SIGNING_KEY"
    checkpoint_every: int = Field(100, ge=1)
    stdout: bool = True
    # Public keys (PEM or base64 raw 32 bytes) of retired signing keys, so the checkpoints they
    # signed still verify after a rotation (docs/audit.md). Public: not secret.
    previous_public_keys: tuple[str, ...] = ()

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: float) -> float:
        # Records older than this are trimmed: 0 (often meant as "keep all") would delete them.
        if v < MIN_AUDIT_RETENTION_S:
            raise ValueError("must be at least 1h (records older than it are deleted)")
        return v

    @field_validator("previous_public_keys")
    @classmethod
    def _public_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from broker.signing import parse_public_key

        for i, text in enumerate(v):
            try:
                parse_public_key(text, source=f"previous_public_keys[{i}]")
            except ConfigError as exc:
                raise ValueError(f"[{i}]: {'; '.join(exc.problems)}") from None
        return v


class RateLimitSettings(_Model):
    per_subject_per_minute: int = Field(600, ge=0)
    per_client_ip_per_minute: int = Field(3000, ge=0)


class AccessSettings(_Model):
    audience: str = "token-broker-admin"
    admins: tuple[str, ...] = ()
    auditors: tuple[str, ...] = ()


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    issuers: tuple[IssuerSettings, ...] = Field(min_length=1)
    gcp: GcpSettings
    roles: RolesSettings = RolesSettings()
    cache: CacheSettings = CacheSettings()
    audit: AuditSettings = AuditSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    access: AccessSettings = AccessSettings()
    # Directory that relative paths (jwks_file, roles.file) are resolved against; not a YAML key.
    base_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        names = [i.name for i in self.issuers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"issuers: duplicate name(s) {sorted(dup)}")
        isss = [i.issuer for i in self.issuers]
        dup = {n for n in isss if isss.count(n) > 1}
        if dup:
            raise ValueError(f"issuers: duplicate issuer value(s) {sorted(dup)}")
        if self.access.audience in {a for i in self.issuers for a in i.audiences}:
            raise ValueError(
                "access.audience must differ from every exchange audience "
                "(an exchange token must not be an admin credential)"
            )
        lists = {"admins": self.access.admins, "auditors": self.access.auditors}
        problems = [
            f"access.{name}[{i}]: {problem}"
            for name, entries in lists.items()
            for i, entry in enumerate(entries)
            if (problem := _access_entry_problem(entry, self.issuers)) is not None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        if self.redis.url.startswith("memory://") and self.server.workers > 1:
            raise ValueError("redis.url memory:// is one process only; set server.workers: 1")
        return self

    def path(self, p: str) -> Path:
        """Resolve a configured path relative to the directory the broker was started in."""
        path = Path(p)
        return path if path.is_absolute() else Path(self.base_dir) / path


def _access_entry_problem(entry: str, issuers: tuple[IssuerSettings, ...]) -> str | None:
    """Why ``entry`` can never match a caller's principal (see ``WorkloadIdentity.principal``),
    else None: a typo here would only ever show as a 403."""
    name, _, rest = entry.partition("/")
    kinds = {i.name: i.kind for i in issuers}
    if name not in kinds:
        known = ", ".join(sorted(kinds))
        return f"{entry!r} must start with an issuer's configured name ({known}), then '/'"
    if kinds[name] == "kubernetes":
        namespace, sep, account = rest.partition("/")
        if not (namespace and sep and account) or "/" in account:
            return f"{entry!r} must be {name}/NAMESPACE/SERVICE_ACCOUNT"
    elif not rest:
        return f"{entry!r} must be {name}/SUBJECT"
    return None


def key_url_problem(url: str) -> str | None:
    """Why keys may not be fetched from ``url`` (https, or http to loopback only), else None."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@)"  # and the URL is not echoed
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return f"{url!r} has an invalid port"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return f"{url!r} uses plain http, allowed only to a loopback address; use https"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "BROKER_BIND": ("server", "bind"),
    "BROKER_REDIS_URL": ("redis", "url"),
    "BROKER_IAM_ENDPOINT": ("gcp", "iam_endpoint"),
}


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a setting of this version)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{loc}: {msg}")
    return problems


def settings_from_mapping(
    data: Mapping[str, Any],
    *,
    source: str = "<settings>",
    base_dir: str = ".",
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Validate a parsed config mapping, applying env overrides; raise :class:`ConfigError`."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = (env if env is not None else os.environ).get(var)
        if value:
            sect = merged.setdefault(section, {})
            if isinstance(sect, dict):
                sect[key] = value
    merged["base_dir"] = base_dir
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate ``broker.yaml``; raise :class:`ConfigError` naming file, key, reason."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [f"not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), ["(top level): expected a mapping"])
    # Relative paths are relative to the working directory, as the defaults (config/roles.yaml) are.
    return settings_from_mapping(data, source=str(p), base_dir=str(Path.cwd()), env=env)
