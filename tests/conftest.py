"""Shared fixtures: a clean environment, the app, its test client and CLI runner."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import responses

from llm_service import config, create_app

UPSTREAM = "http://lmstudio.test:1234"

#: Settings every unit test starts from; a test overrides what it needs.
TEST_CONFIG = {
    "TESTING": True,
    "LM_STUDIO_URL": UPSTREAM,
    "HEALTH_CACHE_SECONDS": 0,
    "LOG_LEVEL": "DEBUG",
    # Each line at once, into the test's own capture (batching: test_log_batches
    # and every gunicorn-served test, which run the default).
    "LOG_FLUSH_SECONDS": 0,
    # A private in-memory database: never the developer's instance/ one.
    "DATABASE_URL": "sqlite://",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Keep the developer's LLM_SERVICE_* variables (and .env) out of every test."""
    for name in list(os.environ):
        if name.startswith("LLM_SERVICE_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def instance_path(tmp_path, monkeypatch):
    """Give every app built in a test an empty instance folder of its own.

    Flask finds ``instance/`` next to the package, where a developer's own
    ``instance/config.py`` may live; a test writes ``config.py`` here to test
    that layer.
    """
    path = tmp_path / "instance"
    # create_app and the server settings both ask config.instance_path().
    monkeypatch.setattr(config, "instance_path", lambda: str(path))
    return path


@pytest.fixture
def app_factory():
    """Return a function building an app from TEST_CONFIG plus overrides."""
    built = []

    def build(**overrides):
        app = create_app({**TEST_CONFIG, **overrides})
        built.append(app)
        if app.config["DATABASE_URL"] == "sqlite://":
            # The private in-memory database gets its tables (usage records).
            from llm_service.db import db

            with app.app_context():
                db.create_all()
        return app

    yield build
    for app in built:
        # Its usage-record writer must not outlive the test (nor log after it).
        app.extensions["llm_service.usage"].stop()


@pytest.fixture
def app(app_factory):
    return app_factory()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def upstream():
    """A strict ``responses`` mock: every registered call must happen."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@contextlib.contextmanager
def capture_logs():
    """Capture the package's log lines exactly as the current app formats them."""
    from llm_service.logs import _HANDLER_NAME, ROOT_LOGGER

    logger = logging.getLogger(ROOT_LOGGER)
    # By name: pytest attaches its own handlers to non-propagating loggers too.
    (app_handler,) = [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]
    handler = _ListHandler()
    handler.setFormatter(app_handler.formatter)
    for log_filter in app_handler.filters:
        handler.addFilter(log_filter)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def log_output(app):
    """The ``app`` fixture's log lines (see :func:`capture_logs`)."""
    with capture_logs() as handler:
        yield handler


def _switch(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def pytest_collection_modifyitems(config, items):
    """Apply the seed's switches: SKIP_REAL_LLM_TESTS, ONLY_REAL_LLM_TESTS,
    SKIP_PERFORMANCE_TESTS and TEST_TIMEOUT (seconds per test)."""
    skip_real = _switch("SKIP_REAL_LLM_TESTS")
    only_real = _switch("ONLY_REAL_LLM_TESTS")
    skip_performance = _switch("SKIP_PERFORMANCE_TESTS")
    timeout = os.environ.get("TEST_TIMEOUT")
    for item in items:
        if "tests/live/" in str(item.fspath):
            item.add_marker(pytest.mark.real_llm)
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        is_real = item.get_closest_marker("real_llm") is not None
        if skip_real and is_real:
            item.add_marker(pytest.mark.skip(reason="SKIP_REAL_LLM_TESTS is set"))
        if only_real and not is_real:
            item.add_marker(pytest.mark.skip(reason="ONLY_REAL_LLM_TESTS is set"))
        if skip_performance and item.get_closest_marker("performance"):
            item.add_marker(pytest.mark.skip(reason="SKIP_PERFORMANCE_TESTS is set"))
        if timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(float(timeout)))
