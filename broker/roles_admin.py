"""Admin use cases of the role table (DESIGN.md §4): read, edit, purge, explain.

Edits are compare-and-set against ETags (the table's digest, or one role's digest), validated
whole with the same rules as roles.yaml, audited as ``roles.changed`` (who, before and after
digest, a readable diff) and followed by a purge of the changed roles' cached tokens. In
``file`` mode the table is read-only here: Git is where it changes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.access import Caller
from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.cache import TokenCache, role_cache_key
from broker.errors import (
    BrokerError,
    Conflict,
    InvalidRequest,
    InvalidScope,
    InvalidSubjectToken,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
)
from broker.exchange import RequestContext
from broker.identity import Verifier
from broker.model import Role, WorkloadIdentity
from broker.policy import (
    NAME_PATTERN,
    Problem,
    RoleRules,
    RoleTable,
    TableDiff,
    check_role_table,
    diff_tables,
    explain,
    role_digest,
    role_to_dict,
    subject_identity,
)
from broker.protocol import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
    WIF_AUDIENCE_PREFIX,
    parse_scope,
    parse_token_request,
)
from broker.roles_effects import PURGED, RoleEffects, problem_text
from broker.roles_source import FileRoleSource, RedisRoleSource, RoleSource
from broker.roles_store import (
    MacKeys,
    NewVersion,
    RedisRoleStore,
    StoredVersion,
    TableIntegrityError,
)
from broker.settings import Settings

log = logging.getLogger(__name__)

_NAME_RE = re.compile(NAME_PATTERN)
_EMAIL_RE = re.compile(r"^[^\s@]{1,64}@[^\s@]{1,190}$")
EXPLAIN_KEYS = frozenset({"subject", "subject_token", "subject_token_type", "role", "scope"})


class InvalidRoleTable(InvalidRequest):
    """The edit would leave a table that does not validate; ``problems`` lists every error."""

    default_reason = "invalid_role_table"

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        shown = "; ".join(p.message for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"the role table would not be valid: {shown}{more}")
        self.problems = problems
        self.extra = {"problems": [problem_text(p) for p in problems]}


@dataclass(frozen=True, slots=True)
class Preconditions:
    """``If-Match`` / ``If-None-Match`` as sets of bare ETag values (``*`` included); None when
    the header is absent."""

    if_match: frozenset[str] | None = None
    if_none_match: frozenset[str] | None = None


@dataclass(frozen=True)
class WriteResult:
    """The table after an edit (or what it would be, for a dry run)."""

    table: RoleTable
    previous: str | None
    diff: TableDiff
    changed: bool
    revision: int | None = None
    purged: int = 0
    dry_run: bool = False
    warnings: tuple[Problem, ...] = field(default=())

    def to_data(self) -> dict[str, Any]:
        return {
            "version": self.table.digest,
            "previous_version": self.previous,
            "revision": self.revision,
            "changed": self.changed,
            "dry_run": self.dry_run,
            "diff": self.diff.lines(),
            "changes": self.diff.to_data(),
            "purged": self.purged,
            "warnings": [problem_text(w) for w in self.warnings],
        }


def _matches(tags: frozenset[str], digest: str) -> bool:
    return "*" in tags or digest in tags


def _caller_fields(caller: Caller) -> dict[str, Any]:
    who = caller.identity
    return {
        "subject_verified": True,
        "issuer": who.issuer,
        "subject": who.subject,
        "namespace": who.namespace,
        "kubernetes_service_account": who.service_account,
    }


class RoleAdmin:
    """Reads and edits of the role table, cache purges, and explain, for the HTTP API."""

    def __init__(
        self,
        *,
        source: RoleSource,
        rules: RoleRules,
        verifier: Verifier,
        audit: AuditLog,
        cache: TokenCache,
        effects: RoleEffects,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.rules = rules
        self._verifier = verifier
        self._audit = audit
        self._cache = cache
        self._effects = effects
        self._clock = clock

    # -- reads --------------------------------------------------------------------------------

    def table(self) -> RoleTable:
        """The table in effect, caught up with the source first.

        A newer table is loaded now rather than at the next poll (one revision read when there
        is none), so a read right after a write made through another worker or replica shows
        it, and its ETag fits the next edit. When the source cannot be read, the table this
        worker enforces is still the right answer (logged; the poller keeps trying)."""
        self.source.refresh_or_log()
        return self.source.current()

    def role(self, name: str) -> Role:
        """The role called ``name`` (:class:`NotFound` otherwise), caught up as :meth:`table`."""
        found = self.table().get(name)
        if found is None:
            raise NotFound(f"no role {name!r}")
        return found

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The newest stored versions (redis mode), newest first, each verified."""
        store = self._store()
        out: list[dict[str, Any]] = []
        for entry in store.history(limit):
            if isinstance(entry, TableIntegrityError):
                out.append({"verified": False, "problem": str(entry)})
            else:
                out.append(
                    {"verified": True, **entry.meta(), "changed_at": rfc3339(entry.changed_at)}
                )
        return out

    def version(self, revision: int) -> dict[str, Any]:
        """One stored version with its table, if still in the history."""
        for entry in self._store().history():
            if isinstance(entry, StoredVersion) and entry.revision == revision:
                return {**entry.meta(), "changed_at": rfc3339(entry.changed_at), **entry.data}
        raise NotFound(f"revision {revision} is not in the history")

    # -- edits --------------------------------------------------------------------------------

    def put_role(
        self, name: str, body: object, pre: Preconditions, caller: Caller, ctx: RequestContext
    ) -> tuple[WriteResult, Role, bool]:
        """Create (``If-None-Match: *``) or replace (``If-Match``) one role.

        Returns the result, the role as stored, and whether it was created.
        """
        created: dict[str, bool] = {}

        def edit(base: RoleTable) -> dict[str, Any]:
            existing = base.get(name)
            if pre.if_none_match is not None:
                if "*" not in pre.if_none_match:
                    raise InvalidRequest("only If-None-Match: * is supported")
                if existing is not None:
                    raise PreconditionFailed(
                        f'role {name!r} already exists (ETag "{role_digest(existing)}"); '
                        "replace it with If-Match",
                    )
            elif pre.if_match is not None:
                if existing is None:
                    raise PreconditionFailed(
                        f"role {name!r} does not exist; create it with If-None-Match: *"
                    )
                if not _matches(pre.if_match, role_digest(existing)):
                    raise PreconditionFailed(
                        f"role {name!r} changed since it was read (its ETag is now "
                        f'"{role_digest(existing)}"); read it again and retry',
                    )
            created["created"] = existing is None
            roles = [role_to_dict(r) for r in base.roles]
            new = dict(body) if isinstance(body, dict) else {}
            new["name"] = name
            if existing is None:
                roles.append(new)
            else:
                roles = [new if r["name"] == name else r for r in roles]
            return {"roles": roles}

        def check() -> None:
            if not _NAME_RE.fullmatch(name):
                raise InvalidRequest(f"role name {name!r} does not match {NAME_PATTERN}")
            if not isinstance(body, dict):
                raise InvalidRequest("the body must be a JSON object: one role")
            if "name" in body and body["name"] != name:
                raise InvalidRequest(f"the body names role {body['name']!r} but the URL {name!r}")
            if pre.if_match is None and pre.if_none_match is None:
                raise PreconditionRequired(
                    f"PUT /v1/roles/{name} needs If-None-Match: * (create) or If-Match: "
                    "<the role's ETag> (replace)"
                )

        result = self._write("put_role", name, caller, ctx, check, edit)
        return result, result.table.get(name) or self.role(name), created.get("created", False)

    def delete_role(
        self, name: str, pre: Preconditions, caller: Caller, ctx: RequestContext
    ) -> WriteResult:
        """Delete one role; ``If-Match`` is required."""

        def check() -> None:
            if pre.if_match is None:
                raise PreconditionRequired(
                    f"DELETE /v1/roles/{name} needs If-Match: <the role's ETag>"
                )

        def edit(base: RoleTable) -> dict[str, Any]:
            existing = base.get(name)
            if existing is None:
                raise NotFound(f"no role {name!r}")
            assert pre.if_match is not None
            if not _matches(pre.if_match, role_digest(existing)):
                raise PreconditionFailed(
                    f"role {name!r} changed since it was read (its ETag is now "
                    f'"{role_digest(existing)}"); read it again and retry',
                )
            return {"roles": [role_to_dict(r) for r in base.roles if r.name != name]}

        return self._write("delete_role", name, caller, ctx, check, edit)

    def put_table(
        self,
        body: object,
        pre: Preconditions,
        caller: Caller,
        ctx: RequestContext,
        *,
        dry_run: bool = False,
    ) -> WriteResult:
        """Replace the whole table (``If-Match``: the table's ETag), or with ``dry_run`` only
        say what would change (any mode, no precondition needed)."""
        if dry_run:
            base = self.table()  # caught up, like a read: the ETag it checks is a read's
            if pre.if_match is not None and not _matches(pre.if_match, base.digest):
                raise PreconditionFailed(self._stale_table(base.digest))
            table, warnings = self._validate(body, "PUT /v1/roles (dry run)")
            diff = diff_tables(base, table)
            return WriteResult(
                table=table,
                previous=base.digest,
                diff=diff,
                changed=bool(diff),
                revision=self.source.revision,
                dry_run=True,
                warnings=warnings,
            )

        def check() -> None:
            if pre.if_match is None:
                raise PreconditionRequired(
                    "PUT /v1/roles needs If-Match: <the table's ETag> (GET /v1/roles)"
                )

        def edit(base: RoleTable) -> dict[str, Any]:
            assert pre.if_match is not None
            if not _matches(pre.if_match, base.digest):
                raise PreconditionFailed(self._stale_table(base.digest))
            return body if isinstance(body, dict) else {"roles": body}

        return self._write("put_table", None, caller, ctx, check, edit, whole=True)

    @staticmethod
    def _stale_table(digest: str) -> str:
        return (
            f'the role table changed since it was read (its ETag is now "{digest}"); '
            "read it again and retry"
        )

    def _validate(self, data: object, source: str) -> tuple[RoleTable, tuple[Problem, ...]]:
        """The table ``data`` describes and its warnings, or :class:`InvalidRoleTable`."""
        result = check_role_table(data, source=source, rules=self.rules)
        if result.table is None:
            raise InvalidRoleTable(result.errors)
        return result.table, result.warnings

    def _store_or_conflict(self) -> RedisRoleSource:
        if not isinstance(self.source, RedisRoleSource):
            location = getattr(self.source, "location", "roles.yaml")
            raise Conflict(
                f"roles.source is file: the role table is read from {location} (edit it in Git; "
                "it reloads by itself); the API is read-only in this mode",
                reason="read_only",
            )
        return self.source

    def _store(self) -> RedisRoleStore:
        return self._store_or_conflict().store

    def _write(
        self,
        operation: str,
        role: str | None,
        caller: Caller,
        ctx: RequestContext,
        check: Callable[[], None],
        edit: Callable[[RoleTable], object],
        *,
        whole: bool = False,
    ) -> WriteResult:
        seen: dict[str, Any] = {}
        try:
            source = self._store_or_conflict()
            check()

            def build(
                before: StoredVersion | None, problem: TableIntegrityError | None
            ) -> NewVersion | None:
                base = self._base(before, problem, whole=whole)
                data = edit(base)
                table, warnings = self._validate(data, f"{operation} by {caller.principal}")
                seen.update(base=base, table=table, warnings=warnings)
                if problem is None and base.digest == table.digest and before is not None:
                    return None
                return NewVersion(
                    data=table.to_data(),
                    digest=table.digest,
                    changed_by=caller.principal,
                    operation=operation,
                )

            _, after = source.store.commit(build)
        except BrokerError as exc:
            self._effects.append(
                self._record(
                    ctx,
                    caller,
                    event="roles.changed",
                    decision="denied" if exc.status < 500 else "error",
                    reason=exc.reason,
                    role=role,
                    details={
                        "operation": operation,
                        "by": caller.principal,
                        "error": exc.description,
                    },
                )
            )
            raise
        base, table = seen["base"], seen["table"]
        diff = diff_tables(base, table)
        if after is None:
            return WriteResult(
                table, base.digest, diff, False, source.revision, warnings=seen["warnings"]
            )
        purged = self._effects.took_effect(base, table, request_id=ctx.request_id)
        try:
            source.refresh()  # this worker serves the new table at once; others within 1 s
        except BrokerError as exc:
            # Committed already, and the watcher will pick it up: not the caller's failure.
            log.warning(
                "roles: committed revision %d; local reload failed: %s",
                after.revision,
                exc.description,
            )
        self._effects.append(
            self._record(
                ctx,
                caller,
                event="roles.changed",
                decision="issued",
                reason=operation,
                role=role,
                details={
                    "operation": operation,
                    "by": caller.principal,
                    "version": table.digest,
                    "previous_version": base.digest,
                    "revision": after.revision,
                    "diff": diff.lines(),
                    "purged": purged,
                },
            )
        )
        return WriteResult(
            table, base.digest, diff, True, after.revision, purged, warnings=seen["warnings"]
        )

    def _base(
        self, before: StoredVersion | None, problem: TableIntegrityError | None, *, whole: bool
    ) -> RoleTable:
        """The table an edit applies to. A stored version that fails its MAC, or no longer
        validates, can only be replaced whole, against the table this broker serves."""
        if problem is not None:
            if not whole:
                raise Conflict(
                    f"the stored role table failed its integrity check ({problem}); replace the "
                    "whole table (PUT /v1/roles, token-broker roles apply --prune)",
                    reason="integrity",
                )
            return self.source.current()
        if before is None:
            return RoleTable(roles=(), source="redis")
        result = check_role_table(before.data, source="redis", rules=self.rules)
        if result.table is None:
            if not whole:
                raise Conflict(
                    "the stored role table no longer passes validation ("
                    + "; ".join(p.message for p in result.errors[:3])
                    + "); replace the whole table (PUT /v1/roles)",
                    reason="invalid_stored_table",
                )
            return self.source.current()
        return result.table

    # -- cache purge --------------------------------------------------------------------------

    def purge(self, body: object, caller: Caller, ctx: RequestContext) -> dict[str, Any]:
        """Drop cached tokens of one role or one GCP service account now."""
        if (
            not isinstance(body, dict)
            or len(body) != 1
            or not body.keys()
            <= {
                "role",
                "service_account",
            }
        ):
            raise InvalidRequest('the body must be {"role": NAME} or {"service_account": EMAIL}')
        table = self.source.current()
        role, sa = body.get("role"), body.get("service_account")
        if role is not None:
            if not isinstance(role, str) or not _NAME_RE.fullmatch(role):
                raise InvalidRequest(f"role must match {NAME_PATTERN}")
            current = table.get(role)
            also = [role_cache_key(current)] if current is not None else []
            count = self._cache.purge_role(role, also=also)
        else:
            if not isinstance(sa, str) or not _EMAIL_RE.fullmatch(sa):
                raise InvalidRequest("service_account must be an email")
            also = [role_cache_key(r) for r in table.roles if r.service_account == sa]
            count = self._cache.purge_service_account(sa, also=also)
        PURGED.labels("api").inc(count)
        target = {"role": role} if role is not None else {"service_account": sa}
        self._effects.append(
            self._record(
                ctx,
                caller,
                event="cache.purged",
                decision="issued",
                reason="purged",
                role=role,
                service_account=sa,
                details={"by": caller.principal, "purged": count, "trigger": "api"},
            )
        )
        return {"purged": count, **target}

    # -- explain ------------------------------------------------------------------------------

    def explain(self, body: object) -> dict[str, Any]:
        """The decision the token endpoint would take, with every reason, without minting.

        ``{"subject_token"}`` goes through the token endpoint's own parsing and verification
        (exchange audiences, so an admin-audience token is refused as it would be there);
        ``{"subject"}`` builds the identity such a token would yield.
        """
        if not isinstance(body, dict) or not body.keys() <= EXPLAIN_KEYS:
            extra = sorted(set(body) - EXPLAIN_KEYS) if isinstance(body, dict) else []
            raise InvalidRequest(
                f"explain takes subject or subject_token, and optionally role and scope"
                f"{f' (unknown: {extra})' if extra else ''}",
            )
        if ("subject" in body) == ("subject_token" in body):
            raise InvalidRequest("give exactly one of subject or subject_token")
        for key in ("role", "scope", "subject_token", "subject_token_type"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise InvalidRequest(f"{key} must be a string")
        role, scope = body.get("role"), body.get("scope")
        table = self.source.current()
        try:
            if "subject_token" in body:
                params = {
                    "grant_type": [GRANT_TYPE_TOKEN_EXCHANGE],
                    "subject_token": [body["subject_token"] or ""],
                    "subject_token_type": [body.get("subject_token_type") or TOKEN_TYPE_JWT],
                }
                if role:
                    params["audience"] = [role]
                if scope:
                    params["scope"] = [scope]
                request = parse_token_request(params)
                identity = self._verifier.verify(request.subject_token)
                requested = request.requested_role
            else:
                identity = self._subject(body["subject"])
                parse_scope(scope)
                audience = (role or "").strip()
                requested = (
                    None if not audience or audience.startswith(WIF_AUDIENCE_PREFIX) else audience
                )
        except BrokerError as exc:
            # A refusal the token endpoint would give is an answer; a malformed explain
            # request (or a broker failure) is an error of this call.
            refusal = isinstance(exc, InvalidSubjectToken | InvalidScope) or (
                "subject_token" in body and exc.status < 500
            )
            if not refusal:
                raise
            return {
                "decision": "deny",
                "role": None,
                "requested_role": role or None,
                "reason": exc.reason,
                "error": exc.error,
                "reasons": [exc.description],
                "version": table.digest,
            }
        decision = explain(table, identity, requested_role=requested, now=self._clock())
        out: dict[str, Any] = {
            "decision": "allow" if decision.allowed else "deny",
            "role": decision.role.name if decision.role is not None else None,
            "requested_role": requested,
            "reason": decision.reason,
            "error": None if decision.allowed else "invalid_target",
            "reasons": list(decision.reasons),
            "subject": identity.principal,
            "version": table.digest,
        }
        if decision.role is not None:
            out.update(
                service_account=decision.role.service_account,
                scopes=list(decision.role.scopes),
                lifetime_s=decision.role.lifetime_s,
            )
        return out

    def _subject(self, subject: object) -> WorkloadIdentity:
        if not isinstance(subject, dict) or not all(isinstance(v, str) for v in subject.values()):
            raise InvalidRequest(
                'subject must be {"issuer","namespace","service_account"} or '
                '{"issuer","subject"} (strings)',
            )
        allowed = {"issuer", "namespace", "service_account", "subject"}
        if not subject.keys() <= allowed or "issuer" not in subject:
            raise InvalidRequest(
                'subject must be {"issuer","namespace","service_account"} or {"issuer","subject"}',
            )
        issuer = subject["issuer"]
        kind = self.rules.issuers.get(issuer)
        if kind is None:
            raise InvalidSubjectToken(
                f"issuer {issuer!r} is not configured (configured: {sorted(self.rules.issuers)})",
                reason="unknown_issuer",
            )
        shape = "oidc" if "subject" in subject else "kubernetes"
        if shape != kind:
            need = "subject" if kind == "oidc" else "namespace and service_account"
            raise InvalidRequest(f"issuer {issuer!r} is of kind {kind}: give {need}")
        try:
            return subject_identity(
                issuer,
                kind,
                namespace=subject.get("namespace"),
                service_account=subject.get("service_account"),
                subject=subject.get("subject"),
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

    # -- records ------------------------------------------------------------------------------

    def _record(
        self,
        ctx: RequestContext,
        caller: Caller,
        *,
        event: str,
        decision: str,
        reason: str,
        role: str | None = None,
        service_account: str | None = None,
        details: Mapping[str, Any],
    ) -> AuditRecord:
        return AuditRecord(
            time=rfc3339(self._clock()),
            request_id=ctx.request_id,
            event=event,
            decision=decision,
            reason=reason,
            role=role,
            service_account=service_account,
            client_ip=ctx.client_ip,
            user_agent=(ctx.user_agent or "")[:256] or None,
            details=dict(details),
            **_caller_fields(caller),
        )


def build_role_admin(
    settings: Settings,
    *,
    client: redis.Redis,
    env: Mapping[str, str],
    verifier: Verifier,
    audit: AuditLog,
    cache: TokenCache,
    clock: Callable[[], float] = time.time,
) -> RoleAdmin:
    """The role source ``roles.source`` names, with its effects, behind the admin use cases.

    ``file`` reads the file now (an invalid one refuses the start); ``redis`` only parses its
    MAC key here and reads Redis on first use. Call ``admin.source.start()`` to watch.
    """
    rules = RoleRules.from_settings(settings)
    effects = RoleEffects(
        audit=audit,
        cache=cache,
        audit_applied_reloads=settings.roles.source == "file",
        clock=clock,
    )
    source: RoleSource
    if settings.roles.source == "redis":
        env_var = settings.roles.mac_key_env
        keys = MacKeys.parse(env.get(env_var, ""), env_var=env_var)
        store = RedisRoleStore(client, keys, prefix=settings.redis.key_prefix, clock=clock)
        source = RedisRoleSource(store, rules, on_reload=effects.on_reload)
    else:
        source = FileRoleSource(
            settings.path(settings.roles.file), rules, on_reload=effects.on_reload
        )
        for warning in source.current().warnings:
            log.warning("roles: %s", warning)
        effects.loaded()
    return RoleAdmin(
        source=source,
        rules=rules,
        verifier=verifier,
        audit=audit,
        cache=cache,
        effects=effects,
        clock=clock,
    )


def check_roles_startup(settings: Settings, env: Mapping[str, str]) -> None:
    """What can refuse a start without connecting: the roles file (``file``) or the MAC key
    (``redis``), each :class:`ConfigError` naming the problem."""
    if settings.roles.source == "redis":
        MacKeys.parse(env.get(settings.roles.mac_key_env, ""), env_var=settings.roles.mac_key_env)
    else:
        FileRoleSource(settings.path(settings.roles.file), RoleRules.from_settings(settings))
