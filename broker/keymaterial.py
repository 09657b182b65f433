"""Secret keys given as comma-separated base64 in an environment variable (cache keys, role-table
MAC keys): parsing shared by both, with problems that name an entry's position, never its
content."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from broker.errors import ConfigError


def b64decode_any(text: str) -> bytes | None:
    """Standard or urlsafe base64, padding optional; None when it is not base64."""
    std = text.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    try:
        return base64.b64decode(std, validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_key_list(
    value: str,
    env_var: str,
    size_problem: Callable[[bytes], str | None],
    *,
    reject_empty: bool,
) -> tuple[bytes, ...]:
    """Decode each comma-separated entry; ``size_problem`` says what is wrong with a key's
    length (None: fine). A key repeated later is ignored. Raises :class:`ConfigError`."""
    keys: list[bytes] = []
    problems: list[str] = []
    for pos, raw in enumerate(value.split(","), start=1):
        entry = raw.strip()
        if reject_empty and not entry:
            problems.append(f"entry {pos}: empty")
            continue
        key = b64decode_any(entry)
        if key is None:
            problems.append(f"entry {pos}: not base64")
        elif (problem := size_problem(key)) is not None:
            problems.append(f"entry {pos}: {problem}")
        elif key not in keys:
            keys.append(key)
    if problems:
        raise ConfigError(env_var, problems)
    return tuple(keys)
