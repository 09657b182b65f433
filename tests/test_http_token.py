"""The token endpoint's own form parsing (the rest of the endpoint: tests/test_exchange.py)."""

from __future__ import annotations

import io
import json
import random
from urllib.parse import parse_qsl, urlencode

import pytest

from broker.http.token import MAX_FIELDS, _form_pairs
from tests.support import exchange_form


def _parse_qsl(text: str):
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        return ValueError


def _fast(text: str):
    try:
        return _form_pairs(text)
    except ValueError:
        return ValueError


def test_form_pairs_agree_with_parse_qsl_on_arbitrary_bodies():
    rng = random.Random(1)
    pieces = [*"ab=&.-_%+2F0xyz", "é", "%C3%A9", "%C3", "%zz", "%2", "=="]
    for _ in range(50_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert _fast(text) == _parse_qsl(text), text


@pytest.mark.parametrize("n", [MAX_FIELDS - 1, MAX_FIELDS, MAX_FIELDS + 1])
def test_form_pairs_field_limit_is_parse_qsls(n):
    text = "&".join(f"f{i}=x" for i in range(n))
    assert _fast(text) == _parse_qsl(text)


def test_form_pairs_agree_with_parse_qsl_for_the_memoised_fields():
    rng = random.Random(2)
    names = ["grant_type", "audience", "scope", "subject_token", "subject_token_type", "x"]
    pieces = [*"ab.-_%+2F0xyz:", "é", "%C3%A9", "%3A", "%zz", "%2", "+"]
    for _ in range(20_000):
        text = "&".join(
            rng.choice(names) + "=" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            for _ in range(rng.randint(1, 5))
        )
        assert _fast(text) == _parse_qsl(text), text


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    "content_type",
    [FORM, f"{FORM}; charset=utf-8", "Application/X-WWW-Form-URLEncoded", f" {FORM}"],
)
def test_form_content_types_as_werkzeug_reads_them(broker, content_type):
    body = urlencode(exchange_form(broker.issuer.token()))
    resp = broker.client.post("/v1/token", data=body, headers={"Content-Type": content_type})
    assert resp.status_code == 200, resp.get_json()


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_body(broker, content_type):
    body = json.dumps(exchange_form(broker.issuer.token()))
    resp = broker.client.post("/v1/token", data=body, headers={"Content-Type": content_type})
    assert resp.status_code == 200, resp.get_json()


def test_chunked_body_is_read_and_bounded(broker):
    """No declared length: werkzeug reads the (terminated) stream, within the size limit."""
    body = urlencode(exchange_form(broker.issuer.token())).encode()
    chunked = {"Content-Type": FORM, "Transfer-Encoding": "chunked"}
    terminated = {"wsgi.input_terminated": True}
    resp = broker.client.post(
        "/v1/token", input_stream=io.BytesIO(body), headers=chunked, environ_overrides=terminated
    )
    assert resp.status_code == 200, resp.get_json()
    big = body + b"&pad=" + b"x" * 70_000
    resp = broker.client.post(
        "/v1/token", input_stream=io.BytesIO(big), headers=chunked, environ_overrides=terminated
    )
    assert resp.status_code == 413


@pytest.mark.parametrize("length", ["abc", "-5", " 10"])
def test_odd_content_length_is_werkzeugs_reading(broker, length):
    """Not plain digits: werkzeug decides (an unreadable length reads as empty)."""
    resp = broker.client.post(
        "/v1/token", data=b"grant_type=x", headers={"Content-Type": FORM},
        environ_overrides={"CONTENT_LENGTH": length},
    )
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "invalid_request"


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000])
@pytest.mark.parametrize("kind", ["form", "json"])
def test_unreadable_content_length_is_never_a_500(broker, length, kind):
    """Digits int() refuses (a superscript, more than 4300 of them) read as werkzeug reads
    them: length 0, so an empty body and a clear 400."""
    content_type = FORM if kind == "form" else "application/json"
    resp = broker.client.post(
        "/v1/token", data=b"{}", headers={"Content-Type": content_type},
        environ_overrides={"CONTENT_LENGTH": length},
    )
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "invalid_request"


def test_chunked_body_exactly_at_the_limit_is_read(broker):
    form = urlencode(exchange_form(broker.issuer.token())).encode() + b"&pad="
    limit = broker.app.config["MAX_CONTENT_LENGTH"]
    body = form + b"x" * (limit - len(form))
    resp = broker.client.post(
        "/v1/token", input_stream=io.BytesIO(body),
        headers={"Content-Type": FORM, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert len(body) == limit and resp.status_code == 200, resp.get_json()


def test_chunked_body_of_a_server_that_does_not_terminate_streams_is_not_read(broker):
    body = urlencode(exchange_form(broker.issuer.token())).encode()
    resp = broker.client.post(
        "/v1/token", input_stream=io.BytesIO(body),
        headers={"Content-Type": FORM, "Transfer-Encoding": "chunked"},
    )
    assert resp.status_code == 400  # an empty body, as werkzeug's safe fallback reads it


@pytest.mark.parametrize(
    ("method", "path", "status"), [("get", "/nope", 404), ("get", "/v1/token", 405)]
)
def test_request_id_in_header_and_body_match_on_errors_before_the_view(broker, method, path,
                                                                       status):
    resp = getattr(broker.client, method)(path)
    assert resp.status_code == status
    assert resp.headers["X-Request-Id"] == resp.get_json()["request_id"]


def test_request_id_in_header_and_body_match_on_413(broker):
    resp = broker.client.post(
        "/v1/token", data=b"x", headers={"Content-Type": FORM},
        environ_overrides={"CONTENT_LENGTH": "9" * 12},
    )
    assert resp.status_code == 413
    assert resp.headers["X-Request-Id"] == resp.get_json()["request_id"]
