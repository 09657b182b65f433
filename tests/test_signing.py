"""Ed25519 checkpoint keys: formats, key ids, nothing secret in errors or reprs."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from broker.errors import ConfigError
from broker.signing import (
    KeyRing,
    SigningKey,
    load_signing_key,
    parse_public_key,
    parse_signing_key,
)

SEED = bytes(range(32))
SEED_B64 = base64.b64encode(SEED).decode()


def test_base64_and_pem_private_keys_are_the_same_key():
    pem = Ed25519PrivateKey.from_private_bytes(SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    a = parse_signing_key(SEED_B64, source="t")
    b = parse_signing_key(pem, source="t")
    urlsafe = parse_signing_key(base64.urlsafe_b64encode(SEED).decode().rstrip("="), source="t")
    assert a.key_id == b.key_id == urlsafe.key_id
    assert a.key_id == hashlib.sha256(a.public.raw).hexdigest()[:16]
    assert a.private_b64() == SEED_B64


def test_sign_and_verify():
    key = SigningKey.generate()
    sig = key.sign(b"msg")
    assert key.public.verify(b"msg", sig)
    assert not key.public.verify(b"other", sig)
    assert not key.public.verify(b"msg", "not base64!")
    assert not SigningKey.generate().public.verify(b"msg", sig)


def test_public_key_formats_round_trip():
    pub = parse_signing_key(SEED_B64, source="t").public
    assert parse_public_key(pub.b64, source="t") == pub
    assert parse_public_key(pub.pem(), source="t") == pub
    d = pub.to_dict(current=True)
    assert d["key_id"] == pub.key_id and d["algorithm"] == "Ed25519" and d["current"] is True


@pytest.mark.parametrize("value, message", [
    ("short", "neither PEM nor base64"),
    (base64.b64encode(b"x" * 31).decode(), "32 bytes"),
    ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "PEM"),
])
def test_bad_private_keys_are_refused_without_echoing_them(value, message):
    with pytest.raises(ConfigError) as info:
        parse_signing_key(value, source="environment X")
    assert message in str(info.value) and value not in str(info.value)


def test_non_ed25519_pem_is_refused():
    rsa = generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ConfigError, match="not an Ed25519"):
        parse_signing_key(rsa, source="t")


def test_unset_signing_key_refuses_with_the_env_var_named():
    with pytest.raises(ConfigError, match="BROKER_AUDIT_SIGNING_KEY: not set"):
        load_signing_key({}, "BROKER_AUDIT_SIGNING_KEY")
    assert load_signing_key({"K": SEED_B64}, "K").key_id


def test_repr_names_the_key_id_only():
    key = parse_signing_key(SEED_B64, source="t")
    assert repr(key) == f"SigningKey(key_id={key.key_id!r})"
    assert SEED_B64 not in repr(key)


def test_key_ring_first_is_current_and_duplicates_collapse():
    a, b = SigningKey.generate().public, SigningKey.generate().public
    ring = KeyRing([a, b, a])
    assert len(ring) == 2 and ring.current == a
    assert ring.get(b.key_id) == b and ring.get("nope") is None and ring.get(None) is None
    assert [k["current"] for k in ring.to_dict()["keys"]] == [True, False]
