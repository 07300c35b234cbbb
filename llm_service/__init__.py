"""llm-service: an HTTP gateway in front of LM Studio's local model server."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

__version__ = "0.1.0"


class Gateway(Flask):
    """Flask, remembering which of its hooks and views are plain functions.

    Flask asks ``inspect`` whether each hook and view is a coroutine function
    every time it runs one: some twenty times a request here, all with the
    same answer. The answer is kept per callable (a bounded few; anything past
    :attr:`SYNC_KEPT` is asked about each time, as Flask does).
    """

    SYNC_KEPT = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_kept: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync_kept[func]
        except KeyError:
            sync = super().ensure_sync(func)
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)
        if len(self._sync_kept) < self.SYNC_KEPT:
            self._sync_kept[func] = sync
        return sync


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

    app = Gateway(
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
