"""Tests for broker.policy: role table validation, decide() and explain()."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.errors import ConfigError
from broker.model import SubjectMatcher, WorkloadIdentity
from broker.policy import (
    RoleRules,
    RoleTable,
    check_role_file,
    check_role_yaml,
    decide,
    diff_tables,
    explain,
    load_role_table,
    load_yaml,
    matches,
    parse_role_table,
    principal_identity,
    role_table_json_schema,
    subject_identity,
)

REPO = Path(__file__).resolve().parents[1]
ISSUERS = {"prod-eu": "kubernetes", "corp-oidc": "oidc"}
ALLOWED = ["*@my-project.iam.gserviceaccount.com"]
NOW = 1_700_000_000.0
SA = "flux-source@my-project.iam.gserviceaccount.com"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"


def role(name: str = "flux-source-reader", **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name,
        "description": "test role",
        "subjects": [
            {
                "issuer": "prod-eu",
                "namespace": "flux-system",
                "service_account": "source-controller",
            }
        ],
        "service_account": SA,
        "scopes": [CLOUD],
        "lifetime": "1h",
    }
    r.update(over)
    return {k: v for k, v in r.items() if v is not _DROP}


_DROP = object()


def parse(data: object, **kw: Any) -> RoleTable:
    args: dict[str, Any] = {
        "source": "roles.yaml",
        "issuers": ISSUERS,
        "allowed_service_accounts": ALLOWED,
    }
    args.update(kw)
    return parse_role_table(data, **args)


def problems(data: object, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(data, **kw)
    assert ei.value.source == "roles.yaml"
    return ei.value.problems


def one_problem(data: object, **kw: Any) -> str:
    found = problems(data, **kw)
    assert len(found) == 1, found
    return found[0]


def k8s(ns: str | None = "flux-system", sa: str | None = "source-controller", **kw: Any):
    base: dict[str, Any] = {
        "issuer_name": "prod-eu",
        "issuer": "https://container.googleapis.com/v1/projects/p/locations/l/clusters/prod",
        "kind": "kubernetes",
        "subject": f"system:serviceaccount:{ns}:{sa}",
        "namespace": ns,
        "service_account": sa,
        "expires_at": NOW + 600,
    }
    base.update(kw)
    return WorkloadIdentity(**base)


def oidc(sub: str, **kw: Any) -> WorkloadIdentity:
    base: dict[str, Any] = {
        "issuer_name": "corp-oidc",
        "issuer": "https://accounts.corp.example",
        "kind": "oidc",
        "subject": sub,
        "expires_at": NOW + 600,
    }
    base.update(kw)
    return WorkloadIdentity(**base)


# --- loading: accepted ---------------------------------------------------------------------------


def test_valid_role_loads() -> None:
    table = parse({"roles": [role(delegates=["hop@my-project.iam.gserviceaccount.com"])]})
    r = table.get("flux-source-reader")
    assert r is not None
    assert r.lifetime_s == 3600
    assert r.scopes == (CLOUD,)
    assert r.service_account == SA
    assert r.delegates == ("hop@my-project.iam.gserviceaccount.com",)
    assert r.subjects == (
        SubjectMatcher("prod-eu", namespace="flux-system", service_account="source-controller"),
    )
    assert table.warnings == ()
    assert table.get("nope") is None
    assert table.source == "roles.yaml"


@pytest.mark.parametrize(
    ("lifetime", "seconds"), [("10m", 600), ("3600s", 3600), (1800, 1800), ("45m", 2700)]
)
def test_lifetime_forms(lifetime: object, seconds: int) -> None:
    table = parse({"roles": [role(lifetime=lifetime)]})
    assert table.roles[0].lifetime_s == seconds


def test_extended_lifetime_allowed_when_enabled() -> None:
    table = parse({"roles": [role(lifetime="12h")]}, allow_extended_lifetime=True)
    assert table.roles[0].lifetime_s == 12 * 3600


@pytest.mark.parametrize(
    "sa",
    [
        "my-project@appspot.gserviceaccount.com",
        "123456789-compute@developer.gserviceaccount.com",
        "sa-name@proj.example.com.iam.gserviceaccount.com",
    ],
)
def test_other_service_account_forms(sa: str) -> None:
    table = parse({"roles": [role(service_account=sa)]}, allowed_service_accounts=["*"])
    assert table.roles[0].service_account == sa


def test_empty_table_loads_with_warning() -> None:
    table = parse({"roles": []})
    assert table.roles == ()
    assert any("every token request will be denied" in w for w in table.warnings)


def test_round_trip_through_to_data() -> None:
    table = parse({"roles": [role(), role("other", lifetime="45m", delegates=[])]})
    again = parse(table.to_data())
    assert again.roles == table.roles
    assert again.digest == table.digest


# --- loading: rejected ---------------------------------------------------------------------------

LABEL = "roles[0] (flux-source-reader)"


def test_unknown_top_level_key() -> None:
    assert one_problem({"roles": [role()], "rolez": []}) == "rolez: unknown key"


def test_top_level_not_a_mapping() -> None:
    assert "(top level)" in one_problem(None)
    assert "(top level)" in one_problem(["roles"])


def test_roles_missing_or_not_a_list() -> None:
    assert one_problem({}) == "roles: required"
    assert one_problem({"roles": {"a": 1}}).startswith("roles: expected a list")


def test_unknown_role_key() -> None:
    assert one_problem({"roles": [role(lifetme="1h")]}) == f"{LABEL}.lifetme: unknown key"


def test_unknown_subject_key() -> None:
    subj = {"issuer": "prod-eu", "namespace": "a", "service_account": "b", "pod": "x"}
    assert one_problem({"roles": [role(subjects=[subj])]}) == (
        f"{LABEL}.subjects[0].pod: unknown key"
    )


@pytest.mark.parametrize("field", ["name", "subjects", "service_account", "scopes", "lifetime"])
def test_missing_required_field(field: str) -> None:
    label = "roles[0]" if field == "name" else LABEL
    assert one_problem({"roles": [role(**{field: _DROP})]}) == f"{label}.{field}: required"


@pytest.mark.parametrize("name", ["Flux", "a_b", "x" * 64, "", "a b", 7, "a\n"])
def test_bad_names(name: object) -> None:
    msg = one_problem({"roles": [role(name=name)]})
    assert ".name:" in msg and "[a-z0-9-]{1,63}" in msg
    assert msg.startswith("roles[0]")


def test_duplicate_names() -> None:
    msg = one_problem({"roles": [role("a"), role("b"), role("a")]})
    assert msg == "roles[2] (a).name: duplicate of roles[0]"


@pytest.mark.parametrize(
    "sa",
    [
        "flux-source",
        "flux-source@my-project",
        "Flux@my-project.iam.gserviceaccount.com",
        "flux source@my-project.iam.gserviceaccount.com",
        "flux@my-project.iam.gserviceaccount.com.evil.example",
        "flux@example.com",
        "@my-project.iam.gserviceaccount.com",
    ],
)
def test_malformed_service_account(sa: str) -> None:
    msg = one_problem({"roles": [role(service_account=sa)]}, allowed_service_accounts=["*"])
    assert msg.startswith(f"{LABEL}.service_account: ")
    assert "is not a service-account email" in msg


def test_service_account_not_a_string() -> None:
    msg = one_problem({"roles": [role(service_account=["a"])]})
    assert msg.startswith(f"{LABEL}.service_account: expected")


def test_service_account_outside_allowed() -> None:
    msg = one_problem({"roles": [role(service_account="x@other-project.iam.gserviceaccount.com")]})
    assert msg.startswith(f"{LABEL}.service_account: ")
    assert "gcp.allowed_service_accounts" in msg


def test_allowed_service_accounts_is_case_sensitive() -> None:
    msg = one_problem(
        {"roles": [role()]}, allowed_service_accounts=["*@MY-PROJECT.iam.gserviceaccount.com"]
    )
    assert "gcp.allowed_service_accounts" in msg


@pytest.mark.parametrize(
    ("delegates", "where"),
    [
        ("hop@my-project.iam.gserviceaccount.com", "delegates: expected a list"),
        (["not-an-email"], "delegates[0]: "),
        (["hop@other.iam.gserviceaccount.com"], "delegates[0]: "),
        ([3], "delegates[0]: expected a string"),
        ([SA], "delegates: must not contain"),
        (
            ["h@my-project.iam.gserviceaccount.com", "h@my-project.iam.gserviceaccount.com"],
            "delegates: ",
        ),
    ],
)
def test_bad_delegates(delegates: object, where: str) -> None:
    msg = one_problem({"roles": [role(delegates=delegates)]})
    assert msg.startswith(f"{LABEL}.{where}"), msg


@pytest.mark.parametrize(
    ("scopes", "where"),
    [
        ([], "scopes: at least one"),
        (CLOUD, "scopes: expected a list"),
        (["cloud-platform"], "scopes[0]: "),
        (["http://www.googleapis.com/auth/cloud-platform"], "scopes[0]: "),
        (["https://www.googleapis.com/auth/"], "scopes[0]: "),
        (["https://www.googleapis.com.evil/auth/x"], "scopes[0]: "),
        ([CLOUD, "https://www.googleapis.com/authx"], "scopes[1]: "),
        ([CLOUD, CLOUD], "scopes: "),
    ],
)
def test_bad_scopes(scopes: object, where: str) -> None:
    msg = one_problem({"roles": [role(scopes=scopes)]})
    assert msg.startswith(f"{LABEL}.{where}"), msg


def test_lifetime_above_maximum_message() -> None:
    data = {"roles": [role("a"), role("b"), role("flux-source-reader", lifetime="13h")]}
    assert one_problem(data) == (
        "roles[2] (flux-source-reader).lifetime: 13h is above the maximum 1h "
        "(12h with gcp.allow_extended_lifetime)"
    )
    assert one_problem(data, allow_extended_lifetime=True) == (
        "roles[2] (flux-source-reader).lifetime: 13h is above the maximum 12h"
    )


@pytest.mark.parametrize(
    ("lifetime", "text"),
    [
        ("2h", "above the maximum 1h"),
        ("9m", "below the minimum 10m"),
        ("599s", "below the minimum 10m"),
        ("1 hour", "is not a duration"),
        ("", "is not a duration"),
        (True, "expected a duration"),
        (3600.5, "expected a duration"),
        ("600.5s", "whole number of seconds"),
    ],
)
def test_bad_lifetime(lifetime: object, text: str) -> None:
    msg = one_problem({"roles": [role(lifetime=lifetime)]})
    assert msg.startswith(f"{LABEL}.lifetime: ") and text in msg, msg


def test_lifetime_below_twice_min_remaining() -> None:
    data = {"roles": [role(lifetime="20m")]}
    assert parse(data, min_remaining_s=600).roles[0].lifetime_s == 1200
    msg = one_problem(data, min_remaining_s=900)
    assert msg.startswith(f"{LABEL}.lifetime: 20m is below 2 x cache.min_remaining")


def test_subjects_empty_or_wrong_type() -> None:
    assert one_problem({"roles": [role(subjects=[])]}).startswith(f"{LABEL}.subjects: at least")
    assert one_problem({"roles": [role(subjects="x")]}).startswith(f"{LABEL}.subjects: expected")
    assert one_problem({"roles": [role(subjects=["x"])]}).startswith(
        f"{LABEL}.subjects[0]: expected a mapping"
    )


def test_subject_unknown_issuer() -> None:
    subj = {"issuer": "staging", "namespace": "a", "service_account": "b"}
    msg = one_problem({"roles": [role(subjects=[subj])]})
    assert msg.startswith(f"{LABEL}.subjects[0].issuer: unknown issuer")
    assert '"staging"' in msg


def test_subject_missing_issuer() -> None:
    subj = {"namespace": "a", "service_account": "b"}
    assert one_problem({"roles": [role(subjects=[subj])]}) == (
        f"{LABEL}.subjects[0].issuer: required"
    )


@pytest.mark.parametrize(
    ("subject", "where"),
    [
        ({"issuer": "prod-eu", "namespace": "a"}, "service_account: required"),
        ({"issuer": "prod-eu", "service_account": "a"}, "namespace: required"),
        (
            {"issuer": "prod-eu", "namespace": "a", "service_account": "b", "subject": "c"},
            "subject: not allowed",
        ),
        ({"issuer": "corp-oidc"}, "subject: required"),
        ({"issuer": "corp-oidc", "subject": "c", "namespace": "a"}, "namespace: not allowed"),
        (
            {"issuer": "corp-oidc", "subject": "c", "service_account": "a"},
            "service_account: not allowed",
        ),
        ({"issuer": "prod-eu", "namespace": "", "service_account": "b"}, "namespace: must be"),
        ({"issuer": "prod-eu", "namespace": "a b", "service_account": "b"}, "namespace: must be"),
        ({"issuer": "prod-eu", "namespace": 5, "service_account": "b"}, "namespace: expected"),
        ({"issuer": "corp-oidc", "subject": "*"}, "subject: "),
    ],
)
def test_subject_shape_by_issuer_kind(subject: dict[str, Any], where: str) -> None:
    msg = one_problem({"roles": [role(subjects=[subject])]})
    assert msg.startswith(f"{LABEL}.subjects[0].{where}"), msg


@pytest.mark.parametrize("sa", ["*", "source-*", "*-controller", "s?urce", "[a-z]*"])
def test_bare_star_namespace_needs_exact_service_account(sa: str) -> None:
    subj = {"issuer": "prod-eu", "namespace": "*", "service_account": sa}
    found = problems({"roles": [role(subjects=[subj])]})
    assert any(p.startswith(f"{LABEL}.subjects[0].namespace: ") for p in found), found


def test_bare_star_namespace_with_exact_service_account_warns() -> None:
    subj = {"issuer": "prod-eu", "namespace": "*", "service_account": "default"}
    table = parse({"roles": [role(subjects=[subj])]})
    assert table.warnings == (
        f'{LABEL}.subjects[0].namespace: "*" is a glob: anyone who can create a matching '
        "namespace or service account can assume the role",
    )


@pytest.mark.parametrize("sa", ["source-*", "*controller", "a*b"])
def test_star_in_service_account_only_alone(sa: str) -> None:
    subj = {"issuer": "prod-eu", "namespace": "flux-system", "service_account": sa}
    msg = one_problem({"roles": [role(subjects=[subj])]})
    assert msg == f'{LABEL}.subjects[0].service_account: "*" is allowed only on its own'


def test_description_must_be_a_string() -> None:
    msg = one_problem({"roles": [role(description=["x"])]})
    assert msg.startswith(f"{LABEL}.description: expected a string")


def test_role_not_a_mapping() -> None:
    assert one_problem({"roles": [role(), "x"]}).startswith("roles[1]: expected a mapping")


def test_all_problems_reported_together() -> None:
    bad_subject = {"issuer": "nowhere", "namespace": "a", "service_account": "b"}
    data = {
        "roles": [
            role(lifetime="5h", scopes=["cloud-platform"]),
            role("Bad_Name"),
            role("c", subjects=[bad_subject], service_account="x@y.iam.gserviceaccount.com"),
            role("c", extra=1),
        ]
    }
    found = problems(data)
    expected_prefixes = [
        f"{LABEL}.lifetime: 5h is above",
        f"{LABEL}.scopes[0]: ",
        "roles[1] (Bad_Name).name: ",
        "roles[2] (c).subjects[0].issuer: unknown issuer",
        "roles[2] (c).service_account: ",
        "roles[3] (c).name: duplicate of roles[2]",
        "roles[3] (c).extra: unknown key",
    ]
    for prefix in expected_prefixes:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    assert len(found) == len(expected_prefixes)


def test_config_error_message_lists_source_and_problems() -> None:
    with pytest.raises(ConfigError) as ei:
        parse({"roles": [role(lifetime="5h")]})
    text = str(ei.value)
    assert text.startswith("roles.yaml: invalid configuration")
    assert f"{LABEL}.lifetime" in text


# --- warnings ------------------------------------------------------------------------------------


def test_globs_warn_naming_role_and_field() -> None:
    subjects = [
        {"issuer": "prod-eu", "namespace": "team-*", "service_account": "batch-runner"},
        {"issuer": "prod-eu", "namespace": "ci", "service_account": "runner-[ab]"},
        {"issuer": "corp-oidc", "subject": "ci-*@corp.example"},
        {"issuer": "prod-eu", "namespace": "exact", "service_account": "exact"},
    ]
    table = parse({"roles": [role("batch", subjects=subjects)]})
    assert len(table.warnings) == 3
    assert table.warnings[0].startswith('roles[0] (batch).subjects[0].namespace: "team-*"')
    assert table.warnings[1].startswith('roles[0] (batch).subjects[1].service_account: "runner-')
    assert table.warnings[2].startswith('roles[0] (batch).subjects[2].subject: "ci-*')
    assert all("anyone who can create a matching namespace" in w for w in table.warnings)


def test_exact_roles_do_not_warn() -> None:
    assert parse({"roles": [role()]}).warnings == ()


# --- load_role_table -----------------------------------------------------------------------------


def load(path: Path, **kw: Any) -> RoleTable:
    return load_role_table(path, issuers=ISSUERS, allowed_service_accounts=ALLOWED, **kw)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert ei.value.source == str(path)
    assert ei.value.problems[0].startswith("cannot read")


def test_load_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text("roles: [\n  - name: x\n")
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert ei.value.source == str(path)
    assert ei.value.problems[0].startswith("not valid YAML")


def test_load_refuses_duplicate_yaml_keys(tmp_path: Path) -> None:
    # PyYAML would silently keep the second service_account line.
    path = tmp_path / "roles.yaml"
    path.write_text(
        "roles:\n"
        "  - name: a\n"
        "    subjects: [{issuer: prod-eu, namespace: a, service_account: b}]\n"
        f"    service_account: {SA}\n"
        "    service_account: x@my-project.iam.gserviceaccount.com\n"
        f"    scopes: [{CLOUD}]\n"
        "    lifetime: 1h\n"
    )
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert "duplicate key 'service_account'" in ei.value.problems[0]


def test_load_validation_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump({"roles": [role(lifetime="2h")]}))
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert ei.value.source == str(path)
    assert ei.value.problems[0].startswith(f"{LABEL}.lifetime")


def test_load_refuses_yaml_tags(tmp_path: Path) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text("roles: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert ei.value.problems[0].startswith("not valid YAML")


def test_example_config_loads() -> None:
    table = load_role_table(
        REPO / "config" / "roles.yaml",
        issuers={"prod-eu": "kubernetes"},
        allowed_service_accounts=["*@my-project.iam.gserviceaccount.com"],
    )
    reader = table.get("flux-source-reader")
    assert reader is not None
    assert reader.service_account == "flux-source@my-project.iam.gserviceaccount.com"
    assert reader.scopes == (CLOUD,)
    assert reader.lifetime_s == 3600
    assert reader.subjects == (
        SubjectMatcher("prod-eu", namespace="flux-system", service_account="source-controller"),
    )
    kms = [r for r in table.roles if r.scopes == ("https://www.googleapis.com/auth/cloudkms",)]
    assert len(kms) == 1
    assert kms[0].subjects[0].service_account == "kustomize-controller"
    # the batch role's glob is the only warning
    assert len(table.warnings) == 1 and "team-*" in table.warnings[0]
    batch = decide(table, k8s("team-ml", "batch-runner"), requested_role=None, now=NOW)
    assert batch.allowed and batch.role is not None and "team-*" in batch.role.subjects[0].namespace
    assert decide(table, k8s(), requested_role=None, now=NOW).role == reader


# --- digest --------------------------------------------------------------------------------------


def test_digest_stable_under_key_and_role_reordering() -> None:
    a, b = role("a"), role("b", lifetime="30m")
    base = parse({"roles": [a, b]})
    reordered_keys = {"roles": [dict(reversed(list(a.items()))), dict(reversed(list(b.items())))]}
    assert parse(reordered_keys).digest == base.digest
    assert parse({"roles": [b, a]}).digest == base.digest
    assert parse({"roles": [a, role("b", lifetime="1800s")]}).digest == base.digest
    assert len(base.digest) == 64 and int(base.digest, 16) >= 0


@pytest.mark.parametrize(
    "edit",
    [
        {"lifetime": "45m"},
        {"description": "changed"},
        {"scopes": [CLOUD, "https://www.googleapis.com/auth/userinfo.email"]},
        {"service_account": "other@my-project.iam.gserviceaccount.com"},
        {"subjects": [{"issuer": "prod-eu", "namespace": "x", "service_account": "y"}]},
        {"delegates": ["hop@my-project.iam.gserviceaccount.com"]},
    ],
)
def test_digest_changes_with_an_edit(edit: dict[str, Any]) -> None:
    base = parse({"roles": [role("a"), role("b")]})
    assert parse({"roles": [role("a"), role("b", **edit)]}).digest != base.digest


def test_digest_changes_when_a_role_is_added() -> None:
    base = parse({"roles": [role("a")]})
    assert parse({"roles": [role("a"), role("b")]}).digest != base.digest


# --- decide / explain ----------------------------------------------------------------------------


def table_of(*roles: dict[str, Any]) -> RoleTable:
    return parse({"roles": list(roles)})


FLUX = table_of(
    role(),
    role(
        "batch",
        subjects=[{"issuer": "prod-eu", "namespace": "team-*", "service_account": "batch-runner"}],
        service_account="batch@my-project.iam.gserviceaccount.com",
    ),
    role(
        "ci",
        subjects=[{"issuer": "corp-oidc", "subject": "ci-runner@corp.example"}],
        service_account="ci@my-project.iam.gserviceaccount.com",
    ),
)


def test_allowed_exact() -> None:
    d = decide(FLUX, k8s(), requested_role=None, now=NOW)
    assert d.allowed and d.reason == "allowed"
    assert d.role is FLUX.get("flux-source-reader")
    assert d.reasons and "prod-eu/flux-system/source-controller" in d.reasons[0]
    named = decide(FLUX, k8s(), requested_role="flux-source-reader", now=NOW)
    assert named.allowed and named.role is d.role


def test_wrong_namespace() -> None:
    d = decide(FLUX, k8s(ns="default"), requested_role=None, now=NOW)
    assert not d.allowed and d.role is None and d.reason == "no_role"
    e = explain(FLUX, k8s(ns="default"), requested_role=None, now=NOW)
    assert any('namespace "default" does not match "flux-system"' in r for r in e.reasons)


def test_wrong_service_account() -> None:
    d = decide(FLUX, k8s(sa="helm-controller"), requested_role=None, now=NOW)
    assert (d.allowed, d.reason) == (False, "no_role")
    named = decide(FLUX, k8s(sa="helm-controller"), requested_role="flux-source-reader", now=NOW)
    assert (named.allowed, named.reason) == (False, "role_not_admitted")
    e = explain(FLUX, k8s(sa="helm-controller"), requested_role=None, now=NOW)
    assert any(
        'service account "helm-controller" does not match "source-controller"' in r
        for r in e.reasons
    )


def test_glob_namespace_match() -> None:
    d = decide(FLUX, k8s("team-ml", "batch-runner"), requested_role=None, now=NOW)
    assert d.allowed and d.role is not None and d.role.name == "batch"
    assert not decide(FLUX, k8s("team", "batch-runner"), requested_role=None, now=NOW).allowed
    assert not decide(FLUX, k8s("Team-ml", "batch-runner"), requested_role=None, now=NOW).allowed
    assert not decide(FLUX, k8s("team-ml", "other"), requested_role=None, now=NOW).allowed
    e = explain(FLUX, k8s("team-ml", "batch-runner"), requested_role=None, now=NOW)
    assert any('namespace "team-ml" matches glob "team-*"' in r for r in e.reasons)


def test_ambiguous_roles() -> None:
    table = table_of(
        role("reader"),
        role("writer"),
        role("other", subjects=[{"issuer": "prod-eu", "namespace": "x", "service_account": "y"}]),
    )
    d = decide(table, k8s(), requested_role=None, now=NOW)
    assert (d.allowed, d.role, d.reason) == (False, None, "ambiguous_role")
    assert "reader" in d.reasons[0] and "writer" in d.reasons[0]
    assert "other" not in d.reasons[0]
    named = decide(table, k8s(), requested_role="writer", now=NOW)
    assert named.allowed and named.role is table.get("writer")


def test_unknown_and_non_admitting_roles_look_the_same() -> None:
    unknown = decide(FLUX, k8s(), requested_role="does-not-exist", now=NOW)
    refused = decide(FLUX, k8s(), requested_role="batch", now=NOW)
    assert (unknown.allowed, unknown.reason) == (False, "role_not_admitted")
    assert (refused.allowed, refused.reason) == (False, "role_not_admitted")
    assert unknown.reasons[0].replace("does-not-exist", "X") == refused.reasons[0].replace(
        "batch", "X"
    )
    assert (
        unknown.reasons[0] == 'role "does-not-exist" does not exist or does not admit this caller'
    )
    assert len(unknown.reasons) == len(refused.reasons) == 1


def test_oidc_subject_match() -> None:
    d = decide(FLUX, oidc("ci-runner@corp.example"), requested_role=None, now=NOW)
    assert d.allowed and d.role is FLUX.get("ci")
    assert (
        decide(FLUX, oidc("other@corp.example"), requested_role=None, now=NOW).reason == "no_role"
    )
    e = explain(FLUX, oidc("other@corp.example"), requested_role=None, now=NOW)
    assert any('subject "other@corp.example" does not match' in r for r in e.reasons)


def test_oidc_identity_never_matches_kubernetes_subject_fields() -> None:
    # an oidc caller whose sub happens to look like a k8s one still gets nothing from k8s matchers
    ident = oidc(
        "system:serviceaccount:flux-system:source-controller",
        issuer_name="prod-eu",
        namespace="flux-system",
        service_account="source-controller",
    )
    assert decide(FLUX, ident, requested_role=None, now=NOW).reason == "no_role"
    # and a kubernetes caller is never matched on `subject`
    k8s_ident = k8s(issuer_name="corp-oidc", subject="ci-runner@corp.example")
    assert decide(FLUX, k8s_ident, requested_role=None, now=NOW).reason == "no_role"
    e = explain(FLUX, k8s_ident, requested_role=None, now=NOW)
    assert any("expects identity kind oidc, the caller is kubernetes" in r for r in e.reasons)


def test_unknown_issuer_name() -> None:
    ident = k8s(issuer_name="staging")
    d = decide(FLUX, ident, requested_role=None, now=NOW)
    assert (d.allowed, d.reason) == (False, "no_role")
    e = explain(FLUX, ident, requested_role=None, now=NOW)
    assert any('issuer is "prod-eu", the caller\'s is "staging"' in r for r in e.reasons)


def test_expired_identity() -> None:
    for exp in (NOW - 1, NOW):
        d = decide(FLUX, k8s(expires_at=exp), requested_role=None, now=NOW)
        assert (d.allowed, d.role, d.reason) == (False, None, "token_expired")
    assert decide(FLUX, k8s(expires_at=None), requested_role=None, now=NOW).allowed


def test_legacy_identity_matched_like_others() -> None:
    d = decide(FLUX, k8s(legacy=True, expires_at=None), requested_role=None, now=NOW)
    assert d.allowed and d.role is FLUX.get("flux-source-reader")


def test_missing_namespace_fails_closed() -> None:
    star = table_of(
        role(subjects=[{"issuer": "prod-eu", "namespace": "*", "service_account": "default"}])
    )
    assert decide(star, k8s("", "default"), requested_role=None, now=NOW).reason == "no_role"
    assert decide(star, k8s(None, "default"), requested_role=None, now=NOW).reason == "no_role"
    assert decide(star, k8s("anything", "default"), requested_role=None, now=NOW).allowed


def test_empty_table_denies() -> None:
    d = decide(parse({"roles": []}), k8s(), requested_role=None, now=NOW)
    assert (d.allowed, d.reason) == (False, "no_role")


def test_explain_lists_every_role() -> None:
    e = explain(FLUX, k8s(), requested_role=None, now=NOW)
    for name in ("flux-source-reader", "batch", "ci"):
        assert any(r.startswith(f'role "{name}"') for r in e.reasons), e.reasons
    assert any('role "flux-source-reader" admits' in r for r in e.reasons)
    e2 = explain(FLUX, k8s(), requested_role="nope", now=NOW)
    assert any('role "nope" does not exist' == r for r in e2.reasons)


def test_matches_helper() -> None:
    m = SubjectMatcher("prod-eu", namespace="team-*", service_account="batch-runner")
    assert matches(m, k8s("team-a", "batch-runner"))
    assert not matches(m, k8s("team-a", "batch-runner", issuer_name="other"))
    assert not matches(m, k8s("xteam-a", "batch-runner"))
    assert matches(SubjectMatcher("corp-oidc", subject="a@b"), oidc("a@b"))
    assert not matches(SubjectMatcher("corp-oidc", subject="a@b"), oidc("a@bc"))


CASES = [
    (k8s(), None),
    (k8s(), "flux-source-reader"),
    (k8s(), "batch"),
    (k8s(), "nope"),
    (k8s(ns="default"), None),
    (k8s(sa="x"), "flux-source-reader"),
    (k8s("team-a", "batch-runner"), None),
    (k8s("team-a", "batch-runner"), "batch"),
    (k8s(expires_at=NOW - 5), None),
    (k8s(expires_at=NOW - 5), "nope"),
    (k8s(issuer_name="staging"), None),
    (k8s(legacy=True, expires_at=None), None),
    (oidc("ci-runner@corp.example"), None),
    (oidc("ci-runner@corp.example"), "ci"),
    (oidc("ci-runner@corp.example"), "flux-source-reader"),
    (oidc("x"), None),
]
AMBIGUOUS = table_of(role("reader"), role("writer"))


@pytest.mark.parametrize("table", [FLUX, AMBIGUOUS, parse({"roles": []})])
@pytest.mark.parametrize(("identity", "requested"), CASES)
def test_explain_decision_equals_decide(
    table: RoleTable, identity: WorkloadIdentity, requested: str | None
) -> None:
    d = decide(table, identity, requested_role=requested, now=NOW)
    e = explain(table, identity, requested_role=requested, now=NOW)
    assert (e.allowed, e.role, e.reason) == (d.allowed, d.role, d.reason)
    assert e.reasons[0] == d.reasons[0]
    assert len(e.reasons) >= len(d.reasons) == 1
    assert (d.role is not None) == d.allowed


def test_decide_is_pure() -> None:
    before = copy.deepcopy(FLUX.to_data())
    first = decide(FLUX, k8s(), requested_role=None, now=NOW)
    assert decide(FLUX, k8s(), requested_role=None, now=NOW) == first
    assert FLUX.to_data() == before


# --- JSON Schema ---------------------------------------------------------------------------------


def test_json_schema_agrees_with_loader() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = role_table_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = yaml.safe_load((REPO / "config" / "roles.yaml").read_text())
    assert list(validator.iter_errors(example)) == []
    assert list(validator.iter_errors({"roles": [role(lifetime=1800)]})) == []
    bad = [
        {"roles": [role(lifetme="1h")]},
        {"roles": [role(name="Bad")]},
        {"roles": [role(lifetime=_DROP)]},
        {"roles": [role(scopes=["cloud-platform"])]},
        {"roles": [role(scopes=[])]},
        {"roles": [role(service_account="flux@example.com")]},
        {"roles": [role(lifetime="1 hour")]},
        {"roles": [role(subjects=[])]},
        {"roles": [role(subjects=[{"issuer": "prod-eu", "namespace": "a"}])]},
        {"roles": [role(subjects=[{"issuer": "x", "namespace": "a", "service_account": "b*"}])]},
        {"roles": [role(subjects=[{"issuer": "x", "namespace": "*", "service_account": "*"}])]},
        {"roles": [role(subjects=[{"issuer": "x", "subject": "a", "namespace": "b"}])]},
        {"roles": [role(description=3)]},
        {"rolez": []},
    ]
    for data in bad:
        assert list(validator.iter_errors(data)), data
        with pytest.raises(ConfigError):
            parse(data)


# --- problems with locations (roles validate, reload logs) ---------------------------------------

RULES = RoleRules(issuers=ISSUERS, allowed_service_accounts=tuple(ALLOWED))

LOCATED_YAML = """\
roles:
  - name: good
    subjects:
      - issuer: prod-eu
        namespace: flux-system
        service_account: source-controller
    service_account: flux-source@my-project.iam.gserviceaccount.com
    scopes: [https://www.googleapis.com/auth/cloud-platform]
    lifetime: 1h
  - name: bad
    subjects:
      - issuer: nowhere
        namespace: team-*
        service_account: runner
    service_account: x@elsewhere.iam.gserviceaccount.com
    scopes: [https://www.googleapis.com/auth/cloud-platform]
    lifetme: 1h
"""


def test_check_role_yaml_locates_every_problem() -> None:
    result = check_role_yaml(LOCATED_YAML, source="roles.yaml", rules=RULES)
    assert result.table is None and not result.ok
    by_line = {p.line: p for p in result.errors}
    # an unknown issuer, a service account outside the allow-list, an unknown key, and the
    # missing lifetime (located at the role's first line: the key is absent)
    assert by_line[12].path == ("roles", 1, "subjects", 0, "issuer")
    assert "roles[1] (bad).subjects[0].issuer" in by_line[12].message
    assert by_line[15].path == ("roles", 1, "service_account")
    assert "gcp.allowed_service_accounts" in by_line[15].message
    assert by_line[17].message.startswith("roles[1] (bad).lifetme: unknown key")
    assert by_line[10].message == "roles[1] (bad).lifetime: required"
    assert len(result.errors) == 4
    with pytest.raises(ConfigError) as ei:
        result.table_or_raise()
    assert ei.value.problems == [p.message for p in result.errors]


def test_check_role_yaml_warnings_have_lines() -> None:
    text = LOCATED_YAML.split("  - name: bad")[0].replace("flux-system", "team-*")
    result = check_role_yaml(text, source="r.yaml", rules=RULES)
    assert result.ok and result.table is not None
    [warning] = result.warnings
    assert warning.line == 5 and warning.path == ("roles", 0, "subjects", 0, "namespace")
    assert result.table.warnings == (warning.message,)


def test_check_role_yaml_syntax_error_has_its_line() -> None:
    result = check_role_yaml("roles:\n  - name: a\n   bad: [\n", source="r.yaml", rules=RULES)
    [error] = result.errors
    assert error.message.startswith("not valid YAML") and error.line is not None
    assert error.line >= 2


def test_check_role_yaml_top_level_problems() -> None:
    [error] = check_role_yaml("- a\n", source="r.yaml", rules=RULES).errors
    assert error.path == () and error.line == 1
    assert error.message.startswith("(top level): expected a mapping")
    [dup] = check_role_yaml("roles: []\nroles: []\n", source="r.yaml", rules=RULES).errors
    assert "duplicate key" in dup.message and dup.line == 2


def test_check_role_yaml_survives_self_referencing_alias() -> None:
    result = check_role_yaml("roles: &a [*a]\n", source="r.yaml", rules=RULES)
    assert [p.line for p in result.errors] == [1]


def test_check_role_file_unreadable(tmp_path: Path) -> None:
    result = check_role_file(tmp_path / "absent.yaml", rules=RULES)
    assert result.table is None and result.errors[0].message.startswith("cannot read")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert check_role_file(binary, rules=RULES).errors[0].message == "not UTF-8 text"


def test_load_yaml_refuses_duplicate_keys() -> None:
    assert load_yaml("a: 1\nb: 2\n") == {"a": 1, "b": 2}
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: 1\na: 2\n")


def test_rules_from_settings(tmp_path: Path, issuer: Any) -> None:
    from broker.settings import load_settings
    from tests.support import broker_config

    settings = load_settings(broker_config(tmp_path, issuer))
    rules = RoleRules.from_settings(settings)
    assert rules.issuers == {"test": "kubernetes"}
    assert rules.allowed_service_accounts == tuple(settings.gcp.allowed_service_accounts)
    assert rules.min_remaining_s == settings.cache.min_remaining


# --- identities for explain and role tests -------------------------------------------------------


def test_principal_identity_kubernetes_and_oidc() -> None:
    k = principal_identity("prod-eu/flux-system/source-controller", ISSUERS)
    assert (k.kind, k.namespace, k.service_account) == ("kubernetes", "flux-system", "source-controller")
    assert k.subject == "system:serviceaccount:flux-system:source-controller"
    assert decide(FLUX, k, requested_role=None, now=NOW).role is FLUX.get("flux-source-reader")
    o = principal_identity("corp-oidc/repo:org/app:ref", ISSUERS)
    assert (o.kind, o.subject) == ("oidc", "repo:org/app:ref")
    with pytest.raises(LookupError, match="not configured"):
        principal_identity("staging/a/b", ISSUERS)
    for bad in ("prod-eu", "prod-eu/ns", "prod-eu/ns/sa/x", "/a/b", "prod-eu//sa"):
        with pytest.raises(ValueError):
            principal_identity(bad, ISSUERS)


def test_subject_identity_needs_the_fields_of_its_kind() -> None:
    with pytest.raises(ValueError):
        subject_identity("prod-eu", "kubernetes", namespace="a")
    with pytest.raises(ValueError):
        subject_identity("corp-oidc", "oidc")
    with pytest.raises(ValueError):
        subject_identity("x", "saml", subject="a")


# --- diffs ---------------------------------------------------------------------------------------


def test_diff_tables_reads_like_a_review() -> None:
    before = table_of(role("a"), role("b"), role("c"))
    after = table_of(
        role("a"),
        role(
            "b",
            lifetime="30m",
            scopes=[CLOUD, "https://www.googleapis.com/auth/userinfo.email"],
            subjects=[{"issuer": "prod-eu", "namespace": "team-*", "service_account": "r"}],
        ),
        role("d"),
    )
    diff = diff_tables(before, after)
    assert diff.names == ("b", "c", "d")
    assert diff.lines() == [
        '~ b: subjects - prod-eu/flux-system/source-controller',
        "~ b: subjects + prod-eu/team-*/r",
        "~ b: scopes + https://www.googleapis.com/auth/userinfo.email",
        '~ b: lifetime "1h" -> "30m"',
        "- c",
        f"+ d (service_account {SA}; lifetime 1h; subjects prod-eu/flux-system/source-controller)",
    ]
    assert [c["change"] for c in diff.to_data()] == ["changed", "removed", "added"]
    assert not diff_tables(after, after) and diff_tables(None, after).names == ("a", "b", "d")


def test_diff_notices_reordered_lists() -> None:
    two = [CLOUD, "https://www.googleapis.com/auth/userinfo.email"]
    diff = diff_tables(table_of(role("a", scopes=two)), table_of(role("a", scopes=two[::-1])))
    assert diff.lines() == ["~ a: scopes reordered"]


# --- the shipped JSON Schema ---------------------------------------------------------------------


def test_shipped_schema_is_the_generated_one() -> None:
    shipped = (REPO / "config" / "roles.schema.json").read_text()
    assert json.loads(shipped) == role_table_json_schema()
    # byte for byte what `token-broker roles schema > config/roles.schema.json` writes
    assert shipped == json.dumps(role_table_json_schema(), indent=2) + "\n"


def test_example_roles_file_references_the_schema() -> None:
    first = (REPO / "config" / "roles.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=roles.schema.json"
    assert (REPO / "config" / "roles.schema.json").is_file()
