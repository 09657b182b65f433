"""The README stays true: every error reason and every setting is documented."""

from __future__ import annotations

import re

from pydantic import BaseModel

from broker import identity
from broker.settings import Settings
from tests.support import REPO

README = (REPO / "README.md").read_text()


def _reasons_in_code() -> set[str]:
    found = set(identity.REASONS)
    for path in (REPO / "broker").rglob("*.py"):
        found.update(re.findall(r'reason="([a-z_]+)"', path.read_text()))
        found.update(re.findall(r'default_reason = "([a-z_]+)"', path.read_text()))
    found |= {"rate_limited_client_ip", "rate_limited_subject"}  # built as f"rate_limited_{kind}"
    # Codes that are not refusals, or internal fallbacks.
    return found - {"issued", "allowed", "internal_error", "invalid_request", "invalid_token",
                    "unavailable", "forbidden", "unauthenticated", "not_found", "method_not_allowed",
                    "rate_limited"}


def test_every_reason_is_in_troubleshooting():
    section = README.split("## Troubleshooting", 1)[1]
    missing = sorted(r for r in _reasons_in_code() if f"`{r}`" not in section)
    assert not missing, f"reasons missing from README troubleshooting: {missing}"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf setting, written as the README writes it (``issuers[].audiences``)."""
    out = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            out |= _keys(args[0], f"{prefix}{name}[].")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_setting_is_in_the_configuration_reference():
    section = README.split("## Configuration reference", 1)[1].split("### The role table")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = []
    for key in sorted(_keys(Settings)):
        parent, _, leaf = key.rpartition(".")
        documented = any(
            f"`{key}`" in row
            or (parent and f"`{parent}." in row and (f"`{leaf}`" in row or f"{leaf}`" in row))
            for row in rows
        )
        if not documented:
            missing.append(key)
    assert not missing, f"settings missing from README: {missing}"
