"""Audit records for people and spreadsheets: table, CSV, JSON and NDJSON output. Pure.

Records carry attacker-controlled text (a ``user_agent``, the claims of a refused token), so
every output is made harmless first: control characters (C0, DEL, C1), bidirectional overrides
and line separators are written as ``\\xNN`` / ``\\uNNNN`` in tables and CSV; JSON output is
ASCII-only (everything else escaped by the encoder); a CSV cell that a spreadsheet would read as
a formula (leading ``=``, ``+``, ``-``, ``@``) is prefixed with ``'``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from typing import IO, Any

FORMATS = ("table", "json", "ndjson", "csv")
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_FORMULA = ("=", "+", "-", "@")

# The table: (heading, record field, width). The last column is not padded.
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("TIME", "time", 24),
    ("EVENT", "event", 16),
    ("DECISION", "decision", 8),
    ("REASON", "reason", 20),
    ("N", "count", 3),
    ("SUBJECT", "subject", 44),
    ("ROLE", "role", 24),
    ("SERVICE ACCOUNT", "service_account", 40),
    ("CLIENT", "client_ip", 15),
    ("USER AGENT", "user_agent", 40),
)

# CSV: every field of DESIGN.md §5, then the details (JSON) and the chain fields.
CSV_COLUMNS = (
    "id", "time", "request_id", "event", "decision", "reason", "count", "subject_verified",
    "issuer", "subject", "namespace", "kubernetes_service_account",
    "kubernetes_service_account_uid", "pod", "pod_uid", "jti", "subject_token_sha256", "role",
    "service_account", "scopes", "lifetime_s", "expires_at", "cache", "access_token_sha256",
    "client_ip", "user_agent", "latency_ms", "details", "writer", "seq", "prev", "hash",
)


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch == "\\":
        return "\\\\"
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def safe_text(value: object) -> str:
    """``value`` as one line of harmless text (see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = " ".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = json_line(value)
    else:
        text = str(value)
    return _UNSAFE.sub(_escape, text)


def csv_cell(value: object) -> str:
    """A CSV cell that no spreadsheet evaluates."""
    text = safe_text(value)
    return "'" + text if text.lstrip().startswith(_FORMULA) else text


def json_line(value: Any) -> str:
    """Compact, ASCII-only JSON (nothing a terminal could act on)."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=False)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


class RecordWriter:
    """Writes records one at a time in one of :data:`FORMATS` (JSON as one array)."""

    def __init__(self, fmt: str, out: IO[str]) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt = fmt
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        self._first = True

    def begin(self) -> None:
        if self.fmt == "table":
            self._out.write(_row([h for h, _, _ in TABLE_COLUMNS]) + "\n")
        elif self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)
        elif self.fmt == "json":
            self._out.write("[")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.fmt == "table":
            self._out.write(_row([safe_text(record.get(f)) for _, f, _ in TABLE_COLUMNS]) + "\n")
        elif self._csv is not None:
            self._csv.writerow([csv_cell(record.get(c)) for c in CSV_COLUMNS])
        elif self.fmt == "json":
            self._out.write(("\n" if self._first else ",\n") + json_line(record))
        else:
            self._out.write(json_line(record) + "\n")
        self._first = False

    def end(self) -> None:
        if self.fmt == "json":
            self._out.write("\n]\n" if not self._first else "]\n")
        self._out.flush()


def _row(cells: Sequence[str]) -> str:
    parts = []
    for (_, _, width), cell in zip(TABLE_COLUMNS, cells, strict=True):
        parts.append(_cut(cell, width).ljust(width))
    return "  ".join(parts).rstrip()


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The access-review report as text lines (every value escaped)."""
    s = safe_text
    totals = report.get("totals") or {}
    lines = [
        f"Access review {s(report.get('from_day'))} .. {s(report.get('to_day'))} "
        f"({s(report.get('days'))} UTC days)",
        "token requests: " + ", ".join(f"{s(k)} {s(v)}" for k, v in totals.items()),
        "",
        "Issued, per role and GCP service account:",
    ]
    issuance = report.get("issuance") or []
    lines += [f"  {s(e.get('count')):>8}  {s(e.get('role')):<32}  {s(e.get('service_account'))}"
              for e in issuance] or ["  (none)"]
    lines += ["", "Issued, per GCP service account:"]
    lines += [f"  {s(e.get('count')):>8}  {s(e.get('service_account')):<48}  roles: "
              f"{s(', '.join(str(r) for r in e.get('roles') or []))}"
              for e in report.get("service_accounts") or []] or ["  (none)"]
    lines += ["", "Refused, by reason:"]
    lines += [f"  {s(e.get('count')):>8}  {s(e.get('decision')):<8}  {s(e.get('reason'))}"
              for e in report.get("refusals") or []] or ["  (none)"]
    subjects = report.get("refused_subjects") or []
    lines += ["", f"Subjects refused most (top {len(subjects)} of "
                  f"{s(report.get('refused_subjects_distinct'))}):"]
    lines += [f"  {s(e.get('count')):>8}  "
              f"{'verified  ' if e.get('subject_verified') else 'unverified'}  "
              f"{s(e.get('subject')) or '(no subject)'}  ({s(e.get('issuer')) or 'no issuer'})"
              for e in subjects] or ["  (none)"]
    never = report.get("roles_never_used") or []
    lines += ["", f"Roles never used ({len(never)} of {s(report.get('roles_in_table'))} in the "
                  "current table):"]
    lines += [f"  {s(r)}" for r in never] or ["  (none)"]
    return lines
