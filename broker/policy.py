"""The role table: loading, validation, and the pure decision (DESIGN.md §3 roles.yaml, §4).

Validation collects every problem, each naming the role and field, and raises one
:class:`ConfigError`. A loaded :class:`RoleTable` holds its matchers compiled once, so
:func:`decide` is cheap. :func:`decide` and :func:`explain` run the same code and fail closed;
the clock is passed in, nothing here does I/O except :func:`load_role_table`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from broker.errors import ConfigError
from broker.model import Decision, Role, SubjectMatcher, WorkloadIdentity
from broker.settings import parse_duration

if TYPE_CHECKING:
    from broker.settings import Settings

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


Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation finding: ``path`` into the data (keys and list indexes), the message
    naming role and field, and, when the data came from YAML text, the 1-based line."""

    path: Path_
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class _Loc:
    """Where a problem is: its rendered form (``roles[2] (name).subjects[0].issuer``) and path."""

    text: str
    path: Path_ = ()

    def key(self, key: object) -> _Loc:
        name = key if isinstance(key, str) else str(key)
        return _Loc(f"{self.text}.{name}" if self.text else name, (*self.path, name))

    def at(self, index: int) -> _Loc:
        return _Loc(f"{self.text}[{index}]", (*self.path, index))

    def __str__(self) -> str:
        return self.text or "(top level)"


_ROOT = _Loc("")


class _Problems:
    def __init__(self) -> None:
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []

    def add(self, where: _Loc, msg: str) -> None:
        self.errors.append(Problem(where.path, f"{where}: {msg}"))

    def warn(self, where: _Loc, msg: str) -> None:
        self.warnings.append(Problem(where.path, f"{where}: {msg}"))


def _unknown_keys(
    data: Mapping[Any, Any], allowed: frozenset[str], where: _Loc, p: _Problems
) -> None:
    for key in data:
        if key not in allowed:
            p.add(where.key(key), "unknown key")


def _parse_service_account(
    value: object, where: _Loc, allowed: Sequence[str], p: _Problems
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
    value: object, where: _Loc, *, extended: bool, min_remaining_s: float, p: _Problems
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
    data: Mapping[str, Any], key: str, where: _Loc, p: _Problems
) -> tuple[str | None, bool]:
    """A namespace / service_account / subject pattern; returns (value, valid)."""
    value = data.get(key)
    if value is None:
        return None, True
    if not isinstance(value, str):
        p.add(where.key(key), f"expected a string, got {_type_name(value)}")
        return None, False
    if not _PATTERN_RE.fullmatch(value):
        p.add(where.key(key), "must be non-empty and contain no whitespace")
        return None, False
    return value, True


def _parse_subject(
    data: object, where: _Loc, issuers: Mapping[str, str], p: _Problems
) -> SubjectMatcher | None:
    if not isinstance(data, dict):
        p.add(where, f"expected a mapping, got {_type_name(data)}")
        return None
    _unknown_keys(data, SUBJECT_KEYS, where, p)
    ok = True
    issuer = data.get("issuer")
    kind: str | None = None
    if issuer is None:
        p.add(where.key("issuer"), "required")
        ok = False
    elif not isinstance(issuer, str):
        p.add(where.key("issuer"), f"expected a string, got {_type_name(issuer)}")
        ok = False
    elif issuer not in issuers:
        p.add(where.key("issuer"), f"unknown issuer {_q(issuer)} (configured: {sorted(issuers)})")
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
                p.add(where.key(key), f"required for kubernetes issuer {_q(issuer)}")
                ok = False
        if "subject" in data:
            p.add(
                where.key("subject"),
                f"not allowed for kubernetes issuer {_q(issuer)} (use namespace and "
                "service_account)",
            )
            ok = False
        if service_account is not None and "*" in service_account and service_account != "*":
            p.add(where.key("service_account"), '"*" is allowed only on its own')
            ok = False
        if (
            namespace is not None
            and set(namespace) == {"*"}
            and service_account is not None
            and is_glob(service_account)
        ):
            p.add(
                where.key("namespace"),
                f"{_q(namespace)} needs an exact service_account to narrow it "
                "(it would admit every service account of the cluster)",
            )
            ok = False
    elif kind == "oidc":
        if "subject" not in data:
            p.add(where.key("subject"), f"required for oidc issuer {_q(issuer)}")
            ok = False
        for key in ("namespace", "service_account"):
            if key in data:
                p.add(where.key(key), f"not allowed for oidc issuer {_q(issuer)} (use subject)")
                ok = False
        if subject is not None and set(subject) == {"*"}:
            p.add(where.key("subject"), f"{_q(subject)} would admit every subject of the issuer")
            ok = False
    elif kind is not None:
        p.add(where.key("issuer"), f"issuer {_q(issuer)} has unsupported kind {_q(kind)}")
        ok = False

    if not ok or not isinstance(issuer, str):
        return None
    for key, value in (
        ("namespace", namespace),
        ("service_account", service_account),
        ("subject", subject),
    ):
        if value is not None and is_glob(value):
            p.warn(where.key(key), f"{_q(value)} is a glob: {GLOB_WARNING}")
    return SubjectMatcher(
        issuer=issuer, namespace=namespace, service_account=service_account, subject=subject
    )


def _string_list(value: object, where: _Loc, p: _Problems) -> list[str] | None:
    if not isinstance(value, list):
        p.add(where, f"expected a list, got {_type_name(value)}")
        return None
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    for i in bad:
        p.add(where.at(i), f"expected a string, got {_type_name(value[i])}")
    return None if bad else list(value)


def _duplicates(items: Sequence[str]) -> list[str]:
    return sorted({x for x in items if items.count(x) > 1})


def _label(i: int, name: object) -> _Loc:
    """``roles[2] (flux-source-reader)``; the name is quoted when it is not plain text."""
    loc = _ROOT.key("roles").at(i)
    if not isinstance(name, str) or not name:
        return loc
    shown = name[:64] if name.isprintable() and " " not in name else _q(name)
    return _Loc(f"{loc.text} ({shown})", loc.path)


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
        p.add(_ROOT.key("roles").at(i), f"expected a mapping, got {_type_name(data)}")
        return None
    label = _label(i, data.get("name"))
    errors_before = len(p.errors)

    _unknown_keys(data, ROLE_KEYS, label, p)
    for key in ROLE_REQUIRED:
        if key not in data:
            p.add(label.key(key), "required")

    name = data.get("name")
    if "name" in data and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        p.add(label.key("name"), f"{_q(name)} does not match {NAME_PATTERN}")

    description = data.get("description", "")
    if not isinstance(description, str):
        p.add(label.key("description"), f"expected a string, got {_type_name(description)}")

    subjects: list[SubjectMatcher] = []
    if "subjects" in data:
        raw = data["subjects"]
        if not isinstance(raw, list):
            p.add(label.key("subjects"), f"expected a list, got {_type_name(raw)}")
        elif not raw:
            p.add(label.key("subjects"), "at least one subject is required")
        else:
            for j, entry in enumerate(raw):
                m = _parse_subject(entry, label.key("subjects").at(j), issuers, p)
                if m is not None:
                    subjects.append(m)

    service_account = None
    if "service_account" in data:
        service_account = _parse_service_account(
            data["service_account"], label.key("service_account"), allowed, p
        )

    scopes: list[str] = []
    if "scopes" in data:
        scopes = _string_list(data["scopes"], label.key("scopes"), p) or []
        if isinstance(data["scopes"], list) and not data["scopes"]:
            p.add(label.key("scopes"), "at least one scope is required")
        for k, scope in enumerate(scopes):
            if not _SCOPE_RE.fullmatch(scope):
                p.add(label.key("scopes").at(k), f"{_q(scope)} does not start with {SCOPE_PREFIX}")
        for dup in _duplicates(scopes):
            p.add(label.key("scopes"), f"{_q(dup)} is listed more than once")

    lifetime_s = None
    if "lifetime" in data:
        lifetime_s = _parse_lifetime(
            data["lifetime"],
            label.key("lifetime"),
            extended=extended,
            min_remaining_s=min_remaining_s,
            p=p,
        )

    delegates = _string_list(data.get("delegates", []), label.key("delegates"), p) or []
    for k, d in enumerate(delegates):
        _parse_service_account(d, label.key("delegates").at(k), allowed, p)
    for dup in _duplicates(delegates):
        p.add(label.key("delegates"), f"{_q(dup)} is listed more than once")
    if service_account is not None and service_account in delegates:
        p.add(label.key("delegates"), "must not contain the role's own service_account")

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


@dataclass(frozen=True, slots=True)
class RoleRules:
    """What a role table is validated against: broker.yaml's issuers (name → kind) and gcp
    settings. The API cannot change these; they come from the configuration only."""

    issuers: Mapping[str, str]
    allowed_service_accounts: tuple[str, ...]
    allow_extended_lifetime: bool = False
    min_remaining_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RoleRules:
        """The rules of a loaded broker configuration."""
        return cls(
            issuers={i.name: i.kind for i in settings.issuers},
            allowed_service_accounts=tuple(settings.gcp.allowed_service_accounts),
            allow_extended_lifetime=settings.gcp.allow_extended_lifetime,
            min_remaining_s=settings.cache.min_remaining,
        )


@dataclass(frozen=True)
class Validation:
    """The outcome of checking a role table: the table when there is no error, and every
    error and warning with its location."""

    source: str
    table: RoleTable | None
    errors: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return self.table is not None and not self.errors

    def table_or_raise(self) -> RoleTable:
        """The table, or :class:`ConfigError` listing every error (role and field named)."""
        if self.table is None or self.errors:
            raise ConfigError(self.source, [p.message for p in self.errors])
        return self.table


def check_role_table(data: object, *, source: str, rules: RoleRules) -> Validation:
    """Validate parsed roles.yaml data; never raises. The same checks for the file, the API
    and the CLI, so a table that one accepts, all accept."""
    p = _Problems()
    roles: list[Role] = []
    if not isinstance(data, dict):
        p.add(_ROOT, f'expected a mapping with a "roles" list, got {_type_name(data)}')
    else:
        _unknown_keys(data, TOP_LEVEL_KEYS, _ROOT, p)
        raw = data.get("roles")
        if "roles" not in data:
            p.add(_ROOT.key("roles"), "required")
        elif not isinstance(raw, list):
            p.add(_ROOT.key("roles"), f"expected a list, got {_type_name(raw)}")
        else:
            if not raw:
                p.warn(_ROOT.key("roles"), "the table is empty: every token request will be denied")
            seen: dict[str, int] = {}
            for i, entry in enumerate(raw):
                name = entry.get("name") if isinstance(entry, dict) else None
                if isinstance(name, str):
                    if name in seen:
                        p.add(_label(i, name).key("name"), f"duplicate of roles[{seen[name]}]")
                    else:
                        seen[name] = i
                role = _parse_role(
                    entry,
                    i,
                    issuers=rules.issuers,
                    allowed=rules.allowed_service_accounts,
                    extended=rules.allow_extended_lifetime,
                    min_remaining_s=rules.min_remaining_s,
                    p=p,
                )
                if role is not None:
                    roles.append(role)
    if p.errors:
        return Validation(source, None, tuple(p.errors), tuple(p.warnings))
    table = RoleTable(
        roles=tuple(roles), source=source, warnings=tuple(w.message for w in p.warnings)
    )
    return Validation(source, table, (), tuple(p.warnings))


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
    rules = RoleRules(
        issuers=issuers,
        allowed_service_accounts=tuple(allowed_service_accounts),
        allow_extended_lifetime=allow_extended_lifetime,
        min_remaining_s=min_remaining_s,
    )
    return check_role_table(data, source=source, rules=rules).table_or_raise()


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


def load_yaml(text: str) -> Any:
    """Parse YAML the way roles.yaml is read: safe, and refusing duplicate keys
    (``yaml.YAMLError`` otherwise)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _node_lines(text: str) -> dict[Path_, int]:
    """1-based line of every path in a YAML document: a mapping entry's key line, a list
    item's first line. Empty when the text does not compose."""
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[Path_, int] = {}
    if root is None:
        return lines

    def walk(node: yaml.Node, path: Path_, stack: frozenset[int]) -> None:
        if id(node) in stack:  # an alias that refers to itself
            return
        stack = stack | {id(node)}
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    continue
                sub = (*path, key)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub, stack)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i), stack)

    walk(root, (), frozenset())
    return lines


def _locate(problems: tuple[Problem, ...], lines: Mapping[Path_, int]) -> tuple[Problem, ...]:
    """Give each problem the line of the deepest part of its path that the text has (a missing
    key points at its mapping)."""
    out: list[Problem] = []
    for problem in problems:
        line = None
        for n in range(len(problem.path), -1, -1):
            line = lines.get(problem.path[:n])
            if line is not None:
                break
        out.append(dataclasses.replace(problem, line=line))
    return tuple(out)


def check_role_yaml(text: str, *, source: str, rules: RoleRules) -> Validation:
    """Parse and validate roles.yaml text; never raises. Problems carry their line."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        return Validation(source, None, (Problem((), f"not valid YAML: {exc}", line),))
    result = check_role_table(data, source=source, rules=rules)
    if not (result.errors or result.warnings):
        return result
    lines = _node_lines(text)
    return dataclasses.replace(
        result, errors=_locate(result.errors, lines), warnings=_locate(result.warnings, lines)
    )


def check_role_file(path: Path, *, rules: RoleRules) -> Validation:
    """Read and validate a roles.yaml file; never raises (an unreadable file is an error)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return Validation(source, None, (Problem((), f"cannot read: {exc.strerror or exc}"),))
    except UnicodeDecodeError:
        return Validation(source, None, (Problem((), "not UTF-8 text"),))
    return check_role_yaml(text, source=source, rules=rules)


def load_role_table(
    path: Path,
    *,
    issuers: Mapping[str, str],
    allowed_service_accounts: Sequence[str],
    allow_extended_lifetime: bool = False,
    min_remaining_s: float = 300.0,
) -> RoleTable:
    """Read and validate a roles.yaml file; every failure is a :class:`ConfigError` naming it."""
    rules = RoleRules(
        issuers=issuers,
        allowed_service_accounts=tuple(allowed_service_accounts),
        allow_extended_lifetime=allow_extended_lifetime,
        min_remaining_s=min_remaining_s,
    )
    return check_role_file(path, rules=rules).table_or_raise()


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


# --- explaining callers that have no token at hand ----------------------------------------------


def subject_identity(
    issuer_name: str,
    kind: str,
    *,
    namespace: str | None = None,
    service_account: str | None = None,
    subject: str | None = None,
) -> WorkloadIdentity:
    """The identity a verified token of this caller would yield, for explain and role tests.

    Kubernetes: ``namespace`` and ``service_account`` (the ``sub`` is derived as the API
    server writes it); oidc: ``subject``. No expiry: only the role table is consulted.
    """
    if kind == "kubernetes":
        if not namespace or not service_account:
            raise ValueError("a kubernetes subject needs namespace and service_account")
        sub = f"system:serviceaccount:{namespace}:{service_account}"
        return WorkloadIdentity(
            issuer_name=issuer_name,
            issuer="",
            kind=kind,
            subject=sub,
            namespace=namespace,
            service_account=service_account,
        )
    if kind == "oidc":
        if not subject:
            raise ValueError("an oidc subject needs subject")
        return WorkloadIdentity(issuer_name=issuer_name, issuer="", kind=kind, subject=subject)
    raise ValueError(f"unknown issuer kind {_q(kind)}")


def principal_identity(principal: str, issuers: Mapping[str, str]) -> WorkloadIdentity:
    """``ISSUER/NAMESPACE/SERVICE_ACCOUNT`` (kubernetes) or ``ISSUER/SUBJECT`` (oidc; the
    subject may contain ``/``) → identity. Raises ``LookupError`` for an issuer that is not
    configured and ``ValueError`` for a malformed principal."""
    issuer, sep, rest = principal.partition("/")
    if not sep or not issuer or not rest:
        raise ValueError(
            f"{_q(principal)} is not ISSUER/NAMESPACE/SERVICE_ACCOUNT or ISSUER/SUBJECT"
        )
    kind = issuers.get(issuer)
    if kind is None:
        raise LookupError(f"issuer {_q(issuer)} is not configured (configured: {sorted(issuers)})")
    if kind == "oidc":
        return subject_identity(issuer, kind, subject=rest)
    namespace, sep, service_account = rest.partition("/")
    if not sep or not namespace or not service_account or "/" in service_account:
        raise ValueError(f"{_q(principal)} is not ISSUER/NAMESPACE/SERVICE_ACCOUNT")
    return subject_identity(issuer, kind, namespace=namespace, service_account=service_account)


# --- differences between tables (audit, dry runs, the CLI) ---------------------------------------


@dataclass(frozen=True, slots=True)
class RoleChange:
    """One role added, removed or changed; ``details`` says what changed, readably."""

    name: str
    kind: str  # "added" | "removed" | "changed"
    details: tuple[str, ...] = ()

    def to_data(self) -> dict[str, Any]:
        return {"role": self.name, "change": self.kind, "details": list(self.details)}


@dataclass(frozen=True, slots=True)
class TableDiff:
    """What turns one table into another, role by role (sorted by name)."""

    changes: tuple[RoleChange, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    @property
    def names(self) -> tuple[str, ...]:
        """Every role added, removed or changed."""
        return tuple(c.name for c in self.changes)

    def lines(self) -> list[str]:
        """Readable lines: ``+ name (...)``, ``- name``, ``~ name: field old -> new``."""
        mark = {"added": "+", "removed": "-", "changed": "~"}
        out: list[str] = []
        for c in self.changes:
            if c.kind == "changed":
                out.extend(f"~ {c.name}: {d}" for d in c.details)
            else:
                extra = f" ({'; '.join(c.details)})" if c.details else ""
                out.append(f"{mark[c.kind]} {c.name}{extra}")
        return out

    def to_data(self) -> list[dict[str, Any]]:
        return [c.to_data() for c in self.changes]


def _subject_text(entry: Mapping[str, Any]) -> str:
    if "subject" in entry:
        return f"{entry['issuer']}/{entry['subject']}"
    return f"{entry['issuer']}/{entry.get('namespace')}/{entry.get('service_account')}"


def _item_text(key: str, item: Any) -> str:
    return _subject_text(item) if key == "subjects" else str(item)


def _summary(role: Role) -> tuple[str, ...]:
    d = role_to_dict(role)
    return (
        f"service_account {d['service_account']}",
        f"lifetime {d['lifetime']}",
        "subjects " + ", ".join(_subject_text(s) for s in d["subjects"]),
    )


def _role_details(before: Role, after: Role) -> tuple[str, ...]:
    a, b = role_to_dict(before), role_to_dict(after)
    out: list[str] = []
    for key in a:
        old, new = a[key], b[key]
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            old_items = [_item_text(key, x) for x in old]
            new_items = [_item_text(key, x) for x in new]
            out.extend(f"{key} - {x}" for x in old_items if x not in new_items)
            out.extend(f"{key} + {x}" for x in new_items if x not in old_items)
            if sorted(old_items) == sorted(new_items):
                out.append(f"{key} reordered")
        else:
            out.append(f"{key} {_q(old)} -> {_q(new)}")
    return tuple(out)


def diff_tables(before: RoleTable | None, after: RoleTable) -> TableDiff:
    """The role-by-role difference from ``before`` (None: no table yet) to ``after``."""
    old = {r.name: r for r in (before.roles if before is not None else ())}
    new = {r.name: r for r in after.roles}
    changes: list[RoleChange] = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None and b is not None:
            changes.append(RoleChange(name, "added", _summary(b)))
        elif b is None:
            changes.append(RoleChange(name, "removed"))
        elif a is not None and a != b:
            changes.append(RoleChange(name, "changed", _role_details(a, b)))
    return TableDiff(tuple(changes))


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
