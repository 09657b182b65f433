"""The role table: loading, validation, and the pure decision (DESIGN.md §3 roles.yaml, §4).

Validation collects every problem, each naming the role and field, and raises one
:class:`ConfigError`. A loaded :class:`RoleTable` holds its matchers compiled once, so
:func:`decide` is cheap. :func:`decide` and :func:`explain` run the same code and fail closed;
the clock is passed in, nothing here does I/O except :func:`load_role_table`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from broker.errors import ConfigError
from broker.model import Decision, Role, SubjectMatcher, WorkloadIdentity
from broker.settings import parse_duration

# --- the contract, as constants (shared by validation and the JSON Schema) -----------------------

NAME_PATTERN = r"^[a-z0-9-]{1,63}$"
SCOPE_PREFIX = "https://www.googleapis.com/auth/"
SCOPE_PATTERN = r"^https://www\.googleapis\.com/auth/[A-Za-z0-9._/-]+$"
DURATION_PATTERN = r"^\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*$"
# NAME@PROJECT.iam.gserviceaccount.com (PROJECT may be domain-scoped: p.example.com),
# PROJECT@appspot.gserviceaccount.com, NUMBER-compute@developer.gserviceaccount.com.
SERVICE_ACCOUNT_PATTERN = (
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    r"@(?:[a-z0-9](?:[a-z0-9.-]{0,200}[a-z0-9])?\.iam|appspot|developer)\.gserviceaccount\.com$"
)
# A subject pattern: no whitespace; "*" in service_account only on its own.
PATTERN_PATTERN = r"^\S+$"
K8S_SERVICE_ACCOUNT_PATTERN = r"^(?:\*|[^*\s]+)$"

TOP_LEVEL_KEYS = frozenset({"roles"})
ROLE_KEYS = frozenset(
    {"name", "description", "subjects", "service_account", "scopes", "lifetime", "delegates"}
)
ROLE_REQUIRED = ("name", "subjects", "service_account", "scopes", "lifetime")
SUBJECT_KEYS = frozenset({"issuer", "namespace", "service_account", "subject"})

MIN_LIFETIME_S = 600
MAX_LIFETIME_S = 3600
MAX_EXTENDED_LIFETIME_S = 12 * 3600

GLOB_CHARS = frozenset("*?[")
GLOB_WARNING = "anyone who can create a matching namespace or service account can assume the role"

_NAME_RE = re.compile(NAME_PATTERN)
_SCOPE_RE = re.compile(SCOPE_PATTERN)
_DURATION_RE = re.compile(DURATION_PATTERN)
_SA_RE = re.compile(SERVICE_ACCOUNT_PATTERN)
_PATTERN_RE = re.compile(PATTERN_PATTERN)


def is_glob(value: str) -> bool:
    """True when ``value`` has glob characters (``*``, ``?``, ``[``)."""
    return not GLOB_CHARS.isdisjoint(value)


# --- matching ------------------------------------------------------------------------------------

Predicate = Callable[[str], bool]


def _compile(pattern: str) -> Predicate:
    """Exact strings compare directly; globs become one precompiled, case-sensitive regex."""
    if not is_glob(pattern):
        return pattern.__eq__
    regex = re.compile(fnmatch.translate(pattern))
    return lambda value: regex.match(value) is not None


@dataclass(frozen=True, slots=True)
class _CompiledMatcher:
    matcher: SubjectMatcher
    kind: str  # "kubernetes" | "oidc", from the matcher's fields
    namespace: Predicate | None
    service_account: Predicate | None
    subject: Predicate | None

    @classmethod
    def of(cls, m: SubjectMatcher) -> _CompiledMatcher:
        kind = "oidc" if m.subject is not None else "kubernetes"
        return cls(
            matcher=m,
            kind=kind,
            namespace=_compile(m.namespace) if m.namespace is not None else None,
            service_account=(
                _compile(m.service_account) if m.service_account is not None else None
            ),
            subject=_compile(m.subject) if m.subject is not None else None,
        )


def _field_matches(
    what: str,
    pred: Predicate | None,
    pattern: str | None,
    value: str | None,
    notes: list[str] | None,
) -> bool:
    # An absent or empty value never matches, not even "*": fail closed.
    if pred is None or pattern is None or not value or not pred(value):
        if notes is not None:
            shown = _q(value) if value else "(none)"
            notes.append(f"{what} {shown} does not match {_q(pattern or '')}")
        return False
    if notes is not None and is_glob(pattern):
        notes.append(f"{what} {_q(value)} matches glob {_q(pattern)}")
    return True


def _match(cm: _CompiledMatcher, identity: WorkloadIdentity, notes: list[str] | None) -> bool:
    """The one matching routine; ``notes`` (explain) receives why, or is None (decide)."""
    m = cm.matcher
    if identity.issuer_name != m.issuer:
        if notes is not None:
            notes.append(f"issuer is {_q(m.issuer)}, the caller's is {_q(identity.issuer_name)}")
        return False
    if identity.kind != cm.kind:
        if notes is not None:
            notes.append(f"expects identity kind {cm.kind}, the caller is {identity.kind}")
        return False
    if cm.kind == "oidc":
        return _field_matches("subject", cm.subject, m.subject, identity.subject, notes)
    ns_ok = _field_matches("namespace", cm.namespace, m.namespace, identity.namespace, notes)
    if not ns_ok and notes is None:
        return False
    sa_ok = _field_matches(
        "service account", cm.service_account, m.service_account, identity.service_account, notes
    )
    return ns_ok and sa_ok


def matches(matcher: SubjectMatcher, identity: WorkloadIdentity) -> bool:
    """Whether one ``subjects[]`` entry admits ``identity`` (globs are case-sensitive fnmatch)."""
    return _match(_CompiledMatcher.of(matcher), identity, None)


# --- the table -----------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    s = int(seconds)
    if s != seconds:
        return f"{seconds:g}s"
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def role_to_dict(role: Role) -> dict[str, Any]:
    """A role in roles.yaml form; :func:`parse_role_table` reads it back to the same role."""
    subjects = []
    for m in role.subjects:
        entry = {"issuer": m.issuer}
        for key in ("namespace", "service_account", "subject"):
            value = getattr(m, key)
            if value is not None:
                entry[key] = value
        subjects.append(entry)
    return {
        "name": role.name,
        "description": role.description,
        "subjects": subjects,
        "service_account": role.service_account,
        "scopes": list(role.scopes),
        "lifetime": _format_duration(role.lifetime_s),
        "delegates": list(role.delegates),
    }


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def role_digest(role: Role) -> str:
    """SHA-256 hex of one role's canonical JSON (a per-role ETag)."""
    return hashlib.sha256(_canonical(role_to_dict(role))).hexdigest()


@dataclass(frozen=True)
class RoleTable:
    """A validated role table. ``digest`` is computed from the roles (canonical JSON, roles
    sorted by name, lifetimes in seconds), so it is stable across key and role order and
    formatting, and changes with any edit."""

    roles: tuple[Role, ...]
    source: str = "<roles>"
    warnings: tuple[str, ...] = ()
    digest: str = field(init=False)
    _index: dict[str, Role] = field(init=False, repr=False, compare=False)
    _compiled: tuple[tuple[Role, tuple[_CompiledMatcher, ...]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        index = {r.name: r for r in self.roles}
        if len(index) != len(self.roles):
            raise ValueError("role names must be unique")
        body = [role_to_dict(r) for r in sorted(self.roles, key=lambda r: r.name)]
        object.__setattr__(self, "digest", hashlib.sha256(_canonical(body)).hexdigest())
        object.__setattr__(self, "_index", index)
        compiled = tuple((r, tuple(_CompiledMatcher.of(m) for m in r.subjects)) for r in self.roles)
        object.__setattr__(self, "_compiled", compiled)

    def get(self, name: str) -> Role | None:
        """The role called ``name``, or None."""
        return self._index.get(name)

    def to_data(self) -> dict[str, Any]:
        """The table in roles.yaml form (what the roles API returns and accepts)."""
        return {"roles": [role_to_dict(r) for r in self.roles]}


# --- validation ----------------------------------------------------------------------------------


def _q(value: object) -> str:
    """Quote a (possibly caller-supplied) value for a message: JSON string, bounded length."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 100:
        text = text[:100] + "..."
    return json.dumps(text, ensure_ascii=False)


def _type_name(value: object) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


class _Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}")


def _unknown_keys(
    data: Mapping[Any, Any], allowed: frozenset[str], where: str, p: _Problems
) -> None:
    for key in data:
        if key not in allowed:
            p.add(f"{where}.{key}" if where else str(key), "unknown key")


def _parse_service_account(
    value: object, where: str, allowed: Sequence[str], p: _Problems
) -> str | None:
    if not isinstance(value, str):
        p.add(where, f"expected a service-account email string, got {_type_name(value)}")
        return None
    if not _SA_RE.fullmatch(value):
        p.add(
            where,
            f"{_q(value)} is not a service-account email (NAME@PROJECT.iam.gserviceaccount.com)",
        )
        return None
    if not any(fnmatch.fnmatchcase(value, glob) for glob in allowed):
        p.add(where, f"{_q(value)} does not match gcp.allowed_service_accounts {list(allowed)}")
        return None
    return value


def _parse_lifetime(
    value: object, where: str, *, extended: bool, min_remaining_s: float, p: _Problems
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        p.add(where, f"expected a duration such as 10m or 1h, got {_type_name(value)}")
        return None
    if isinstance(value, str) and not _DURATION_RE.fullmatch(value):
        p.add(where, f"{_q(value)} is not a duration (use e.g. 10m, 1h, 3600s)")
        return None
    seconds = parse_duration(value)
    shown = value.strip() if isinstance(value, str) else _format_duration(seconds)
    if seconds != int(seconds):
        p.add(where, f"{shown} is not a whole number of seconds")
        return None
    maximum = MAX_EXTENDED_LIFETIME_S if extended else MAX_LIFETIME_S
    ok = True
    if seconds > maximum:
        hint = (
            ""
            if extended
            else (
                f" ({_format_duration(MAX_EXTENDED_LIFETIME_S)} with gcp.allow_extended_lifetime)"
            )
        )
        p.add(where, f"{shown} is above the maximum {_format_duration(maximum)}{hint}")
        ok = False
    if seconds < MIN_LIFETIME_S:
        p.add(where, f"{shown} is below the minimum {_format_duration(MIN_LIFETIME_S)}")
        ok = False
    elif seconds < 2 * min_remaining_s:
        p.add(
            where,
            f"{shown} is below 2 x cache.min_remaining "
            f"(2 x {_format_duration(min_remaining_s)} = {_format_duration(2 * min_remaining_s)}): "
            "a cached token would be unusable for most of its life",
        )
        ok = False
    return int(seconds) if ok else None


def _parse_pattern(
    data: Mapping[str, Any], key: str, where: str, p: _Problems
) -> tuple[str | None, bool]:
    """A namespace / service_account / subject pattern; returns (value, valid)."""
    value = data.get(key)
    if value is None:
        return None, True
    if not isinstance(value, str):
        p.add(f"{where}.{key}", f"expected a string, got {_type_name(value)}")
        return None, False
    if not _PATTERN_RE.fullmatch(value):
        p.add(f"{where}.{key}", "must be non-empty and contain no whitespace")
        return None, False
    return value, True


def _parse_subject(
    data: object, where: str, issuers: Mapping[str, str], p: _Problems
) -> SubjectMatcher | None:
    if not isinstance(data, dict):
        p.add(where, f"expected a mapping, got {_type_name(data)}")
        return None
    _unknown_keys(data, SUBJECT_KEYS, where, p)
    ok = True
    issuer = data.get("issuer")
    kind: str | None = None
    if issuer is None:
        p.add(f"{where}.issuer", "required")
        ok = False
    elif not isinstance(issuer, str):
        p.add(f"{where}.issuer", f"expected a string, got {_type_name(issuer)}")
        ok = False
    elif issuer not in issuers:
        p.add(f"{where}.issuer", f"unknown issuer {_q(issuer)} (configured: {sorted(issuers)})")
        ok = False
    else:
        kind = issuers[issuer]
    namespace, ns_ok = _parse_pattern(data, "namespace", where, p)
    service_account, sa_ok = _parse_pattern(data, "service_account", where, p)
    subject, sub_ok = _parse_pattern(data, "subject", where, p)
    ok = ok and ns_ok and sa_ok and sub_ok

    if kind == "kubernetes":
        for key in ("namespace", "service_account"):
            if key not in data:
                p.add(f"{where}.{key}", f"required for kubernetes issuer {_q(issuer)}")
                ok = False
        if "subject" in data:
            p.add(
                f"{where}.subject",
                f"not allowed for kubernetes issuer {_q(issuer)} (use namespace and "
                "service_account)",
            )
            ok = False
        if service_account is not None and "*" in service_account and service_account != "*":
            p.add(f"{where}.service_account", '"*" is allowed only on its own')
            ok = False
        if (
            namespace is not None
            and set(namespace) == {"*"}
            and service_account is not None
            and is_glob(service_account)
        ):
            p.add(
                f"{where}.namespace",
                f"{_q(namespace)} needs an exact service_account to narrow it "
                "(it would admit every service account of the cluster)",
            )
            ok = False
    elif kind == "oidc":
        if "subject" not in data:
            p.add(f"{where}.subject", f"required for oidc issuer {_q(issuer)}")
            ok = False
        for key in ("namespace", "service_account"):
            if key in data:
                p.add(f"{where}.{key}", f"not allowed for oidc issuer {_q(issuer)} (use subject)")
                ok = False
        if subject is not None and set(subject) == {"*"}:
            p.add(f"{where}.subject", f"{_q(subject)} would admit every subject of the issuer")
            ok = False
    elif kind is not None:
        p.add(f"{where}.issuer", f"issuer {_q(issuer)} has unsupported kind {_q(kind)}")
        ok = False

    if not ok or not isinstance(issuer, str):
        return None
    for key, value in (
        ("namespace", namespace),
        ("service_account", service_account),
        ("subject", subject),
    ):
        if value is not None and is_glob(value):
            p.warn(f"{where}.{key}", f"{_q(value)} is a glob: {GLOB_WARNING}")
    return SubjectMatcher(
        issuer=issuer, namespace=namespace, service_account=service_account, subject=subject
    )


def _string_list(value: object, where: str, p: _Problems) -> list[str] | None:
    if not isinstance(value, list):
        p.add(where, f"expected a list, got {_type_name(value)}")
        return None
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    for i in bad:
        p.add(f"{where}[{i}]", f"expected a string, got {_type_name(value[i])}")
    return None if bad else list(value)


def _duplicates(items: Sequence[str]) -> list[str]:
    return sorted({x for x in items if items.count(x) > 1})


def _label(i: int, name: object) -> str:
    """``roles[2] (flux-source-reader)``; the name is quoted when it is not plain text."""
    if not isinstance(name, str) or not name:
        return f"roles[{i}]"
    shown = name[:64] if name.isprintable() and " " not in name else _q(name)
    return f"roles[{i}] ({shown})"


def _parse_role(
    data: object,
    i: int,
    *,
    issuers: Mapping[str, str],
    allowed: Sequence[str],
    extended: bool,
    min_remaining_s: float,
    p: _Problems,
) -> Role | None:
    if not isinstance(data, dict):
        p.add(f"roles[{i}]", f"expected a mapping, got {_type_name(data)}")
        return None
    label = _label(i, data.get("name"))
    errors_before = len(p.errors)

    _unknown_keys(data, ROLE_KEYS, label, p)
    for key in ROLE_REQUIRED:
        if key not in data:
            p.add(f"{label}.{key}", "required")

    name = data.get("name")
    if "name" in data and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        p.add(f"{label}.name", f"{_q(name)} does not match {NAME_PATTERN}")

    description = data.get("description", "")
    if not isinstance(description, str):
        p.add(f"{label}.description", f"expected a string, got {_type_name(description)}")

    subjects: list[SubjectMatcher] = []
    if "subjects" in data:
        raw = data["subjects"]
        if not isinstance(raw, list):
            p.add(f"{label}.subjects", f"expected a list, got {_type_name(raw)}")
        elif not raw:
            p.add(f"{label}.subjects", "at least one subject is required")
        else:
            for j, entry in enumerate(raw):
                m = _parse_subject(entry, f"{label}.subjects[{j}]", issuers, p)
                if m is not None:
                    subjects.append(m)

    service_account = None
    if "service_account" in data:
        service_account = _parse_service_account(
            data["service_account"], f"{label}.service_account", allowed, p
        )

    scopes: list[str] = []
    if "scopes" in data:
        scopes = _string_list(data["scopes"], f"{label}.scopes", p) or []
        if isinstance(data["scopes"], list) and not data["scopes"]:
            p.add(f"{label}.scopes", "at least one scope is required")
        for k, scope in enumerate(scopes):
            if not _SCOPE_RE.fullmatch(scope):
                p.add(f"{label}.scopes[{k}]", f"{_q(scope)} does not start with {SCOPE_PREFIX}")
        for dup in _duplicates(scopes):
            p.add(f"{label}.scopes", f"{_q(dup)} is listed more than once")

    lifetime_s = None
    if "lifetime" in data:
        lifetime_s = _parse_lifetime(
            data["lifetime"],
            f"{label}.lifetime",
            extended=extended,
            min_remaining_s=min_remaining_s,
            p=p,
        )

    delegates = _string_list(data.get("delegates", []), f"{label}.delegates", p) or []
    for k, d in enumerate(delegates):
        _parse_service_account(d, f"{label}.delegates[{k}]", allowed, p)
    for dup in _duplicates(delegates):
        p.add(f"{label}.delegates", f"{_q(dup)} is listed more than once")
    if service_account is not None and service_account in delegates:
        p.add(f"{label}.delegates", "must not contain the role's own service_account")

    if len(p.errors) != errors_before:
        return None
    assert isinstance(name, str) and service_account is not None and lifetime_s is not None
    assert isinstance(description, str)
    return Role(
        name=name,
        service_account=service_account,
        scopes=tuple(scopes),
        lifetime_s=lifetime_s,
        subjects=tuple(subjects),
        delegates=tuple(delegates),
        description=description,
    )


def parse_role_table(
    data: object,
    *,
    source: str,
    issuers: Mapping[str, str],
    allowed_service_accounts: Sequence[str],
    allow_extended_lifetime: bool = False,
    min_remaining_s: float = 300.0,
) -> RoleTable:
    """Validate parsed roles.yaml data into a :class:`RoleTable`.

    ``issuers`` maps each configured issuer name to its kind (``kubernetes`` | ``oidc``).
    Every problem is collected; if there is any, :class:`ConfigError` lists them all, each
    naming the role and field. Globs load with a warning in :attr:`RoleTable.warnings`.
    """
    p = _Problems()
    roles: list[Role] = []
    if not isinstance(data, dict):
        p.add("(top level)", f'expected a mapping with a "roles" list, got {_type_name(data)}')
    else:
        _unknown_keys(data, TOP_LEVEL_KEYS, "", p)
        raw = data.get("roles")
        if "roles" not in data:
            p.add("roles", "required")
        elif not isinstance(raw, list):
            p.add("roles", f"expected a list, got {_type_name(raw)}")
        else:
            if not raw:
                p.warn("roles", "the table is empty: every token request will be denied")
            seen: dict[str, int] = {}
            for i, entry in enumerate(raw):
                name = entry.get("name") if isinstance(entry, dict) else None
                if isinstance(name, str):
                    if name in seen:
                        p.add(f"{_label(i, name)}.name", f"duplicate of roles[{seen[name]}]")
                    else:
                        seen[name] = i
                role = _parse_role(
                    entry,
                    i,
                    issuers=issuers,
                    allowed=allowed_service_accounts,
                    extended=allow_extended_lifetime,
                    min_remaining_s=min_remaining_s,
                    p=p,
                )
                if role is not None:
                    roles.append(role)
    if p.errors:
        raise ConfigError(source, p.errors)
    return RoleTable(roles=tuple(roles), source=source, warnings=tuple(p.warnings))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one,
    which would let a second ``service_account:`` line override the reviewed one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_role_table(
    path: Path,
    *,
    issuers: Mapping[str, str],
    allowed_service_accounts: Sequence[str],
    allow_extended_lifetime: bool = False,
    min_remaining_s: float = 300.0,
) -> RoleTable:
    """Read and validate a roles.yaml file; every failure is a :class:`ConfigError` naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, ["not UTF-8 text"]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    return parse_role_table(
        data,
        source=source,
        issuers=issuers,
        allowed_service_accounts=allowed_service_accounts,
        allow_extended_lifetime=allow_extended_lifetime,
        min_remaining_s=min_remaining_s,
    )


# --- decisions -----------------------------------------------------------------------------------


def _role_admits(
    matchers: tuple[_CompiledMatcher, ...],
    identity: WorkloadIdentity,
    notes: list[str] | None,
) -> bool:
    if notes is None:
        return any(_match(cm, identity, None) for cm in matchers)
    admitted = False
    for j, cm in enumerate(matchers):
        why: list[str] = []
        ok = _match(cm, identity, why)
        verdict = "admits" if ok else "does not admit"
        notes.append(f"subjects[{j}] {verdict}" + (f": {'; '.join(why)}" if why else ""))
        admitted = admitted or ok
    return admitted


def _evaluate(
    table: RoleTable,
    identity: WorkloadIdentity,
    requested_role: str | None,
    now: float,
    verbose: bool,
) -> Decision:
    """The single decision routine behind :func:`decide` and :func:`explain`.

    ``reasons[0]`` is always the summary (safe to send to the caller); with ``verbose`` the
    per-role details follow it.
    """
    details: list[str] | None = [] if verbose else None
    admitting: list[Role] = []
    for role, matchers in table._compiled:
        if requested_role is not None and role.name != requested_role and not verbose:
            continue
        notes: list[str] | None = [] if verbose else None
        ok = _role_admits(matchers, identity, notes)
        if ok:
            admitting.append(role)
        if details is not None and notes is not None:
            verdict = "admits" if ok else "does not admit"
            details.append(f"role {_q(role.name)} {verdict} the caller: " + " | ".join(notes))
    if details is not None and requested_role is not None and table.get(requested_role) is None:
        details.append(f"role {_q(requested_role)} does not exist")

    who = identity.principal
    if identity.expires_at is not None and identity.expires_at <= now:
        summary = f"the subject token of {who} has expired"
        return Decision(False, None, "token_expired", (summary, *(details or ())))

    if requested_role is not None:
        chosen = [r for r in admitting if r.name == requested_role]
        if not chosen:
            summary = f"role {_q(requested_role)} does not exist or does not admit this caller"
            return Decision(False, None, "role_not_admitted", (summary, *(details or ())))
        role = chosen[0]
    elif not admitting:
        summary = f"no role admits {who}"
        return Decision(False, None, "no_role", (summary, *(details or ())))
    elif len(admitting) > 1:
        names = ", ".join(sorted(r.name for r in admitting))
        summary = f"several roles admit {who} ({names}); name one as the audience"
        return Decision(False, None, "ambiguous_role", (summary, *(details or ())))
    else:
        role = admitting[0]
    summary = f"role {_q(role.name)} admits {who}"
    return Decision(True, role, "allowed", (summary, *(details or ())))


def decide(
    table: RoleTable,
    identity: WorkloadIdentity,
    *,
    requested_role: str | None,
    now: float,
) -> Decision:
    """Which role ``identity`` gets, if any. Pure; fails closed.

    A named role must exist and admit the caller (``role_not_admitted`` otherwise, with one
    description for both cases). Without a name, exactly one role must admit the caller
    (``no_role`` / ``ambiguous_role`` otherwise). An expired identity is ``token_expired``.
    ``reasons`` holds one summary sentence.
    """
    return _evaluate(table, identity, requested_role, now, verbose=False)


def explain(
    table: RoleTable,
    identity: WorkloadIdentity,
    *,
    requested_role: str | None,
    now: float,
) -> Decision:
    """The decision :func:`decide` takes, with reasons for every role (for admins/auditors)."""
    return _evaluate(table, identity, requested_role, now, verbose=True)


# --- JSON Schema ---------------------------------------------------------------------------------


def role_table_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of roles.yaml, built from the constants validation uses.

    What a schema cannot express is checked only by :func:`parse_role_table`: unique names,
    issuer names and kinds, gcp.allowed_service_accounts, and the lifetime range.
    """
    sa_email = {"type": "string", "pattern": SERVICE_ACCOUNT_PATTERN}
    pattern = {"type": "string", "pattern": PATTERN_PATTERN}
    glob_chars = "".join(sorted(GLOB_CHARS)).replace("[", r"\[")
    subject = {
        "type": "object",
        "description": "kubernetes issuer: namespace + service_account; oidc issuer: subject. "
        "Values are exact, or globs (*, ?, [...]).",
        "additionalProperties": False,
        "required": ["issuer"],
        "properties": {
            "issuer": {"type": "string", "description": "an issuers[].name of broker.yaml"},
            "namespace": pattern,
            "service_account": {"type": "string", "pattern": K8S_SERVICE_ACCOUNT_PATTERN},
            "subject": {"type": "string", "pattern": PATTERN_PATTERN, "not": {"pattern": r"^\*+$"}},
        },
        "oneOf": [
            {"required": ["namespace", "service_account"], "not": {"required": ["subject"]}},
            {
                "required": ["subject"],
                "not": {"anyOf": [{"required": ["namespace"]}, {"required": ["service_account"]}]},
            },
        ],
        # A bare "*" namespace needs an exact service_account.
        "if": {"required": ["namespace"], "properties": {"namespace": {"pattern": r"^\*+$"}}},
        "then": {"properties": {"service_account": {"pattern": rf"^[^{glob_chars}\s]+$"}}},
    }
    role = {
        "type": "object",
        "additionalProperties": False,
        "required": list(ROLE_REQUIRED),
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN, "description": "unique"},
            "description": {"type": "string"},
            "subjects": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/subject"}},
            "service_account": {
                **sa_email,
                "description": "must match gcp.allowed_service_accounts",
            },
            "scopes": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "pattern": SCOPE_PATTERN},
            },
            "lifetime": {"$ref": "#/$defs/duration"},
            "delegates": {"type": "array", "uniqueItems": True, "items": sa_email},
        },
    }
    duration = {
        "description": (
            f"{_format_duration(MIN_LIFETIME_S)}..{_format_duration(MAX_LIFETIME_S)} "
            f"({_format_duration(MAX_EXTENDED_LIFETIME_S)} with gcp.allow_extended_lifetime), "
            "and at least 2 x cache.min_remaining"
        ),
        "anyOf": [
            {"type": "string", "pattern": DURATION_PATTERN},
            {"type": "integer", "minimum": MIN_LIFETIME_S, "maximum": MAX_EXTENDED_LIFETIME_S},
        ],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "token-broker roles.yaml",
        "type": "object",
        "additionalProperties": False,
        "required": ["roles"],
        "properties": {"roles": {"type": "array", "items": {"$ref": "#/$defs/role"}}},
        "$defs": {"role": role, "subject": subject, "duration": duration},
    }
