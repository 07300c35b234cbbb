"""gunicorn.conf.py: the server settings the README promises."""

import os
import runpy
import shutil
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"
MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


@pytest.fixture
def settings(monkeypatch):
    """Load gunicorn.conf.py as gunicorn does, with no GUNICORN_* overrides."""
    for name in list(os.environ):
        if name.startswith("GUNICORN_"):
            monkeypatch.delenv(name)

    # Loading the file sets PROMETHEUS_MULTIPROC_DIR (and makes that folder)
    # for the metrics: undone after the test, or later tests' apps would read
    # their metrics from a folder that is gone.
    monkeypatch.setenv(MULTIPROC, "")
    monkeypatch.delenv(MULTIPROC)
    made = []

    def load(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        conf = runpy.run_path(str(CONF))
        made.append(os.environ.pop(MULTIPROC, None))
        return conf

    yield load
    for folder in filter(None, made):
        shutil.rmtree(folder, ignore_errors=True)


def test_binds_to_loopback_by_default(settings):
    assert settings()["bind"] == "127.0.0.1:8000"


def test_bind_is_configurable(settings):
    assert settings(GUNICORN_BIND="0.0.0.0:9000")["bind"] == "0.0.0.0:9000"


def test_one_gthread_process_with_many_threads(settings):
    conf = settings()
    # gthread with a deadline for request heads (llm_service/server.py).
    assert conf["worker_class"] == "llm_service.server.Worker"
    assert conf["workers"] == 1
    assert conf["threads"] == 4096
    assert conf["worker_connections"] > conf["threads"]


def test_one_process_per_core_when_state_is_shared(settings, monkeypatch):
    """With Redis, limits, quotas and slots are shared: every core serves."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    shared = settings(LLM_SERVICE_RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:6379/0")
    assert shared["workers"] == 3


def test_explicit_workers_win_over_the_core_count(settings):
    conf = settings(
        LLM_SERVICE_RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:6379/0",
        GUNICORN_WORKERS="5",
    )
    assert conf["workers"] == 5


def test_request_line_and_header_limits(settings):
    """README, Errors: a request line over 8 KB, a header over 32 KB are refused
    (tests/integration/test_gateway.py sends them to real gunicorn)."""
    conf = settings()
    assert conf["limit_request_line"] == 8190
    assert conf["limit_request_field_size"] == 32768
