"""Output for terminals and spreadsheets: attacker-controlled text is made harmless."""

from __future__ import annotations

import csv
import io
import json

import pytest

from broker.auditformat import (
    CSV_COLUMNS,
    TABLE_COLUMNS,
    RecordWriter,
    csv_cell,
    json_line,
    report_lines,
    safe_text,
)

HOSTILE_UA = "curl/8\x1b]0;pwned\x07\x1b[2J\u009b31m\u202eevil\r\nsecond line\\x1b"
RECORD = {"id": "w/1-0", "time": "2026-01-01T00:00:00.000Z", "event": "token.exchange",
          "decision": "denied", "reason": "token_malformed", "count": 2,
          "subject": "=HYPERLINK(\"http://evil\")", "user_agent": HOSTILE_UA,
          "scopes": ["a", "b"], "details": {"k": "\x1b"}, "subject_verified": False}


def no_controls(text: str) -> bool:
    return not any((ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f
                   or c in "\u202e\u2028" for c in text)


def test_safe_text_escapes_controls_bidi_and_backslashes():
    out = safe_text(HOSTILE_UA)
    assert no_controls(out) and "\n" not in out
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out and "\\x9b" in out
    assert out.endswith("second line\\\\x1b")  # a literal backslash cannot fake an escape
    assert safe_text(None) == "" and safe_text(True) == "true" and safe_text(["a", "b"]) == "a b"
    assert safe_text("plain ünïcode ok") == "plain ünïcode ok"


@pytest.mark.parametrize("value", ["=1+1", "+1", "-2+3", "@SUM(A1)", " =cmd", "\t=1"])
def test_csv_cells_never_start_a_formula(value):
    cell = csv_cell(value)
    assert cell.startswith("'") or cell.startswith("\\x09")


def test_csv_output_round_trips_and_is_neutralised():
    buf = io.StringIO()
    w = RecordWriter("csv", buf)
    w.begin()
    w.write(RECORD)
    w.end()
    assert no_controls(buf.getvalue())
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == list(CSV_COLUMNS) and len(rows) == 2
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["subject"].startswith("'=HYPERLINK") and row["scopes"] == "a b"
    assert json.loads(row["details"].replace("\\\\", "\\")) == {"k": "\x1b"}


def test_table_output_is_one_line_per_record_without_controls():
    buf = io.StringIO()
    w = RecordWriter("table", buf)
    w.begin()
    w.write(RECORD)
    w.end()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("TIME") and no_controls(buf.getvalue())
    widths = sum(wd for _, _, wd in TABLE_COLUMNS[:-1]) + 2 * (len(TABLE_COLUMNS) - 1)
    assert len(lines[1]) <= widths + TABLE_COLUMNS[-1][2]


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_json_outputs_are_ascii_and_exact(fmt):
    buf = io.StringIO()
    w = RecordWriter(fmt, buf)
    w.begin()
    w.write(RECORD)
    w.write({"id": "w/2-0"})
    w.end()
    text = buf.getvalue()
    assert text.isascii() and no_controls(text)
    parsed = json.loads(text) if fmt == "json" else [json.loads(x) for x in text.splitlines()]
    assert parsed == [RECORD, {"id": "w/2-0"}]


def test_empty_json_is_an_empty_array():
    buf = io.StringIO()
    w = RecordWriter("json", buf)
    w.begin()
    w.end()
    assert json.loads(buf.getvalue()) == []
    with pytest.raises(ValueError):
        RecordWriter("xml", buf)


def test_report_lines_escape_everything():
    report = {"from_day": "2026-01-01", "to_day": "2026-01-30", "days": 30,
              "totals": {"issued": 1, "denied": 2, "error": 0},
              "issuance": [{"role": "r", "service_account": "sa@x", "count": 1}],
              "service_accounts": [{"service_account": "sa@x", "count": 1, "roles": ["r"]}],
              "refusals": [{"decision": "denied", "reason": "no_role", "count": 2}],
              "refused_subjects": [{"issuer": "https://i", "subject": HOSTILE_UA,
                                    "subject_verified": False, "count": 2}],
              "refused_subjects_distinct": 1, "roles_in_table": 2,
              "roles_never_used": ["idle"]}
    text = "\n".join(report_lines(report))
    assert no_controls(text) and "idle" in text and "unverified" in text
    assert "Roles never used (1 of 2" in text
    assert json_line({"a": "\u00e9"}) == '{"a":"\\u00e9"}'
