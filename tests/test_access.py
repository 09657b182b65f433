"""Admin/auditor authentication: 401 without a valid admin-audience token, 403 when unlisted."""

from __future__ import annotations

import pytest

from broker.access import AccessControl, Permission
from broker.errors import Forbidden, Unauthorized
from broker.identity import Verifier
from broker.settings import AccessSettings, IssuerSettings
from tests.support import ADMIN_AUDIENCE, AUDIENCE, LocalIssuer


@pytest.fixture(scope="module")
def issuers():
    return LocalIssuer("https://prod.example"), LocalIssuer("https://staging.example")


@pytest.fixture
def access(tmp_path, issuers):
    prod, staging = issuers
    settings = [
        IssuerSettings(name="prod", issuer=prod.issuer, audiences=(AUDIENCE,),
                       jwks_file=str(prod.write_jwks(tmp_path / "prod.json"))),
        IssuerSettings(name="staging", issuer=staging.issuer, audiences=(AUDIENCE,),
                       jwks_file=str(staging.write_jwks(tmp_path / "staging.json"))),
    ]
    return AccessControl(
        Verifier(settings),
        AccessSettings(
            audience=ADMIN_AUDIENCE,
            admins=("prod/token-broker/ops",),
            auditors=("prod/audit/reader", "prod/token-broker/ops"),
        ),
    )


def bearer(token):
    return f"Bearer {token}"


def test_listed_admin(access, issuers):
    caller = access.require(bearer(issuers[0].token("token-broker", "ops", audience=ADMIN_AUDIENCE)),
                            [Permission.ADMIN])
    assert caller.principal == "prod/token-broker/ops"
    assert caller.permissions == {Permission.ADMIN, Permission.AUDITOR}


def test_listed_auditor_is_not_admin(access, issuers):
    token = issuers[0].token("audit", "reader", audience=ADMIN_AUDIENCE)
    assert access.require(bearer(token), [Permission.AUDITOR]).principal == "prod/audit/reader"
    with pytest.raises(Forbidden) as info:
        access.require(bearer(token), [Permission.ADMIN])
    assert info.value.status == 403 and "prod/audit/reader" in info.value.description


def test_exchange_audience_token_is_not_an_admin_credential(access, issuers):
    token = issuers[0].token("token-broker", "ops", audience=AUDIENCE)
    with pytest.raises(Unauthorized) as info:
        access.require(bearer(token), [Permission.ADMIN])
    assert info.value.status == 401 and info.value.reason == "wrong_audience"


def test_same_namespace_and_name_from_another_issuer_is_unlisted(access, issuers):
    token = issuers[1].token("token-broker", "ops", audience=ADMIN_AUDIENCE)
    with pytest.raises(Forbidden) as info:
        access.require(bearer(token), [Permission.ADMIN])
    assert "staging/token-broker/ops" in info.value.description


def test_unlisted(access, issuers):
    token = issuers[0].token("default", "default", audience=ADMIN_AUDIENCE)
    with pytest.raises(Forbidden):
        access.require(bearer(token), [Permission.ADMIN, Permission.AUDITOR])


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer garbage"])
def test_missing_or_bad_bearer_is_401(access, header):
    with pytest.raises(Unauthorized):
        access.require(header, [Permission.AUDITOR])
