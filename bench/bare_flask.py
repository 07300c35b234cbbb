"""The ceiling: a bare Flask app that answers the gateway's routes with no upstream.

Served by the same gunicorn settings as the gateway
(``gunicorn -c gunicorn.conf.py bench.bare_flask:app``), it parses the JSON
body like any gateway must and answers the fixed chat completion nginx serves,
so the gap between it and the gateway is what the gateway's own work costs
(validation, limits, logging, headers, the upstream call).
"""

from __future__ import annotations

from flask import Flask, Response, request

from .upstreams import CHAT_COMPLETION_BYTES


def create_app() -> Flask:
    """Build the bare app: two POST routes, one fixed answer."""
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    @app.post("/llm/message")
    def answer() -> Response:
        request.get_json()
        return Response(CHAT_COMPLETION_BYTES, mimetype="application/json")

    @app.get("/health/live")
    def live() -> Response:
        return Response(b'{"status":"alive"}', mimetype="application/json")

    return app


app = create_app()
