"""Blueprint: ``POST /llm/message``, the seed's chat contract."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app

from .lmstudio import LMStudioConnectionError, NoModelLoadedError
from .pipeline import correlation_id
from .schemas import MessageRequestSchema, MessageResponseSchema, load_json_body
from .upstream import get_upstream

bp = Blueprint("message", __name__, url_prefix="/llm")

request_schema = MessageRequestSchema()
response_schema = MessageResponseSchema()


def resolve_model(requested: str | None) -> str:
    """Return the model to ask for: the request's, the configured, or a loaded one."""
    if requested:
        return requested
    if current_app.config["DEFAULT_MODEL"]:
        return current_app.config["DEFAULT_MODEL"]
    report = get_upstream().health()
    if not report.reachable:
        raise LMStudioConnectionError(f"Upstream not reachable: {report.error}")
    if not report.servable_models:
        raise NoModelLoadedError("The upstream lists no model that can answer.")
    return report.servable_models[0]


def chat_payload(data: dict[str, Any]) -> dict[str, Any]:
    """Turn a validated request into the upstream's chat completion body."""
    payload = dict(data)
    payload["model"] = resolve_model(data.get("model"))
    payload.setdefault("max_tokens", current_app.config["DEFAULT_MAX_TOKENS"])
    payload["stream"] = False
    return payload


@bp.post("/message")
def send_message():
    """Send a conversation to the model and return its answer."""
    started = time.perf_counter()
    payload = chat_payload(load_json_body(request_schema))
    result = get_upstream().client.chat_completion(
        payload, correlation_id=correlation_id()
    )
    usage = result.usage
    return response_schema.dump(
        {
            "response": result.text,
            "model": result.model,
            "tokens_used": usage.total if usage else None,
            "processing_time": round(time.perf_counter() - started, 4),
            "correlation_id": correlation_id(),
            "finish_reason": result.finish_reason,
            "usage": vars(usage) if usage else None,
        }
    )
