"""Ed25519 keys that sign audit checkpoints (DESIGN.md §5).

Only brokers hold the private key (``BROKER_AUDIT_SIGNING_KEY``: PEM, or base64 of the raw
32-byte seed). Verifiers need only public keys. A key is named by its *key id*: the first 16 hex
digits of the SHA-256 of the raw 32-byte public key, so a checkpoint says which key signed it and
old checkpoints stay verifiable after a rotation (keep the old public key in the key ring).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import ConfigError

ALGORITHM = "Ed25519"
KEY_ID_HEX = 16


def key_id_of(raw_public: bytes) -> str:
    """Key id: first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(raw_public).hexdigest()[:KEY_ID_HEX]


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional; raises ValueError."""
    t = "".join(text.split())
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key that verifies checkpoint signatures."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def pem(self) -> str:
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def verify(self, message: bytes, signature_b64: str) -> bool:
        """True when ``signature_b64`` is this key's signature over ``message``."""
        try:
            signature = _b64decode(signature_b64)
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_dict(self, *, current: bool = False) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": self.b64,
            "pem": self.pem(),
            "current": current,
        }


class SigningKey:
    """The private Ed25519 key. Its repr names the key id only, never the key."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(_raw_public(key.public_key()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> str:
        """Base64 signature over ``message``."""
        return base64.b64encode(self._key.sign(message)).decode()

    def private_b64(self) -> str:
        """The raw seed as base64: only for ``audit keygen`` to print once."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed).decode()

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def parse_signing_key(text: str, *, source: str) -> SigningKey:
    """A private key from PEM (PKCS#8) or base64 of the raw 32-byte seed; ConfigError if bad.

    The message names ``source`` (e.g. the env var), never the value.
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(source, ["not a readable unencrypted PEM private key"]) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(source, ["the PEM key is not an Ed25519 key"])
        return SigningKey(key)
    try:
        raw = _b64decode(text)
    except ValueError as exc:
        raise ConfigError(source, ["neither PEM nor base64"]) from exc
    if len(raw) != 32:
        raise ConfigError(source, [f"base64 must decode to 32 bytes (got {len(raw)})"])
    return SigningKey(Ed25519PrivateKey.from_private_bytes(raw))


def parse_public_key(text: str, *, source: str) -> PublicKey:
    """A public key from PEM (SubjectPublicKeyInfo) or base64 of the raw 32 bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError) as exc:
            raise ConfigError(source, ["not a readable PEM public key"]) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(source, ["the PEM key is not an Ed25519 key"])
        return PublicKey(_raw_public(key))
    try:
        raw = _b64decode(text)
    except ValueError as exc:
        raise ConfigError(source, ["neither PEM nor base64"]) from exc
    if len(raw) != 32:
        raise ConfigError(source, [f"base64 must decode to 32 bytes (got {len(raw)})"])
    return PublicKey(raw)


def load_signing_key(env: Mapping[str, str], env_var: str) -> SigningKey:
    """The signing key from ``env[env_var]``; refuses to go on without one."""
    value = env.get(env_var, "")
    if not value.strip():
        raise ConfigError(
            "environment",
            [
                f"{env_var}: not set; it must hold the Ed25519 key that signs audit checkpoints "
                "(generate one with `token-broker audit keygen`)"
            ],
        )
    return parse_signing_key(value, source=f"environment {env_var}")


class KeyRing:
    """Trusted public keys by key id; the first is the current one."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            self._keys.setdefault(key.key_id, key)

    def get(self, key_id: object) -> PublicKey | None:
        return self._keys.get(key_id) if isinstance(key_id, str) else None

    @property
    def keys(self) -> tuple[PublicKey, ...]:
        return tuple(self._keys.values())

    @property
    def current(self) -> PublicKey | None:
        return next(iter(self._keys.values()), None)

    def __len__(self) -> int:
        return len(self._keys)

    def to_dict(self) -> dict[str, object]:
        cur = self.current
        return {
            "current": cur.key_id if cur else None,
            "keys": [k.to_dict(current=k is cur) for k in self._keys.values()],
        }
