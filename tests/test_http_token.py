"""The token endpoint's own form parsing (the rest of the endpoint: tests/test_exchange.py)."""

from __future__ import annotations

import random
from urllib.parse import parse_qsl

import pytest

from broker.http.token import MAX_FIELDS, _form_pairs


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
