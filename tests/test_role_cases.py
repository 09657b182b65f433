"""Tests for broker.role_cases: the expected-decision tables of `token-broker roles test`."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.policy import RoleRules, check_role_table
from broker.role_cases import parse_cases, run_cases

SA = "x@p.iam.gserviceaccount.com"
ISSUERS = {"prod": "kubernetes", "ci": "oidc"}
RULES = RoleRules(issuers=ISSUERS, allowed_service_accounts=("*@p.iam.gserviceaccount.com",))
TABLE = check_role_table(
    {
        "roles": [
            {
                "name": "flux",
                "subjects": [{"issuer": "prod", "namespace": "flux-system", "service_account": "sc"}],
                "service_account": SA,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "1h",
            },
            {
                "name": "deploy",
                "subjects": [{"issuer": "ci", "subject": "repo:org/app:*"}],
                "service_account": SA,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "1h",
            },
        ]
    },
    source="t",
    rules=RULES,
).table_or_raise()


def run(*cases: dict) -> list:
    return run_cases(TABLE, parse_cases({"cases": list(cases)}, source="c.yaml"), ISSUERS, 0.0)


def test_cases_pass_and_fail_with_reasons() -> None:
    results = run(
        {"subject": "prod/flux-system/sc", "expect": "allow", "expect_role": "flux"},
        {"subject": "ci/repo:org/app:ref/heads/main", "expect": "allow", "expect_role": "deploy"},
        {"subject": "prod/flux-system/sc", "role": "deploy", "expect": "deny",
         "expect_reason": "role_not_admitted"},
        {"subject": "prod/other/sc", "expect": "allow", "name": "wrong"},
        {"subject": "prod/flux-system/sc", "expect": "allow", "expect_role": "deploy"},
        {"subject": "prod/flux-system/sc", "expect": "allow", "expect_reason": "no_role"},
        {"subject": "prod/too/many/parts", "expect": "deny", "expect_reason": "malformed_subject"},
        {"subject": "nowhere/a/b", "expect": "deny", "expect_reason": "unknown_issuer"},
    )
    assert [r.passed for r in results] == [True, True, True, False, False, False, True, True]
    assert results[3].mismatch.startswith("expected allow, got deny (no role admits prod/other/sc")
    assert results[3].case.label == "wrong" and results[4].case.label == "cases[4]"
    assert results[4].mismatch == "expected role 'deploy', got 'flux'"
    assert results[5].mismatch == "expected reason no_role, got allowed"
    assert results[0].to_data()["granted_role"] == "flux"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"cases": []}, "non-empty list"),
        ({"cases": [], "extra": 1}, 'only a "cases" list'),
        ({"cases": ["x"]}, "cases[0]: expected a mapping"),
        ({"cases": [{"expect": "allow"}]}, "cases[0].subject: required"),
        ({"cases": [{"subject": "a/b/c", "expect": "yes"}]}, "cases[0].expect"),
        ({"cases": [{"subject": "a/b/c", "expect": "deny", "expect_role": "r"}]}, "only with expect: allow"),
        ({"cases": [{"subject": "a/b/c", "expect": "deny", "role": 3}]}, "cases[0].role: expected a string"),
    ],
)
def test_bad_case_files_name_the_problem(data, needle) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_cases(data, source="c.yaml")
    assert any(needle in p for p in ei.value.problems), ei.value.problems


def test_a_bare_list_is_accepted() -> None:
    assert len(parse_cases([{"subject": "prod/a/b", "expect": "deny"}], source="c")) == 1
