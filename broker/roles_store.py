"""The role table in Redis (``roles.source: redis``): versioned, MACed, with history.

Keys share the hash tag ``{roles}`` so that one transaction touches them all (Redis Cluster
ready)::

    {prefix}{roles}:current    the current version: a JSON envelope
    {prefix}{roles}:revision   its revision number, what replicas poll (a cheap GET)
    {prefix}{roles}:history    the last HISTORY_LENGTH envelopes, newest first

Every envelope carries an HMAC-SHA256 over its content, made with a key that only brokers hold
(env ``roles.mac_key_env``; Redis never sees it). A version edited in Redis fails verification
and is refused. Writes are compare-and-set (WATCH/MULTI), so of two concurrent edits of one
version exactly one commits.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.errors import ConfigError, StoreUnavailable
from broker.keymaterial import parse_key_list

HISTORY_LENGTH = 100
MIN_KEY_BYTES = 32
_ENVELOPE_VERSION = 1
_MAC_DOMAIN = b"token-broker/roles/v1\x00"
_MAC_HEX = frozenset("0123456789abcdef")  # what sign() writes: 64 of these
_COMMIT_ATTEMPTS = 20  # WATCH retries when someone else's write lands between read and commit


def _kid(key: bytes) -> str:
    return hashlib.sha256(b"roles-mac-kid:" + key).hexdigest()[:8]


@dataclass(frozen=True, repr=False)
class MacKeys:
    """Keys that MAC role-table versions: the first signs, all verify. Never shows key bytes."""

    keys: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one roles MAC key is required")
        if any(len(k) < MIN_KEY_BYTES for k in self.keys):
            raise ValueError(f"roles MAC keys must be at least {MIN_KEY_BYTES} bytes")

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(_kid(k) for k in self.keys)

    def __repr__(self) -> str:
        return f"MacKeys(kids={self.kids!r})"

    @classmethod
    def parse(cls, value: str, env_var: str = "BROKER_ROLES_MAC_KEY") -> MacKeys:
        """Comma-separated base64 keys of at least 32 bytes; problems name the entry's
        position, never its content (:class:`ConfigError`)."""
        if not value.strip():
            raise ConfigError(
                env_var,
                [
                    "not set; roles.source: redis needs one or more comma-separated base64 keys "
                    f"of at least {MIN_KEY_BYTES} bytes (generate one with `token-broker keygen`)"
                ],
            )

        def size_problem(key: bytes) -> str | None:
            if len(key) >= MIN_KEY_BYTES:
                return None
            return f"{len(key)} bytes, at least {MIN_KEY_BYTES} needed"

        return cls(parse_key_list(value, env_var, size_problem, reject_empty=False))

    @staticmethod
    def generate() -> str:
        return base64.b64encode(os.urandom(MIN_KEY_BYTES)).decode("ascii")

    def sign(self, message: bytes) -> tuple[str, str]:
        """``(kid, mac hex)`` with the first key."""
        return self.kids[0], hmac.new(self.keys[0], message, hashlib.sha256).hexdigest()

    def verify(self, kid: str, message: bytes, mac: str) -> bool:
        for k, key in zip(self.kids, self.keys, strict=True):
            if hmac.compare_digest(k, kid):
                expected = hmac.new(key, message, hashlib.sha256).hexdigest()
                return hmac.compare_digest(expected, mac)
        return False


@dataclass(frozen=True)
class StoredVersion:
    """One verified version of the table. ``data`` is roles.yaml form (canonical)."""

    revision: int
    data: dict[str, Any]
    digest: str
    changed_by: str
    changed_at: float
    previous: str | None  # the digest it replaced
    operation: str  # put_role | delete_role | put_table
    fingerprint: str = ""  # SHA-256 of the stored bytes (to notice any change cheaply)

    def meta(self) -> dict[str, Any]:
        """Everything but the table itself."""
        return {
            "revision": self.revision,
            "version": self.digest,
            "previous_version": self.previous,
            "changed_by": self.changed_by,
            "changed_at": self.changed_at,
            "operation": self.operation,
        }


class TableIntegrityError(Exception):
    """A stored version is not one a broker wrote: bad MAC, unknown key, or malformed."""

    def __init__(self, reason: str, message: str, fingerprint: str) -> None:
        super().__init__(message)
        self.reason = reason  # bad_mac | unknown_key | malformed
        self.fingerprint = fingerprint


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What a commit writes: a validated table in roles.yaml form and its digest."""

    data: dict[str, Any]
    digest: str
    changed_by: str
    operation: str


Build = Callable[[StoredVersion | None, TableIntegrityError | None], NewVersion | None]


class RedisRoleStore:
    """Reads and compare-and-set writes of the MACed role table in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        keys: MacKeys,
        *,
        prefix: str = "tb:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._prefix = prefix
        self._clock = clock
        self.current_key = f"{prefix}{{roles}}:current"
        self.revision_key = f"{prefix}{{roles}}:revision"
        self.history_key = f"{prefix}{{roles}}:history"

    def __repr__(self) -> str:
        return f"RedisRoleStore(prefix={self._prefix!r}, keys={self._keys!r})"

    # -- reading ------------------------------------------------------------------------------

    def revision(self) -> int:
        """The revision replicas should be on (0 before the first write)."""
        raw = self._call(lambda: self._redis.get(self.revision_key))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return -1  # garbage: make pollers read (and refuse) the current version

    def read(self) -> StoredVersion | None:
        """The current version, verified; None when there is none.

        Raises :class:`TableIntegrityError` when it is not a broker's writing, and
        :class:`StoreUnavailable` when Redis fails.
        """
        raw = self._call(lambda: self._redis.get(self.current_key))
        return None if raw is None else self._open(raw)

    def history(self, limit: int = HISTORY_LENGTH) -> list[StoredVersion | TableIntegrityError]:
        """The newest ``limit`` versions, newest first; unverifiable entries as errors."""
        raws = self._call(lambda: self._redis.lrange(self.history_key, 0, max(0, limit - 1)))
        out: list[StoredVersion | TableIntegrityError] = []
        for raw in raws:
            try:
                out.append(self._open(raw))
            except TableIntegrityError as exc:
                out.append(exc)
        return out

    # -- writing ------------------------------------------------------------------------------

    def commit(self, build: Build) -> tuple[StoredVersion | None, StoredVersion | None]:
        """Compare-and-set: ``build(current, integrity_error)`` decides what to write (or
        raises to refuse, or returns None for nothing to do) and the write commits only if
        the current version is still the one ``build`` saw; otherwise ``build`` runs again on
        the new one. Returns ``(before, after)`` (after None when nothing was written)."""
        for _ in range(_COMMIT_ATTEMPTS):
            try:
                with self._redis.pipeline() as pipe:
                    pipe.watch(self.current_key, self.revision_key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(self.current_key)
                    before: StoredVersion | None = None
                    problem: TableIntegrityError | None = None
                    if raw is not None:
                        try:
                            before = self._open(raw)
                        except TableIntegrityError as exc:
                            problem = exc
                    plan = build(before, problem)
                    if plan is None:
                        pipe.unwatch()
                        return before, None
                    counter = pipe.get(self.revision_key)
                    revision = max(
                        before.revision if before is not None else 0,
                        _int(counter),
                    )
                    after = self._version(plan, revision + 1, before)
                    envelope = self._seal(after)
                    pipe.multi()
                    pipe.set(self.current_key, envelope)
                    pipe.set(self.revision_key, after.revision)
                    pipe.lpush(self.history_key, envelope)
                    pipe.ltrim(self.history_key, 0, HISTORY_LENGTH - 1)
                    pipe.execute()
                    fp = hashlib.sha256(envelope).hexdigest()
                    return before, dataclasses.replace(after, fingerprint=fp)
            except redis.exceptions.WatchError:
                continue
            except redis.exceptions.RedisError as exc:
                raise StoreUnavailable(
                    f"role store unavailable ({type(exc).__name__})", retry_after=1
                ) from exc
        raise StoreUnavailable("the role table is changing too fast; retry", retry_after=1)

    # -- envelopes ----------------------------------------------------------------------------

    def _version(
        self, plan: NewVersion, revision: int, before: StoredVersion | None
    ) -> StoredVersion:
        return StoredVersion(
            revision=revision,
            data=plan.data,
            digest=plan.digest,
            changed_by=plan.changed_by,
            changed_at=round(self._clock(), 3),
            previous=before.digest if before is not None else None,
            operation=plan.operation,
        )

    def _content(self, v: StoredVersion) -> dict[str, Any]:
        return {
            "revision": v.revision,
            "table": v.data,
            "digest": v.digest,
            "changed_by": v.changed_by,
            "changed_at": v.changed_at,
            "previous": v.previous,
            "operation": v.operation,
        }

    def _message(self, content: dict[str, Any]) -> bytes:
        # The prefix is covered too: a version copied from another deployment does not verify.
        body = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return _MAC_DOMAIN + self._prefix.encode() + b"\x00" + body.encode("ascii")

    def _seal(self, v: StoredVersion) -> bytes:
        content = self._content(v)
        kid, mac = self._keys.sign(self._message(content))
        envelope = {"v": _ENVELOPE_VERSION, **content, "kid": kid, "mac": mac}
        return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")

    def _open(self, raw: object) -> StoredVersion:
        data = _bytes(raw)
        fp = hashlib.sha256(data).hexdigest()

        def bad(reason: str, message: str) -> TableIntegrityError:
            return TableIntegrityError(reason, message, fp)

        try:
            env = json.loads(data)
        except (ValueError, RecursionError):  # nesting too deep for the parser is not JSON here
            raise bad("malformed", "the stored role table is not JSON") from None
        if not isinstance(env, dict) or env.get("v") != _ENVELOPE_VERSION:
            raise bad("malformed", "the stored role table is not a version-1 envelope")
        kid, mac = env.get("kid"), env.get("mac")
        content = {k: env.get(k) for k in self._content_keys()}
        if not isinstance(kid, str) or not isinstance(mac, str):
            raise bad("malformed", "the stored role table carries no MAC")
        if len(mac) != 64 or not _MAC_HEX.issuperset(mac):  # compare_digest takes ASCII only
            raise bad("malformed", "the stored role table's MAC is not 64 hex digits")
        if kid not in self._keys.kids:
            raise bad("unknown_key", f"the stored role table is MACed with unknown key {kid[:8]!r}")
        try:
            message = self._message(content)
        except RecursionError:
            raise bad("malformed", "the stored role table is nested too deeply") from None
        if not self._keys.verify(kid, message, mac):
            raise bad(
                "bad_mac",
                "the stored role table's MAC does not verify: it was changed outside the broker",
            )
        revision, table, digest = content["revision"], content["table"], content["digest"]
        if (
            not isinstance(revision, int)
            or not isinstance(table, dict)
            or not isinstance(digest, str)
            or not isinstance(content["changed_by"], str)
            or not isinstance(content["changed_at"], int | float)
            or not isinstance(content["operation"], str)
        ):
            raise bad("malformed", "the stored role table has fields of the wrong type")
        previous = content["previous"]
        return StoredVersion(
            revision=revision,
            data=table,
            digest=digest,
            changed_by=content["changed_by"],
            changed_at=float(content["changed_at"]),
            previous=previous if isinstance(previous, str) else None,
            operation=content["operation"],
            fingerprint=fp,
        )

    @staticmethod
    def _content_keys() -> tuple[str, ...]:
        return ("revision", "table", "digest", "changed_by", "changed_at", "previous", "operation")

    def _call(self, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(
                f"role store unavailable ({type(exc).__name__})", retry_after=1
            ) from exc


def _bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    return str(raw).encode("utf-8")


def _int(raw: object) -> int:
    try:
        return int(raw) if raw is not None else 0  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
