from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from flask import Flask

from broker.app import create_app
from broker.model import AccessToken, MintRequest
from broker.settings import Settings, load_settings
from tests.support import AUDIT_SIGNING_KEY, CACHE_KEY, LocalIssuer, broker_config


@dataclass
class FakeMinter:
    """Stands in for IAM in unit tests (integration tests use the real client + emulator)."""

    calls: list[MintRequest] = field(default_factory=list)
    lifetime_override: int | None = None
    fail: Exception | None = None
    _n: Any = field(default_factory=itertools.count)

    def mint(self, request: MintRequest) -> AccessToken:
        self.calls.append(request)
        if self.fail is not None:
            raise self.fail
        lifetime = self.lifetime_override or request.lifetime_s
        return AccessToken(token=f"ya29.fake-{next(self._n)}", expires_at=time.time() + lifetime)


@dataclass
class BrokerUnderTest:
    app: Flask
    settings: Settings
    redis: Any
    minter: FakeMinter
    audit_out: io.StringIO
    issuer: LocalIssuer

    @property
    def client(self) -> Any:
        return self.app.test_client()

    def audit(self) -> list[dict[str, Any]]:
        return self.app.extensions["broker"].audit.recent(1000)


@pytest.fixture(scope="session")
def issuer() -> LocalIssuer:
    return LocalIssuer()


@pytest.fixture
def make_broker(tmp_path: Path, issuer: LocalIssuer):
    def make(clock: Any = time.time, **config: Any) -> BrokerUnderTest:
        path = broker_config(tmp_path, issuer, **config)
        settings = load_settings(path)
        server = fakeredis.FakeServer()
        client = fakeredis.FakeRedis(server=server)
        minter = FakeMinter()
        out = io.StringIO()
        app = create_app(
            settings,
            redis_client=client,
            minter=minter,
            env={"BROKER_CACHE_KEYS": CACHE_KEY, "BROKER_AUDIT_SIGNING_KEY": AUDIT_SIGNING_KEY},
            audit_out=out,
            clock=clock,
        )
        return BrokerUnderTest(app, settings, client, minter, out, issuer)

    return make


@pytest.fixture
def broker(make_broker) -> BrokerUnderTest:
    return make_broker()
