"""The audit chain's format: record hashes, checkpoint messages, record ids. Pure, no I/O.

Each writer's records form a chain: ``seq`` counts up from 1, ``prev`` is the previous record's
``hash`` (:data:`GENESIS` for the first), and ``hash`` is SHA-256 over the canonical JSON of the
record without ``hash``, ``id`` and ``stored``. An ``audit.checkpoint`` record carries an Ed25519
signature over :func:`checkpoint_message`, which names the writer, the checkpoint's seq and its
``prev`` (the head it seals), its time, the signing key id and whether it is the writer's last.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from datetime import datetime
from typing import Any

import orjson

GENESIS = "0" * 64
CHECKPOINT_EVENT = "audit.checkpoint"
# Not covered by the hash: `id` is where Redis put the record, `stored` is stdout-only.
UNHASHED = frozenset({"hash", "id", "stored"})
_DOMAIN = b"token-broker audit checkpoint v1\n"


def sha256_hex(value: str | bytes) -> str:
    """Fingerprint of a secret: what audit records store instead of the secret itself."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


def canonical_json(record: dict[str, Any]) -> bytes:
    """The canonical JSON of the record without ``hash``, ``id``, ``stored`` (sorted keys):
    what :func:`chain_hash` hashes."""
    body = {k: v for k, v in record.items() if k not in UNHASHED}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def chain_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record without ``hash``, ``id``, ``stored``."""
    return sha256_hex(canonical_json(record))


def with_field(encoded: bytes, name: str, value: Any) -> bytes:
    """``encoded`` (a JSON object with at least one field, as orjson writes it) with one more
    field at its end: a record's stored form is its canonical JSON plus ``hash``, written
    without encoding the record a second time."""
    if not encoded.endswith(b"}") or encoded == b"{}":
        raise ValueError("not a non-empty JSON object")
    return b"".join((encoded[:-1], b",", orjson.dumps(name), b":", orjson.dumps(value), b"}"))


def checkpoint_message(
    *, writer: str, seq: int, prev: str, time: str, key_id: str, final: bool
) -> bytes:
    """The bytes a checkpoint signs (domain-separated canonical JSON)."""
    body = {"final": final, "key_id": key_id, "prev": prev, "seq": seq, "time": time,
            "writer": writer}
    return _DOMAIN + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def checkpoint_message_of(record: dict[str, Any]) -> bytes | None:
    """The signed message a checkpoint record claims, or None when its fields are malformed."""
    details = record.get("details")
    if not isinstance(details, dict):
        return None
    writer, seq, prev, time = (record.get(k) for k in ("writer", "seq", "prev", "time"))
    key_id, final = details.get("key_id"), details.get("final")
    if not (isinstance(writer, str) and isinstance(seq, int) and isinstance(prev, str)
            and isinstance(time, str) and isinstance(key_id, str) and isinstance(final, bool)):
        return None
    return checkpoint_message(
        writer=writer, seq=seq, prev=prev, time=time, key_id=key_id, final=final
    )


def is_checkpoint(record: dict[str, Any]) -> bool:
    return record.get("event") == CHECKPOINT_EVENT


def record_id(writer: str, entry_id: str) -> str:
    """A record's ``id``: its writer and its Redis stream entry id, e.g. ``w1/1700000000000-0``."""
    return f"{writer}/{entry_id}"


def entry_of(record_id_value: object) -> tuple[int, int] | None:
    """The stream position ``(ms, n)`` of a record id, or None when it has none."""
    if not isinstance(record_id_value, str):
        return None
    _, _, entry = record_id_value.rpartition("/")
    ms, sep, n = entry.partition("-")
    if not sep or not (entry.isascii() and ms.isdigit() and n.isdigit()):  # "¹".isdigit()
        return None
    return int(ms), int(n)


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. ``2026-11-26T05:39:23.123Z``."""
    # Rounded to the microsecond as datetime.fromtimestamp does, then cut to milliseconds.
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    second = int(whole)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    elif us < 0:
        second, us = second - 1, us + 1_000_000
    return f"{_second(second)}.{us // 1000:03d}Z"


@functools.lru_cache(maxsize=256)  # every record formats one; most share their second
def _second(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))


def parse_time(value: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (``Z`` or offset), or None if malformed."""
    if not isinstance(value, str):
        return None
    value = value.upper()  # RFC 3339 §5.6 allows "t" and "z"
    if "T" not in value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
