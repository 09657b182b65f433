"""What an attacker with write access to Redis can do to the audit log (tests only).

Streams cannot be edited in the middle, so each tampering rebuilds the writer's stream with
explicit entry ids, as someone with full Redis access would (DEL + XADD, or RESTORE).
"""

from __future__ import annotations

from typing import Any

import orjson

from broker.auditchain import chain_hash
from broker.auditstore import AuditKeys


def entries(client: Any, keys: AuditKeys, writer: str) -> list[tuple[str, dict[str, Any]]]:
    """(entry id, record without id) in stream order."""
    out = []
    for entry_id, fields in client.xrange(keys.chain(writer)):
        out.append((entry_id.decode(), orjson.loads(fields[b"r"])))
    return out


def rewrite(client: Any, keys: AuditKeys, writer: str,
            rows: list[tuple[str, dict[str, Any]]]) -> None:
    key = keys.chain(writer)
    client.delete(key)
    for entry_id, body in rows:
        client.xadd(key, {"r": orjson.dumps(body)}, id=entry_id)


def record_id(writer: str, entry_id: str) -> str:
    return f"{writer}/{entry_id}"


def change_field(client: Any, keys: AuditKeys, writer: str, index: int, *, rehash: bool,
                 **fields: Any) -> str:
    """Change fields of the index-th record (optionally recomputing its hash); returns its id."""
    rows = entries(client, keys, writer)
    entry_id, body = rows[index]
    body.update(fields)
    if rehash:
        body["hash"] = chain_hash(body)
    rows[index] = (entry_id, body)
    rewrite(client, keys, writer, rows)
    return record_id(writer, entry_id)


def delete_record(client: Any, keys: AuditKeys, writer: str, index: int) -> str:
    """XDEL the index-th record; returns the id of the record after it."""
    rows = entries(client, keys, writer)
    client.xdel(keys.chain(writer), rows[index][0])
    return record_id(writer, rows[index + 1][0])


def insert_forged(client: Any, keys: AuditKeys, writer: str, after: int,
                  template_index: int = 0, **fields: Any) -> str:
    """Insert a forged record after the ``after``-th, claiming the next seq and linking to its
    predecessor with a correct hash (what someone with the public key only can compute)."""
    rows = entries(client, keys, writer)
    prev_id, prev = rows[after]
    forged = dict(rows[template_index][1])
    forged.update(seq=prev["seq"] + 1, prev=prev["hash"], **fields)
    forged["hash"] = chain_hash(forged)
    rows.insert(after + 1, ("", forged))
    rows = _increasing(rows)
    rewrite(client, keys, writer, rows)
    return record_id(writer, rows[after + 1][0])


def _increasing(rows: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Give entries without an id (or one not above its predecessor's) the next free id."""
    out: list[tuple[str, dict[str, Any]]] = []
    last = (0, 0)
    for entry_id, body in rows:
        pos = tuple(int(x) for x in entry_id.split("-")) if entry_id else (0, 0)
        if pos <= last:
            pos = (last[0], last[1] + 1)
        out.append((f"{pos[0]}-{pos[1]}", body))
        last = pos
    return out


def swap(client: Any, keys: AuditKeys, writer: str, i: int, j: int) -> str:
    """Swap the contents of two stream entries; returns the id of the earlier position."""
    rows = entries(client, keys, writer)
    (a_id, a), (b_id, b) = rows[i], rows[j]
    rows[i], rows[j] = (a_id, b), (b_id, a)
    rewrite(client, keys, writer, rows)
    return record_id(writer, a_id)


def drop_newest(client: Any, keys: AuditKeys, writer: str, n: int) -> str:
    """Remove the newest ``n`` records; returns the id of the newest one left."""
    rows = entries(client, keys, writer)
    for entry_id, _ in rows[-n:]:
        client.xdel(keys.chain(writer), entry_id)
    return record_id(writer, rows[-n - 1][0])


def delete_chain(client: Any, keys: AuditKeys, writer: str) -> None:
    client.delete(keys.chain(writer), keys.sealed(writer))
