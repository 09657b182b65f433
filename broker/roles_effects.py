"""What follows a change of the role table: a log line, a metric, an audit record, and the
purge of the changed roles' cached tokens (DESIGN.md §3, §6: "a role change purges its cached
tokens")."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.cache import TokenCache, role_cache_key
from broker.errors import StoreUnavailable
from broker.model import Role
from broker.policy import Problem, RoleTable, diff_tables
from broker.roles_source import Reload

log = logging.getLogger(__name__)

# A cached token can only exist for a role definition while some worker serves it; workers
# converge within seconds, so an index entry is kept this much beyond the role's lifetime.
INDEX_MARGIN_S = 300.0

RELOADS = Counter(
    "token_broker_roles_reloads_total",
    "Attempts to take a new role table into use, per worker, by outcome and reason",
    ["source", "outcome", "reason"],
)
PURGED = Counter(
    "token_broker_cache_purged_total",
    "Cached tokens dropped by purges, by trigger (api, role_changed)",
    ["trigger"],
)

# One sample per worker (label pid under gunicorn): replicas and workers that disagree show.
REVISION = Gauge(
    "token_broker_roles_revision",
    "Revision of the Redis role table in effect in this worker",
    multiprocess_mode="liveall",
)

LOADED = Gauge(
    "token_broker_roles_loaded_seconds",
    "Unix time this worker took its current role table into use",
    multiprocess_mode="liveall",
)


def problem_text(p: Problem) -> str:
    """``line 12: roles[0] (x).lifetime: ...`` (the line when the problem has one)."""
    return f"line {p.line}: {p.message}" if p.line is not None else p.message


def new_request_id() -> str:
    return secrets.token_hex(8)


class RoleEffects:
    """Reports reloads and purges the cache of what changed; shared by every source."""

    def __init__(
        self,
        *,
        audit: AuditLog,
        cache: TokenCache,
        audit_applied_reloads: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``audit_applied_reloads``: file mode audits each applied reload (it is the only
        record of the change); redis mode audits the change once, as ``roles.changed``."""
        self._audit = audit
        self._cache = cache
        self._audit_applied = audit_applied_reloads
        self._clock = clock

    # -- reloads ------------------------------------------------------------------------------

    def on_reload(self, event: Reload) -> None:
        """Log, count, purge and audit one reload attempt of this worker."""
        RELOADS.labels(event.source, event.outcome, event.reason).inc()
        purged = 0
        if event.applied and event.after is None:
            self._took_effect_at(event.revision)
        if event.applied and event.after is not None:
            diff = diff_tables(event.before, event.after)
            log.info(
                "roles: %s: new table in effect (version %s, %d role(s)): %s",
                event.location,
                event.after.digest[:12],
                len(event.after.roles),
                "; ".join(diff.lines()) or "no role changed",
            )
            for w in event.problems:
                log.warning("roles: %s: %s", event.location, problem_text(w))
            purged = self.took_effect(event.before, event.after, request_id=new_request_id())
            # Reported once the change has fully taken effect here, purge included.
            self._took_effect_at(event.revision)
            if not self._audit_applied:
                return
            details: dict[str, Any] = {"diff": diff.lines(), "purged": purged}
        else:
            level = logging.CRITICAL if event.integrity else logging.ERROR
            what = "ALARM: role table changed outside the broker" if event.integrity else "invalid"
            for p in event.problems:
                log.log(
                    level,
                    "roles: %s: %s, refused (the table in effect stays): %s",
                    event.location,
                    what,
                    problem_text(p),
                )
            details = {"problems": [problem_text(p) for p in event.problems]}
        decision = "issued" if event.applied else ("error" if event.integrity else "denied")
        details.update(
            source=event.source,
            location=event.location,
            outcome=event.outcome,
            version=event.after.digest if event.after is not None else None,
            previous_version=event.before.digest if event.before is not None else None,
            revision=event.revision,
            changed_by=event.changed_by,
        )
        self.append(
            AuditRecord(
                time=rfc3339(self._clock()),
                request_id=new_request_id(),
                event="roles.reloaded",
                decision=decision,
                reason=event.reason,
                details=details,
            )
        )

    def loaded(self) -> None:
        """Note that this worker has a table in effect (at start, for a file)."""
        LOADED.set(self._clock())

    def _took_effect_at(self, revision: int | None) -> None:
        self.loaded()
        if revision is not None:
            REVISION.set(revision)

    # -- purges -------------------------------------------------------------------------------

    def index(self, roles: Iterable[Role]) -> None:
        """Record which cache keys belong to which role and GCP service account."""
        for r in roles:
            self._cache.index(
                role_cache_key(r),
                role=r.name,
                service_account=r.service_account,
                keep_s=r.lifetime_s + INDEX_MARGIN_S,
            )

    def took_effect(self, before: RoleTable | None, after: RoleTable, *, request_id: str) -> int:
        """Index ``after`` and purge the tokens of every role that changed or went away
        (under its old and new definition). Returns how many entries were dropped; a purge
        that dropped any is audited as ``cache.purged``. Never raises for Redis failures."""
        try:
            self.index(after.roles)
            if before is None:
                return 0
            names = diff_tables(before, after).names
            old = [r for n in names if (r := before.get(n)) is not None]
            self.index(old)
            purged = 0
            for name in names:
                defs = [r for r in (before.get(name), after.get(name)) if r is not None]
                n = self._cache.purge_role(name, also=[role_cache_key(r) for r in defs])
                if n:
                    purged += n
                    PURGED.labels("role_changed").inc(n)
                    self.append(
                        AuditRecord(
                            time=rfc3339(self._clock()),
                            request_id=request_id,
                            event="cache.purged",
                            decision="issued",
                            reason="role_changed",
                            role=name,
                            details={
                                "purged": n,
                                "trigger": "role_changed",
                                "version": after.digest,
                            },
                        )
                    )
            return purged
        except StoreUnavailable as exc:
            log.error("roles: could not purge changed roles' cached tokens: %s", exc.description)
            return 0

    def append(self, record: AuditRecord) -> dict[str, Any] | None:
        """Append; when Redis refuses, the record has gone to stdout (stored: false) and the
        failure is logged rather than raised: the change it describes has already happened."""
        try:
            return self._audit.append(record)
        except StoreUnavailable:
            log.error("roles: audit record %s not stored (Redis unavailable)", record.event)
            return None
