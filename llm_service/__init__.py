"""llm-service: an HTTP gateway in front of LM Studio's local model server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

__version__ = "0.1.0"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings, logging, edge, pipeline, errors, client, routes.

    Settings come from the defaults, then ``instance/config.py``, then the
    ``LLM_SERVICE_*`` environment, then ``test_config``; they are checked once
    here and a bad one raises :class:`~llm_service.config.ConfigError`.
    """
    from . import (
        config,
        errors,
        limits,
        logs,
        metrics,
        pipeline,
        schemas,
        store,
        tracing,
        upstreams,
    )

    app = Flask(
        __name__, instance_path=config.instance_path(), instance_relative_config=True
    )
    # Tests never read a developer's instance/config.py.
    config.read_layers(app.config, test_config)

    from . import auth, db, quotas, usage

    logs.init_app(app)
    schemas.init_app(app)
    store.init_app(app)
    limits.init_app(app)
    pipeline.init_app(app)
    errors.init_app(app)
    upstreams.init_app(app)
    db.init_app(app)
    auth.init_app(app)
    usage.init_app(app)
    quotas.init_app(app)
    metrics.init_app(app)
    tracing.init_app(app)

    from . import cli, health, message, openai_api, openapi, status, usage_api

    app.register_blueprint(health.bp)
    app.register_blueprint(message.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(usage_api.bp)
    status.init_app(app)
    openapi.init_app(app)
    cli.init_app(app)
    return app
