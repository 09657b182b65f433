"""The token-exchange use case: request → identity → decision → token → audit → response."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from broker import metrics
from broker.audit import (
    AuditLog,
    AuditRecord,
    ConditionsFailed,
    record_body,
    rfc3339,
    sha256_hex,
)
from broker.cache import TokenCache, cache_key, generation_of
from broker.circuit import Bulkhead
from broker.errors import BrokerError, InvalidTarget, StoreUnavailable
from broker.identity import AUDIT_TEXT_MAX, Verifier
from broker.minting import Minter
from broker.model import AccessToken, MintRequest, Role, WorkloadIdentity
from broker.policy import RoleTable, decide
from broker.protocol import parse_token_request, requested_role, token_response
from broker.ratelimit import MintBudget, RateLimiter
from broker.redisbatch import CommandRecorder, Condition
from broker.redismux import Multiplexer
from broker.refresh import Refresher
from broker.settings import Settings
from broker.tokenmemo import MemoEntry, TokenMemo

# A mint failure is every concurrent waiter's answer, and that of callers in the next second.
SHARE_MINT_FAILURE_S = 1.0
# Reads of the cache per request when purges keep landing between read and issue (then 503).
PURGE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is calling, from the transport's point of view."""

    request_id: str
    client_ip: str | None
    user_agent: str | None
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class _Grant:
    """A request that is being granted a token: who asked, as whom, for which cache key."""

    ctx: RequestContext
    raw_token: str
    identity: WorkloadIdentity
    role: Role
    mint_request: MintRequest
    key: str


@dataclass(frozen=True, slots=True)
class ExchangeResult:
    body: dict[str, Any]
    audit: dict[str, Any]


class TokenExchange:
    """Runs one exchange; every outcome leaves exactly one audit record (denials may fold)."""

    def __init__(
        self,
        *,
        settings: Settings,
        verifier: Verifier,
        roles: Callable[[], RoleTable],
        cache: TokenCache,
        minter: Minter,
        audit: AuditLog,
        limiter: RateLimiter,
        mux: Multiplexer,
        clock: Callable[[], float] = time.time,
        budget: MintBudget | None = None,
        bulkhead: Bulkhead | None = None,
        refresher: Refresher | None = None,
        memo: TokenMemo | None = None,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._roles = roles
        self._cache = cache
        self._minter = minter
        self._audit = audit
        self._limiter = limiter
        self._mux = mux
        self._clock = clock
        self._budget = budget
        self._bulkhead = bulkhead
        self._refresher = refresher
        self._memo = memo
        # The IAM deadline bounds how long a caller waits for someone else's mint.
        self._mint_wait_s = 15.0

    def run(self, params: Mapping[str, list[str]], ctx: RequestContext) -> ExchangeResult:
        """Handle one request; raise :class:`BrokerError` (already audited) on refusal."""
        limits = self._settings.rate_limit
        raw_token = (params.get("subject_token") or [""])[0].strip()
        identity: WorkloadIdentity | None = None
        # Refusals record the role that was asked for (the granted one replaces it below).
        asked = requested_role(params)
        role_name = asked[:AUDIT_TEXT_MAX] if asked else None
        counted = False  # both limits counted (in the hot path's pipeline)
        try:
            if ctx.client_ip:
                # Callers this process already saw over the limit stop here, before any work.
                self._limiter.check_blocked(
                    "client_ip", ctx.client_ip, limits.per_client_ip_per_minute
                )
            request = parse_token_request(params)
            identity = self._verifier.verify(request.subject_token)
            self._limiter.check_blocked(
                "subject", identity.principal, limits.per_subject_per_minute
            )
            now = self._clock()
            decision = decide(
                self._roles(), identity, requested_role=request.requested_role, now=now
            )
            if not decision.allowed or decision.role is None:
                raise InvalidTarget(
                    decision.reasons[0] if decision.reasons else "no role admits this caller",
                    reason=decision.reason,
                )
            role = decision.role
            role_name = role.name
            mint_request = role.mint_request()
            key = cache_key(role.name, mint_request)
            grant = _Grant(ctx, raw_token, identity, role, mint_request, key)
            memo = self._memo.get(key, now) if self._memo is not None else None
            if memo is not None:
                issued = self._issue_memoised(grant, memo)
                if issued is not None:
                    return issued
                # A purge happened since this worker read the token: read Redis again.
            # One round trip counts both rate limits and reads the cache (the hot path).
            counted = True
            cached, generation = self._count_and_read(ctx, identity, key, role.lifetime_s)
            for _ in range(PURGE_RETRIES):
                if cached is not None:
                    token, hit = cached, True
                else:
                    token, hit = self._mint_once(role.name, key, mint_request)
                try:
                    # Issued only if no purge happened since the read (exact purges).
                    return self._issue(
                        grant, token, hit, [self._cache.generation_holds(generation)]
                    )
                except ConditionsFailed:
                    self._forget_memo()
                    cached, generation = self._read(key)  # counted already
            raise StoreUnavailable("the token cache is being purged; retry", retry_after=1)
        except BrokerError as exc:
            final = exc
            # Refusals by the store itself are not counted (in the store that just failed).
            if not counted and not isinstance(exc, StoreUnavailable):
                # Refused before the hot path: the request still counts against the client's
                # IP (so a flood of garbage is cut off, then refused before verification) and,
                # once verified, against the caller; a limit's own refusal is not recounted.
                hits = []
                if ctx.client_ip and exc.reason != "rate_limited_client_ip":
                    hits.append(("client_ip", ctx.client_ip, limits.per_client_ip_per_minute))
                if identity is not None and exc.reason != "rate_limited_subject":
                    hits.append(("subject", identity.principal, limits.per_subject_per_minute))
                try:
                    self._limiter.hit_many(hits)
                except BrokerError as limited:
                    final = limited
            self._audit_failure(final, ctx, raw_token, identity, role_name)
            if final is exc:
                raise
            raise final from exc

    def _issue(
        self,
        grant: _Grant,
        token: AccessToken,
        hit: bool,
        conditions: Sequence[Condition] = (),
        memo: MemoEntry | None = None,
    ) -> ExchangeResult:
        """Record the issuance (with ``conditions``, atomically), then answer with ``token``.

        Raises :class:`ConditionsFailed` (nothing recorded) when one of ``conditions`` fails.
        """
        role = grant.role
        if self._refresher is not None:
            self._refresher.touch(grant.key, role.name, grant.mint_request, token)
        fields = self._record_fields(
            grant.ctx,
            grant.raw_token,
            grant.identity,
            decision="issued",
            reason="issued",
            role=role.name,
            service_account=role.service_account,
            scopes=role.scopes,
            lifetime_s=role.lifetime_s,
            expires_at=memo.expires_at if memo else rfc3339(token.expires_at),
            cache="hit" if hit else "miss",
            access_token_sha256=memo.access_token_sha256 if memo else sha256_hex(token.token),
        )
        record = record_body(**fields)  # the record's dict, without the frozen object
        # Fail closed: the token leaves only once its record is stored.
        stored = self._audit.append(record, conditions)
        metrics.observe(
            "issued", "hit" if hit else "miss", time.perf_counter() - grant.ctx.started
        )
        now = self._clock()
        body = token_response(token.token, int(token.expires_at - now), role.scopes)
        return ExchangeResult(body=body, audit=stored)

    def _issue_memoised(self, grant: _Grant, memo: MemoEntry) -> ExchangeResult | None:
        """Issue a token this worker read from Redis lately: one round trip, in which the audit
        batch counts both rate limits and checks that no purge happened since (all or nothing).
        None when a purge did happen (the memo is dropped; the caller reads Redis again)."""
        limits = self._settings.rate_limit
        client_ip, principal = grant.ctx.client_ip, grant.identity.principal
        hits = [
            h
            for h in (
                self._limiter.guard("client_ip", client_ip, limits.per_client_ip_per_minute)
                if client_ip
                else None,
                self._limiter.guard("subject", principal, limits.per_subject_per_minute),
            )
            if h is not None
        ]
        fresh = self._cache.generation_holds(memo.generation)
        try:
            return self._issue(
                grant, memo.token, True, [*(h.condition for h in hits), fresh], memo
            )
        except ConditionsFailed as failed:
            if fresh in failed.failed:
                self._forget_memo()
                return None
            over = next(h for h in hits if h.condition in failed.failed)
            raise self._limiter.refused(over) from None

    def _count_and_read(
        self, ctx: RequestContext, identity: WorkloadIdentity, key: str, lifetime_s: int
    ) -> tuple[AccessToken | None, str]:
        """Count both rate limits and read the cache entry and the purge generation, in one
        round trip."""
        limits = self._settings.rate_limit
        pipe: Any = CommandRecorder()  # redis-py command methods, recorded
        by_ip = (
            self._limiter.queue(pipe, "client_ip", ctx.client_ip, limits.per_client_ip_per_minute)
            if ctx.client_ip
            else None
        )
        by_subject = self._limiter.queue(
            pipe, "subject", identity.principal, limits.per_subject_per_minute
        )
        read = self._queue_read(pipe, key)
        try:
            results = self._run(pipe)
        except StoreUnavailable:
            self._limiter.write_failed()
            raise
        self._limiter.settle(by_ip, results)
        self._limiter.settle(by_subject, results)
        return self._received(key, results, read, lifetime_s)

    def _read(self, key: str) -> tuple[AccessToken | None, str]:
        """The cache entry and the purge generation, read again (nothing counted, nothing
        memoised)."""
        pipe: Any = CommandRecorder()
        read = self._queue_read(pipe, key)
        return self._received(key, self._run(pipe), read, None)

    def _queue_read(self, pipe: Any, key: str) -> tuple[int, int]:
        """Queue the reads of the purge generation, then of ``key``'s entry (in that order: see
        broker/tokenmemo.py); their reply positions."""
        return self._cache.queue_generation(pipe), self._cache.queue_get(pipe, key)

    def _run(self, pipe: Any) -> list[Any]:
        """``pipe``'s replies, sharing the worker's round trip; :class:`StoreUnavailable`."""
        try:
            return self._mux.run(pipe)
        except redis.RedisError as exc:
            raise StoreUnavailable(
                f"store unavailable ({type(exc).__name__})", retry_after=1
            ) from exc

    def _received(
        self, key: str, results: list[Any], read: tuple[int, int], lifetime_s: int | None
    ) -> tuple[AccessToken | None, str]:
        """The token and the generation it was read under; the token is memoised when servable
        and ``lifetime_s`` (its role's) is given."""
        raw_generation, raw = results[read[0]], results[read[1]]
        token = self._cache.servable(key, raw)
        if raw_generation is None:
            # No generation yet (a new or flushed Redis): write one. Nothing is memoised under
            # "none", so a generation lost later cannot pass for the one read here.
            return token, self._cache.ensure_generation()
        generation = generation_of(raw_generation)
        if token is not None and self._memo is not None and lifetime_s is not None:
            self._remember(key, token, generation, lifetime_s)
        return token, generation

    def _forget_memo(self) -> None:
        """A purge happened since the memoised tokens were read."""
        if self._memo is not None:
            self._memo.clear()

    def _remember(self, key: str, token: AccessToken, generation: str, lifetime_s: int) -> None:
        """Memoise ``token`` while it stays servable, and not past its refresh point (after it,
        callers read Redis again and get the refreshed token)."""
        assert self._memo is not None
        until = token.expires_at - self._settings.cache.min_remaining
        if self._refresher is not None:
            until = min(until, self._refresher.policy.refresh_at(token, lifetime_s))
        self._memo.put(key, token, generation, now=self._clock(), until=until)

    def _mint_once(self, role: str, key: str, request: MintRequest) -> tuple[AccessToken, bool]:
        """A token minted once for every concurrent caller of ``key`` (DESIGN.md §6)."""

        def mint() -> AccessToken:
            if self._budget is not None:
                self._budget.spend(role)
            return self._minter.mint(request)

        with self._admit() as wait_s:
            return self._cache.get_or_mint(
                key, mint, wait_s=wait_s, share_failure_s=SHARE_MINT_FAILURE_S, detach=True
            )

    @contextlib.contextmanager
    def _admit(self) -> Iterator[float]:
        if self._bulkhead is None:
            yield self._mint_wait_s
            return
        with self._bulkhead.admit(self._mint_wait_s) as wait_s:
            yield wait_s

    def refuse(self, exc: BrokerError, ctx: RequestContext) -> BrokerError:
        """Audit a request refused before it could be parsed (body too large, bad JSON); it
        counts against the client's IP like any other. Returns the error to answer with (a
        429 once the IP is over its limit)."""
        final = exc
        if ctx.client_ip:
            limit = self._settings.rate_limit.per_client_ip_per_minute
            try:
                self._limiter.check_blocked("client_ip", ctx.client_ip, limit)
                self._limiter.hit("client_ip", ctx.client_ip, limit)
            except BrokerError as limited:
                final = limited
        self._audit_failure(final, ctx, "", None, None)
        return final

    def _audit_failure(
        self,
        exc: BrokerError,
        ctx: RequestContext,
        raw_token: str,
        identity: WorkloadIdentity | None,
        role_name: str | None,
    ) -> None:
        decision = "denied" if exc.status < 500 else "error"
        metrics.observe(decision, exc.reason, time.perf_counter() - ctx.started)
        record = AuditRecord(
            **self._record_fields(
                ctx, raw_token, identity, decision=decision, reason=exc.reason, role=role_name
            )
        )
        if decision == "denied":
            # Identical denials: same client, reason, token and role asked for.
            fold_key = (
                ctx.client_ip or "", exc.reason, record.subject_token_sha256 or "", role_name or ""
            )
            self._audit.append_denial(record, fold_key)
            return
        # On failure the record is already echoed to stdout with stored: false; the caller
        # gets `exc` either way.
        with contextlib.suppress(StoreUnavailable):
            self._audit.append(record)

    def _record_fields(
        self,
        ctx: RequestContext,
        raw_token: str,
        identity: WorkloadIdentity | None,
        *,
        decision: str,
        reason: str,
        **fields: Any,
    ) -> dict[str, Any]:
        """The fields of this request's audit record (for :class:`AuditRecord` or
        :func:`~broker.audit.record_body`)."""
        claims: dict[str, Any]
        if identity is not None:
            claims = {
                "subject_verified": True,
                "issuer": identity.issuer,
                "subject": identity.subject,
                "namespace": identity.namespace,
                "kubernetes_service_account": identity.service_account,
                "kubernetes_service_account_uid": identity.service_account_uid,
                "pod": identity.pod,
                "pod_uid": identity.pod_uid,
                "jti": identity.jti,
            }
        else:
            claims = {"subject_verified": False, **_unverified(raw_token)}
        if not claims.keys().isdisjoint(fields):
            raise TypeError(f"audit fields given twice: {sorted(claims.keys() & fields.keys())}")
        claims.update(
            time=rfc3339(self._clock()),
            request_id=ctx.request_id,
            event="token.exchange",
            decision=decision,
            reason=reason,
            subject_token_sha256=sha256_hex(raw_token) if raw_token else None,
            client_ip=ctx.client_ip,
            user_agent=(ctx.user_agent or "")[:AUDIT_TEXT_MAX] or None,
            latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
            **fields,
        )
        return claims


_CLAIM_FIELDS = {
    "iss": "issuer",
    "sub": "subject",
    "namespace": "namespace",
    "service_account": "kubernetes_service_account",
    "service_account_uid": "kubernetes_service_account_uid",
    "pod": "pod",
    "pod_uid": "pod_uid",
    "jti": "jti",
}


def _unverified(raw_token: str) -> dict[str, Any]:
    """Claims of a refused token, for the record only (marked subject_verified: false)."""
    if not raw_token:
        return {}
    claims = Verifier.unverified_claims(raw_token)
    out: dict[str, Any] = {}
    for src, dst in _CLAIM_FIELDS.items():
        value = claims.get(src)
        if isinstance(value, str):
            out[dst] = value[:AUDIT_TEXT_MAX]
    return out
