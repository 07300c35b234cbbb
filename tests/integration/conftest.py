"""Integration fixtures: a fake LM Studio on loopback, the gateway under gunicorn."""

from __future__ import annotations

import pytest

from tests.databases import PostgresServer
from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import GatewayServer

#: Gateway settings for the shared module-wide gateway: quick failures, no limit.
FAST_FAILURE = {
    "LM_STUDIO_TIMEOUT": 2,
    "LM_STUDIO_CONNECT_TIMEOUT": 1,
    "LM_STUDIO_RETRIES": 2,
    "LM_STUDIO_RETRY_BUDGET": 10,
    "HEALTH_CACHE_SECONDS": 0,
    "RATE_LIMIT_REQUESTS": 100000,
    # The fake runs any number of requests at once: no queue unless a test asks.
    "UPSTREAM_SLOTS": 1000,
}


@pytest.fixture(scope="module")
def fake():
    with FakeLMStudio() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_fake(request):
    """Undo faults, records and attribute changes between tests."""
    if "fake" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("fake")
    saved = {
        name: getattr(server, name)
        for name in (
            "models",
            "loaded",
            "reply",
            "usage_mode",
            "first_token_delay",
            "stream_interval",
            "idle_timeout",
            "api_token",
        )
    }
    server.clear_faults()
    server.clear_records()
    yield
    server.clear_faults()
    for name, value in saved.items():
        setattr(server, name, value)


@pytest.fixture(scope="module")
def gateway(fake):
    """One gateway per module, in front of that module's fake."""
    with GatewayServer({"LM_STUDIO_URL": fake.url, **FAST_FAILURE}) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The gateway's database: a SQLite file, then a throwaway PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    with PostgresServer() as postgres:
        yield postgres.url
