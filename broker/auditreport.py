"""The access review auditors do by hand: issuance per role and GCP service account, who was
refused most and why, and which roles were never used, over whole UTC days.

Built from the daily counters that every append keeps (:mod:`broker.auditindex`), so a report
costs O(days) reads (plus the distinct refused subjects), not a pass over the records.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from broker.auditindex import DAY_S, DECISIONS, IndexKeys, day_of
from broker.errors import StoreUnavailable

MAX_DAYS = 400


def days_between(since: float, until: float) -> list[str]:
    """Every UTC day that ``[since, until]`` touches, oldest first (at most ``MAX_DAYS``)."""
    first, last = int(since // DAY_S), int(until // DAY_S)
    first = max(first, last - MAX_DAYS + 1)
    return [day_of(d * DAY_S) for d in range(first, last + 1)]


def _parse(field: object) -> list[Any] | None:
    try:
        value = orjson.loads(field)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, list) and value else None


def build_report(
    client: redis.Redis,
    keys: IndexKeys,
    *,
    since: float,
    until: float,
    roles: Iterable[str],
    top: int = 10,
) -> dict[str, Any]:
    """The report for the days ``[since, until]`` touches; ``roles`` is the role table in
    effect (for ``roles_never_used``). Raises :class:`StoreUnavailable`."""
    days = days_between(since, until)
    try:
        pipe = client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(keys.stats(day))
        hashes = pipe.execute()
        scratch = keys.scratch(secrets.token_hex(8))
        tx = client.pipeline(transaction=True)
        tx.zunionstore(scratch, [keys.refused(d) for d in days])
        tx.zrevrange(scratch, 0, max(0, top - 1), withscores=True)
        tx.zcard(scratch)
        tx.delete(scratch)
        _, top_refused, distinct, _ = tx.execute()
    except redis.RedisError as exc:
        raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc

    totals: Counter[str] = Counter({d: 0 for d in DECISIONS})
    issued: Counter[tuple[str, str]] = Counter()
    refused: Counter[tuple[str, str]] = Counter()
    for raw in hashes:
        for field, value in (raw or {}).items():
            parts, n = _parse(field), int(value)
            if parts is None:
                continue
            if parts[0] == "issued" and len(parts) == 3:
                issued[(str(parts[1]), str(parts[2]))] += n
                totals["issued"] += n
            elif parts[0] == "refused" and len(parts) == 3:
                refused[(str(parts[1]), str(parts[2]))] += n
                totals[str(parts[1])] += n

    per_sa: dict[str, dict[str, Any]] = {}
    for (role, sa), n in issued.items():
        entry = per_sa.setdefault(sa, {"service_account": sa, "count": 0, "roles": []})
        entry["count"] += n
        entry["roles"].append(role)
    used = {role for role, _ in issued}
    table = sorted(set(roles))
    subjects = []
    for member, score in top_refused or []:
        who = _parse(member) or [None, None, False]
        issuer, subject, verified = [*who, None, None, False][:3]
        subjects.append({"issuer": issuer, "subject": subject,
                         "subject_verified": bool(verified), "count": int(score)})
    return {
        "from_day": days[0],
        "to_day": days[-1],
        "days": len(days),
        "totals": dict(totals),
        "issuance": [{"role": r, "service_account": sa, "count": n}
                     for (r, sa), n in sorted(issued.items(), key=lambda x: (-x[1], x[0]))],
        "service_accounts": sorted(
            ({**e, "roles": sorted(e["roles"])} for e in per_sa.values()),
            key=lambda e: (-e["count"], e["service_account"])),
        "refusals": [{"decision": d, "reason": r, "count": n}
                     for (d, r), n in sorted(refused.items(), key=lambda x: (-x[1], x[0]))],
        "refused_subjects": subjects,
        "refused_subjects_distinct": int(distinct or 0),
        "roles_in_table": len(table),
        "roles_never_used": [r for r in table if r not in used],
    }
