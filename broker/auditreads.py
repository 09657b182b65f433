"""``audit.read`` records: every read of the audit log leaves one, naming who read and with
which filter, refused reads included (DESIGN.md §5). Never the bearer token itself: its SHA-256.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.access import Caller
from broker.audit import AuditRecord, rfc3339, sha256_hex
from broker.exchange import RequestContext
from broker.identity import Verifier

READ_EVENT = "audit.read"
MAX_PARAMS = 20
MAX_PARAM_CHARS = 256

_CLAIMS = {"iss": "issuer", "sub": "subject", "namespace": "namespace",
           "service_account": "kubernetes_service_account"}


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header ('' when there is none)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def read_record(
    ctx: RequestContext,
    *,
    caller: Caller | None,
    token: str,
    decision: str,
    reason: str,
    details: Mapping[str, Any],
    clock: Callable[[], float] = time.time,
) -> AuditRecord:
    """The ``audit.read`` record of one request. Without a ``caller`` (the token did not
    verify) the claims are read unverified and marked ``subject_verified: false``."""
    who: dict[str, Any]
    if caller is not None:
        ident = caller.identity
        who = {"subject_verified": True, "issuer": ident.issuer, "subject": ident.subject,
               "namespace": ident.namespace,
               "kubernetes_service_account": ident.service_account,
               "kubernetes_service_account_uid": ident.service_account_uid,
               "pod": ident.pod, "pod_uid": ident.pod_uid, "jti": ident.jti}
    else:
        claims = Verifier.unverified_claims(token) if token else {}
        who = {"subject_verified": False}
        who.update({dst: v for src, dst in _CLAIMS.items()
                    if isinstance(v := claims.get(src), str)})
    return AuditRecord(
        time=rfc3339(clock()),
        request_id=ctx.request_id,
        event=READ_EVENT,
        decision=decision,
        reason=reason,
        subject_token_sha256=sha256_hex(token) if token else None,
        client_ip=ctx.client_ip,
        user_agent=(ctx.user_agent or "")[:256] or None,
        latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
        details=dict(details),
        **who,
    )


def params_of(args: Mapping[str, str]) -> dict[str, str]:
    """Request parameters as a refused read's record keeps them (bounded)."""
    out: dict[str, str] = {}
    for key, value in list(args.items())[:MAX_PARAMS]:
        out[str(key)[:64]] = str(value)[:MAX_PARAM_CHARS]
    return out
