"""``token-broker token``: its exit codes for what can go wrong before and after the request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from broker.cli import cli


class _Answer:
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status_code, self._body, self.headers = status, body, headers or {}

    def json(self) -> Any:
        if self._body is None:
            raise ValueError("not JSON")
        return self._body


def run(tmp_path: Path, *args: str, answer: _Answer | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None, token: bytes = b"eyJ.x.y") -> Any:
    (tmp_path / "t.jwt").write_bytes(token)
    if monkeypatch is not None and answer is not None:
        monkeypatch.setattr(requests, "post", lambda *a, **k: answer)
    return CliRunner().invoke(
        cli, ["token", "--token-file", str(tmp_path / "t.jwt"), *args]
    )


def test_a_token_file_that_is_not_text_is_bad_usage(tmp_path: Path) -> None:
    res = run(tmp_path, "--server", "http://127.0.0.1:1", token=b"\xff\xfe\x00garbage")
    assert res.exit_code == 2 and "not UTF-8 text" in res.output


def test_a_server_without_a_scheme_is_bad_usage(tmp_path: Path) -> None:
    res = run(tmp_path, "--server", "127.0.0.1:8080")
    assert res.exit_code == 2 and "http:// or https://" in res.output


def test_the_scheme_may_be_upper_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = _Answer(200, {"access_token": "ya29.x"})
    res = run(tmp_path, "--server", "HTTP://broker", answer=answer, monkeypatch=monkeypatch)
    assert res.exit_code == 0 and res.output.strip() == "ya29.x"


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (_Answer(200, {"access_token": "ya29.x"}), 0),
        (_Answer(400, {"error": "invalid_target", "error_description": "no"}), 1),
        # IAM refused the broker: retrying will not help
        (_Answer(502, {"error": "server_error", "error_description": "IAM refused"}), 1),
        (_Answer(502, None), 3),  # a proxy's bad gateway: retry
        (_Answer(503, {"error": "temporarily_unavailable"}, {"Retry-After": "1"}), 3),
        (_Answer(429, {"error": "slow_down"}, {"Retry-After": "30"}), 3),
    ],
)
def test_exit_codes_follow_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: _Answer, code: int
) -> None:
    res = run(tmp_path, "--server", "http://broker", answer=answer, monkeypatch=monkeypatch)
    assert res.exit_code == code, res.output
