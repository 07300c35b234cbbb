"""Live fixtures: a real model server and the real gateway (gunicorn) in front.

The configured upstream (``LLM_SERVICE_LM_STUDIO_URL``, or HOST/PORT, default
``http://localhost:1234``) is used when it answers; otherwise the bundled
llama.cpp server is installed if needed, started on a free loopback port and
stopped afterwards. A server that fails to start fails the live tests with the
reason: skipping them takes SKIP_REAL_LLM_TESTS=true.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

import local_backend
from llm_service.config import upstream_base_url
from tests.servers import GatewayServer, free_port

# Read at import, before the autouse fixture clears LLM_SERVICE_* for each test.
_CONFIGURED_URL = upstream_base_url(
    {
        "LM_STUDIO_URL": os.environ.get("LLM_SERVICE_LM_STUDIO_URL"),
        "LM_STUDIO_HOST": os.environ.get("LLM_SERVICE_LM_STUDIO_HOST", "localhost"),
        "LM_STUDIO_PORT": os.environ.get("LLM_SERVICE_LM_STUDIO_PORT", "1234"),
    }
)
_CONFIGURED_TOKEN = os.environ.get("LLM_SERVICE_LM_STUDIO_API_TOKEN")

#: Settings of the live gateway: generous timeouts for a CPU-bound model.
LIVE_SETTINGS = {
    "LM_STUDIO_TIMEOUT": 120,
    "LM_STUDIO_RETRY_BUDGET": 150,
    "RATE_LIMIT_REQUESTS": 10000,
    "HEALTH_CACHE_SECONDS": 0,
    "DEFAULT_MAX_TOKENS": 32,
}


@dataclass
class ModelServer:
    """The model server the live tests talk to."""

    url: str
    model: str
    #: The bundled server when the tests started it (they may stop and restart it).
    process: local_backend.LocalModelServer | None


@pytest.fixture(scope="session")
def model_server():
    if local_backend.is_model_server_up(_CONFIGURED_URL):
        models = local_backend.list_models(_CONFIGURED_URL) or ["unknown"]
        yield ModelServer(_CONFIGURED_URL, models[0], None)
        return
    try:
        python = local_backend.ensure_installed()
        local_backend.ensure_model(python)
        server = local_backend.LocalModelServer(port=free_port(), python=python)
        server.start(timeout=300)
    except local_backend.LocalBackendError as err:
        pytest.fail(
            f"no model server answers at {_CONFIGURED_URL} and the bundled one "
            f"could not start: {err}\n(set SKIP_REAL_LLM_TESTS=true to skip the "
            "live tests on purpose)"
        )
    try:
        yield ModelServer(server.url, server.model, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_gateway(model_server):
    settings = {"LM_STUDIO_URL": model_server.url, **LIVE_SETTINGS}
    if _CONFIGURED_TOKEN:
        settings["LM_STUDIO_API_TOKEN"] = _CONFIGURED_TOKEN
    with GatewayServer(settings) as gateway:
        yield gateway
