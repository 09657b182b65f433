"""Expected decisions for a role table: ``token-broker roles test FILE CASES`` (CI in the ops
repo). Each case is checked with :func:`broker.policy.explain`, the code the token endpoint
uses, on the identity a verified token of that subject would yield.

Cases file::

    cases:
      - subject: prod-eu/flux-system/source-controller   # ISSUER/NAMESPACE/SA or ISSUER/SUBJECT
        role: flux-source-reader      # optional: the audience the caller asks for
        expect: allow                 # allow | deny
        expect_role: flux-source-reader   # optional (allow): the role granted
        expect_reason: no_role        # optional: allowed | no_role | ambiguous_role |
                                      #   role_not_admitted | unknown_issuer
        name: source-controller pulls charts   # optional label
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import ConfigError
from broker.model import Decision
from broker.policy import RoleTable, explain, principal_identity

CASE_KEYS = frozenset({"name", "subject", "role", "expect", "expect_role", "expect_reason"})


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    subject: str
    expect: str  # allow | deny
    role: str | None = None
    expect_role: str | None = None
    expect_reason: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"cases[{self.index}]"


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    decision: Decision
    passed: bool
    mismatch: str | None = None  # why it failed

    def to_data(self) -> dict[str, Any]:
        return {
            "case": self.case.label,
            "subject": self.case.subject,
            "role": self.case.role,
            "expected": self.case.expect,
            "decision": "allow" if self.decision.allowed else "deny",
            "granted_role": self.decision.role.name if self.decision.role else None,
            "reason": self.decision.reason,
            "passed": self.passed,
            "mismatch": self.mismatch,
            "reasons": list(self.decision.reasons),
        }


def parse_cases(data: object, *, source: str) -> list[Case]:
    """Validate a parsed cases file; every problem at once (:class:`ConfigError`)."""
    entries = data.get("cases") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) != {"cases"}:
        raise ConfigError(source, ['expected a mapping with only a "cases" list'])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(source, ["cases: expected a non-empty list"])
    problems: list[str] = []
    cases: list[Case] = []
    for i, e in enumerate(entries):
        where = f"cases[{i}]"
        before = len(problems)
        if not isinstance(e, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        problems.extend(f"{where}.{k}: unknown key" for k in e if k not in CASE_KEYS)
        for key in CASE_KEYS:
            if e.get(key) is not None and not isinstance(e[key], str):
                problems.append(f"{where}.{key}: expected a string")
        if not isinstance(e.get("subject"), str) or not e["subject"]:
            problems.append(f"{where}.subject: required (ISSUER/NAMESPACE/SA or ISSUER/SUBJECT)")
        if e.get("expect") not in ("allow", "deny"):
            problems.append(f"{where}.expect: required, allow or deny")
        if e.get("expect") == "deny" and e.get("expect_role") is not None:
            problems.append(f"{where}.expect_role: only with expect: allow")
        if len(problems) != before:
            continue
        cases.append(
            Case(
                index=i,
                subject=e["subject"],
                expect=e["expect"],
                role=e.get("role"),
                expect_role=e.get("expect_role"),
                expect_reason=e.get("expect_reason"),
                name=e.get("name"),
            )
        )
    if problems:
        raise ConfigError(source, problems)
    return cases


def run_case(table: RoleTable, case: Case, issuers: Mapping[str, str], now: float) -> CaseResult:
    """Decide one case and compare with what it expects."""
    try:
        identity = principal_identity(case.subject, issuers)
    except LookupError as exc:
        decision = Decision(False, None, "unknown_issuer", (str(exc),))
    except ValueError as exc:
        decision = Decision(False, None, "malformed_subject", (str(exc),))
    else:
        decision = explain(table, identity, requested_role=case.role, now=now)
    got = "allow" if decision.allowed else "deny"
    mismatch = None
    if got != case.expect:
        mismatch = f"expected {case.expect}, got {got} ({decision.reasons[0]})"
    elif case.expect == "allow":
        want = case.expect_role or case.role
        granted = decision.role.name if decision.role else None
        if want is not None and granted != want:
            mismatch = f"expected role {want!r}, got {granted!r}"
    if mismatch is None and case.expect_reason and decision.reason != case.expect_reason:
        mismatch = f"expected reason {case.expect_reason}, got {decision.reason}"
    return CaseResult(case, decision, mismatch is None, mismatch)


def run_cases(
    table: RoleTable, cases: list[Case], issuers: Mapping[str, str], now: float
) -> list[CaseResult]:
    return [run_case(table, c, issuers, now) for c in cases]
