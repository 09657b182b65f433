from __future__ import annotations

import pytest

from broker.errors import InvalidRequest, InvalidScope, InvalidSubjectToken, UnsupportedGrantType
from broker.protocol import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
    params_from_json,
    params_from_pairs,
    parse_scope,
    parse_token_request,
    token_response,
)


def req(**kw):
    base = {
        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
        "subject_token": "a.b.c",
        "subject_token_type": TOKEN_TYPE_JWT,
    }
    base.update(kw)
    return {k: [v] for k, v in base.items() if v is not None}


def test_parses_minimal_request():
    r = parse_token_request(req())
    assert (r.subject_token, r.requested_role, r.scopes) == ("a.b.c", None, ())


def test_strips_token_whitespace_and_hides_it_in_repr():
    r = parse_token_request(req(subject_token="  a.b.c\n"))
    assert r.subject_token == "a.b.c"
    assert "a.b.c" not in repr(r)


def test_audience_names_role_and_wif_uri_is_ignored():
    assert parse_token_request(req(audience="flux")).requested_role == "flux"
    wif = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"
    assert parse_token_request(req(audience=wif)).requested_role is None


@pytest.mark.parametrize(
    ("params", "exc", "reason"),
    [
        (req(grant_type=None), InvalidRequest, "missing_grant_type"),
        (req(grant_type="password"), UnsupportedGrantType, "unsupported_grant_type"),
        (req(subject_token=None), InvalidSubjectToken, "token_missing"),
        (req(subject_token="   "), InvalidSubjectToken, "token_missing"),
        (req(subject_token="x" * 16385), InvalidSubjectToken, "token_too_large"),
        (req(subject_token_type="urn:x"), InvalidRequest, "unsupported_subject_token_type"),
        (req(requested_token_type="urn:x"), InvalidRequest, "unsupported_requested_token_type"),
        (req(actor_token="x"), InvalidRequest, "actor_token"),
        ({**req(), "audience": ["a", "b"]}, InvalidRequest, "duplicate_parameter"),
    ],
)
def test_refusals(params, exc, reason):
    with pytest.raises(exc) as info:
        parse_token_request(params)
    assert info.value.reason == reason
    assert info.value.description


def test_scope_parsing():
    assert parse_scope("") == ()
    assert parse_scope(None) == ()
    assert parse_scope("a b") == ("a", "b")
    for bad in ("a  b", 'a"b', "a\\b", " a", "é"):
        with pytest.raises(InvalidScope):
            parse_scope(bad)


def test_json_and_pairs():
    assert params_from_pairs([("a", "1"), ("a", "2")]) == {"a": ["1", "2"]}
    assert params_from_json(b'{"a": "1", "b": null}') == {"a": ["1"]}
    for bad in (b"[]", b'{"a": 1}', b'{"a": ["x", "y"]}', b"{", b'{"a": "\\ud800"}',
                b'{"a": {}, "a": "x"}'):
        with pytest.raises(InvalidRequest):
            params_from_json(bad)


def test_json_keeps_every_value_of_a_repeated_key_for_the_parser_to_refuse():
    """orjson alone keeps the last value: a second audience would silently win."""
    raw = b'{"grant_type": "g", "audience": "team-a", "b": "x", "audience": "team-b"}'
    params = params_from_json(raw)
    assert params["audience"] == ["team-a", "team-b"]
    with pytest.raises(InvalidRequest) as info:
        parse_token_request(params)
    assert info.value.reason == "duplicate_parameter"


def test_json_nested_beyond_the_parser_is_malformed_not_a_pass():
    """A repeat may hide a value nested deeper than json's recursion (orjson takes 1024 levels):
    the body is refused, never read as if the repeat were absent."""
    deep = b"[" * 1000 + b"]" * 1000
    raw = b'{"audience": "a", "audience": ' + deep + b', "audience": "b"}'
    with pytest.raises(InvalidRequest) as info:
        params_from_json(raw)
    assert info.value.reason == "malformed_body"


def test_token_response_expires_in_is_positive_int():
    body = token_response("t", 0, ("s1", "s2"))
    assert body["expires_in"] == 1 and type(body["expires_in"]) is int
    assert body["scope"] == "s1 s2"
    assert body["token_type"] == "Bearer"
