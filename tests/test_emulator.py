"""The IAM Credentials emulator through Flask's test client (DESIGN.md §7)."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import pytest

from broker.emulator import TOKEN_PREFIX, create_emulator_app

SA = "flux-source@test-project.iam.gserviceaccount.com"
DELEGATE = "projects/-/serviceAccounts/hop@test-project.iam.gserviceaccount.com"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def url(method: str, sa: str = SA, project: str = "-") -> str:
    return f"/v1/projects/{project}/serviceAccounts/{sa}:{method}"


class Emu:
    def __init__(self, **kwargs: Any) -> None:
        self.sleeps: list[float] = []
        kwargs.setdefault("sleep", self.sleeps.append)
        self.app = create_emulator_app(clock=lambda: NOW, **kwargs)
        self.client = self.app.test_client()

    def access(self, body: Any = None, **kw: Any) -> Any:
        body = {"scope": [CLOUD]} if body is None else body
        return self.client.post(url("generateAccessToken", **kw), json=body)

    def stats(self) -> dict[str, int]:
        return self.client.get("/emulator/stats").get_json()

    def faults(self, **body: Any) -> Any:
        return self.client.post("/emulator/faults", json=body)


@pytest.fixture
def emu() -> Emu:
    return Emu()


def assert_google_error(resp: Any, code: int, status: str) -> dict[str, Any]:
    assert resp.status_code == code
    err = resp.get_json()["error"]
    assert err["code"] == code
    assert err["status"] == status
    assert isinstance(err["message"], str) and err["message"]
    return err


def b64json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# -- generateAccessToken --------------------------------------------------------------------------


def test_access_token_minted_and_introspectable(emu: Emu) -> None:
    resp = emu.access({"scope": [CLOUD], "lifetime": "600s", "delegates": [DELEGATE]})
    assert resp.status_code == 200
    body = resp.get_json()
    assert set(body) == {"accessToken", "expireTime"}
    assert body["accessToken"].startswith(TOKEN_PREFIX)
    assert len(body["accessToken"]) > len(TOKEN_PREFIX) + 32
    assert body["expireTime"] == "2023-11-14T22:23:20Z"  # NOW + 600 s, RFC 3339 UTC

    info = emu.client.get(f"/emulator/tokens/{body['accessToken']}")
    assert info.status_code == 200
    assert info.get_json() == {
        "service_account": SA,
        "scopes": [CLOUD],
        "expire_time": "2023-11-14T22:23:20Z",
        "delegates": [DELEGATE],
    }


def test_tokens_are_unique(emu: Emu) -> None:
    tokens = {emu.access().get_json()["accessToken"] for _ in range(5)}
    assert len(tokens) == 5


def test_default_lifetime_is_one_hour(emu: Emu) -> None:
    assert emu.access().get_json()["expireTime"] == "2023-11-14T23:13:20Z"


@pytest.mark.parametrize("lifetime", ["1s", "43200s", "3600.5s"])
def test_lifetime_bounds_accepted(emu: Emu, lifetime: str) -> None:
    assert emu.access({"scope": [CLOUD], "lifetime": lifetime}).status_code == 200


@pytest.mark.parametrize("lifetime", ["0s", "43201s", "0.5s", "1h", "3600", 3600, "-5s", ""])
def test_lifetime_out_of_range_or_malformed(emu: Emu, lifetime: Any) -> None:
    assert_google_error(
        emu.access({"scope": [CLOUD], "lifetime": lifetime}), 400, "INVALID_ARGUMENT"
    )


@pytest.mark.parametrize(
    "body",
    [{}, {"scope": []}, {"scope": [""]}, {"scope": "cloud-platform"}, {"scope": [1]}],
)
def test_scope_required(emu: Emu, body: dict[str, Any]) -> None:
    assert_google_error(emu.access(body), 400, "INVALID_ARGUMENT")


def test_empty_body_means_no_scope(emu: Emu) -> None:
    resp = emu.client.post(url("generateAccessToken"))
    err = assert_google_error(resp, 400, "INVALID_ARGUMENT")
    assert "Scope" in err["message"]


def test_unknown_field_refused(emu: Emu) -> None:
    err = assert_google_error(
        emu.access({"scope": [CLOUD], "scopes": [CLOUD]}), 400, "INVALID_ARGUMENT"
    )
    assert "scopes" in err["message"]


def test_non_object_body_refused(emu: Emu) -> None:
    resp = emu.client.post(url("generateAccessToken"), data="[1]", content_type="application/json")
    assert_google_error(resp, 400, "INVALID_ARGUMENT")
    resp = emu.client.post(
        url("generateAccessToken"), data="{not json", content_type="application/json"
    )
    assert_google_error(resp, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("sa", ["not-an-email", "a@b", "a b@c.com", "@x.com"])
def test_malformed_service_account(emu: Emu, sa: str) -> None:
    assert_google_error(emu.access(sa=sa), 400, "INVALID_ARGUMENT")


def test_numeric_unique_id_accepted(emu: Emu) -> None:
    assert emu.access(sa="123456789012345678901").status_code == 200


def test_project_must_be_wildcard(emu: Emu) -> None:
    assert_google_error(emu.access(project="my-project"), 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "delegates",
    [["hop@x.iam.gserviceaccount.com"], "x", [1], ["projects/p/serviceAccounts/a@b.com"]],
)
def test_malformed_delegates(emu: Emu, delegates: Any) -> None:
    assert_google_error(
        emu.access({"scope": [CLOUD], "delegates": delegates}), 400, "INVALID_ARGUMENT"
    )


def test_unknown_method_and_route_are_google_404(emu: Emu) -> None:
    assert_google_error(emu.client.post(url("signBlob"), json={}), 404, "NOT_FOUND")
    assert_google_error(emu.client.get("/v1/nothing"), 404, "NOT_FOUND")
    assert emu.stats() == {"generateAccessToken": 0, "generateIdToken": 0}


def test_wrong_verb_is_google_shaped(emu: Emu) -> None:
    resp = emu.client.get(url("generateAccessToken"))
    assert resp.status_code == 405
    assert resp.get_json()["error"]["code"] == 405


# -- generateIdToken ------------------------------------------------------------------------------


def test_id_token_with_email(emu: Emu) -> None:
    resp = emu.client.post(
        url("generateIdToken"), json={"audience": "https://svc.example", "includeEmail": True}
    )
    assert resp.status_code == 200
    token = resp.get_json()["token"]
    header, claims, sig = token.split(".")
    assert b64json(header)["alg"] == "HS256"
    c = b64json(claims)
    assert c["aud"] == "https://svc.example"
    assert c["email"] == SA and c["email_verified"] is True
    assert c["iat"] == int(NOW) and c["exp"] == int(NOW) + 3600
    assert sig


def test_id_token_without_email(emu: Emu) -> None:
    resp = emu.client.post(
        url("generateIdToken"), json={"audience": "aud", "delegates": [DELEGATE]}
    )
    assert resp.status_code == 200
    claims = b64json(resp.get_json()["token"].split(".")[1])
    assert "email" not in claims and claims["aud"] == "aud"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"audience": ""},
        {"audience": 5},
        {"audience": "a", "includeEmail": "yes"},
        {"audience": "a", "scope": []},
    ],
)
def test_id_token_validation(emu: Emu, body: dict[str, Any]) -> None:
    assert_google_error(emu.client.post(url("generateIdToken"), json=body), 400, "INVALID_ARGUMENT")


def test_id_token_is_not_an_access_token(emu: Emu) -> None:
    token = emu.client.post(url("generateIdToken"), json={"audience": "a"}).get_json()["token"]
    assert emu.client.get(f"/emulator/tokens/{token}").status_code == 404


# -- hooks ----------------------------------------------------------------------------------------


def test_unknown_token_is_404(emu: Emu) -> None:
    assert_google_error(emu.client.get("/emulator/tokens/ya29.emulator.nope"), 404, "NOT_FOUND")


def test_stats_count_every_call_that_reached_a_method(emu: Emu) -> None:
    assert emu.stats() == {"generateAccessToken": 0, "generateIdToken": 0}
    emu.access()
    emu.access({"scope": []})  # invalid: still counted
    emu.faults(fail_next=1)
    emu.access()  # faulted: still counted
    emu.client.post(url("generateIdToken"), json={"audience": "a"})
    assert emu.stats() == {"generateAccessToken": 3, "generateIdToken": 1}


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (429, "RESOURCE_EXHAUSTED"),
        (503, "UNAVAILABLE"),
        (500, "INTERNAL"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
    ],
)
def test_fail_next_uses_status(emu: Emu, status: int, name: str) -> None:
    assert emu.faults(fail_next=2, status=status).status_code == 200
    assert_google_error(emu.access(), status, name)
    assert_google_error(
        emu.client.post(url("generateIdToken"), json={"audience": "a"}), status, name
    )
    assert emu.access().status_code == 200  # the third call is no longer faulted


def test_fail_next_defaults_to_503(emu: Emu) -> None:
    emu.faults(fail_next=1)
    assert_google_error(emu.access(), 503, "UNAVAILABLE")
    assert emu.access().status_code == 200


def test_faulted_call_mints_nothing(emu: Emu) -> None:
    emu.faults(fail_next=1)
    resp = emu.access()
    assert "accessToken" not in resp.get_json()


def test_latency_applies_to_every_generate_call_until_changed(emu: Emu) -> None:
    body = emu.faults(latency_ms=250).get_json()
    assert body == {"latency_ms": 250, "fail_next": 0, "status": 503}
    emu.access()
    emu.client.post(url("generateIdToken"), json={"audience": "a"})
    emu.client.get("/emulator/stats")  # hooks are not delayed
    assert emu.sleeps == [0.25, 0.25]
    emu.faults(latency_ms=0)
    emu.access()
    assert emu.sleeps == [0.25, 0.25]


def test_latency_also_delays_faulted_calls(emu: Emu) -> None:
    emu.faults(latency_ms=10, fail_next=1, status=429)
    assert emu.access().status_code == 429
    assert emu.sleeps == [0.01]


def test_fault_settings_are_independent(emu: Emu) -> None:
    emu.faults(latency_ms=5)
    body = emu.faults(fail_next=1, status=429).get_json()
    assert body == {"latency_ms": 5, "fail_next": 1, "status": 429}


@pytest.mark.parametrize(
    "body",
    [
        {"status": 200, "fail_next": 1},
        {"status": 418},
        {"fail_next": -1},
        {"latency_ms": "5"},
        {"latency_ms": True},
        {"bogus": 1},
    ],
)
def test_bad_faults_refused(emu: Emu, body: dict[str, Any]) -> None:
    assert_google_error(emu.faults(**body), 400, "INVALID_ARGUMENT")
    assert emu.access().status_code == 200  # nothing was armed


def test_faults_needs_a_json_object(emu: Emu) -> None:
    resp = emu.client.post("/emulator/faults", data="nope", content_type="text/plain")
    assert_google_error(resp, 400, "INVALID_ARGUMENT")


def test_reset_clears_tokens_stats_and_faults(emu: Emu) -> None:
    token = emu.access().get_json()["accessToken"]
    emu.faults(latency_ms=5, fail_next=3)
    assert emu.client.post("/emulator/reset").status_code == 200
    assert emu.stats() == {"generateAccessToken": 0, "generateIdToken": 0}
    assert emu.client.get(f"/emulator/tokens/{token}").status_code == 404
    assert emu.access().status_code == 200
    assert emu.sleeps == []  # the latency was cleared too


def test_state_is_per_app() -> None:
    a, b = Emu(), Emu()
    token = a.access().get_json()["accessToken"]
    assert b.client.get(f"/emulator/tokens/{token}").status_code == 404
    assert b.stats()["generateAccessToken"] == 0


def test_latency_sleeps_outside_the_lock() -> None:
    """Two delayed calls must be inside their sleep at the same time (no serialisation)."""
    barrier = threading.Barrier(2, timeout=10)
    emu = Emu(sleep=lambda _s: barrier.wait())
    emu.faults(latency_ms=1)
    results: list[int] = []

    def call() -> None:
        client = emu.app.test_client()
        results.append(client.post(url("generateAccessToken"), json={"scope": [CLOUD]}).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not barrier.broken
    assert results == [200, 200]
