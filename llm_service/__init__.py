"""llm-service: an HTTP gateway in front of LM Studio's local model server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

__version__ = "0.1.0"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings, logging, edge, pipeline, errors, client, routes.

    Settings come from the defaults, then ``instance/config.py``, then the
    ``LLM_SERVICE_*`` environment, then ``test_config``; they are checked once
    here and a bad one raises :class:`~llm_service.config.ConfigError`.
    """
    # Imported here so `python -m llm_service.local_backend` (standard library
    # only) runs in any Python, before the service's dependencies exist.
    from flask import Flask

    app = Flask(__name__, instance_relative_config=True)
    if test_config is None:
        # Tests never read a developer's instance/config.py.
        app.config.from_pyfile("config.py", silent=True)
    app.config.from_prefixed_env("LLM_SERVICE")
    if test_config is not None:
        app.config.from_mapping(test_config)

    from . import (
        auth,
        config,
        db,
        errors,
        limits,
        logs,
        pipeline,
        quotas,
        upstream,
        usage,
    )

    config.load_settings(app.config)
    logs.init_app(app)
    limits.init_app(app)
    pipeline.init_app(app)
    errors.init_app(app)
    upstream.init_app(app)
    db.init_app(app)
    auth.init_app(app)
    usage.init_app(app)
    quotas.init_app(app)

    from . import cli, health, message, openai_api, openapi, usage_api

    app.register_blueprint(health.bp)
    app.register_blueprint(message.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(usage_api.bp)
    openapi.init_app(app)
    cli.init_app(app)
    return app
