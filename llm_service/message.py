"""``POST /llm/message``: send a conversation, get the model's answer (or a stream)."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app

from .lmstudio import (
    NoModelLoadedError,
    SSEEvent,
    Usage,
    read_chat_chunk,
)
from .openapi import STREAMED_ERRORS, documented
from .pipeline import correlation_id
from .schemas import MessageRequestSchema, MessageResponseSchema, load_json_body
from .streaming import (
    event_stream_response,
    hangup_cancels,
    open_upstream_stream,
    relay,
    sse,
)
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
    upstream = get_upstream()
    models = upstream.servable_models()
    if models:
        return models[0]
    if not upstream.health().reachable:
        # Ask the way a request naming a model would (with its retries), so a
        # bad token, a wrong path or a web server fail with their own codes.
        models = upstream.client.list_models(correlation_id=correlation_id())
        if models:
            return models[0]
    raise NoModelLoadedError("The upstream lists no model that can answer.")


def chat_payload(data: dict[str, Any]) -> dict[str, Any]:
    """Turn a validated request into the upstream's chat completion body."""
    payload = dict(data)
    payload["model"] = resolve_model(data.get("model"))
    payload.setdefault("max_tokens", current_app.config["DEFAULT_MAX_TOKENS"])
    payload["stream"] = False
    return payload


def answering_model(reported: str) -> str:
    """The model that answered, rather than an echo of the requested name."""
    sole = get_upstream().sole_model()
    return sole if sole is not None and reported != sole else reported


def answer(
    text: str,
    model: str,
    finish_reason: str | None,
    usage: Usage | None,
    started: float,
) -> dict[str, Any]:
    """The answer's fields, streamed or not; unknown token counts stay null."""
    return response_schema.dump(
        {
            "response": text,
            "model": answering_model(model),
            "tokens_used": usage.total if usage else None,
            "processing_time": round(time.perf_counter() - started, 4),
            "correlation_id": correlation_id(),
            "finish_reason": finish_reason,
            "usage": vars(usage) if usage else None,
        }
    )


@bp.post("/message")
@documented(
    body=MessageRequestSchema,
    answers={
        200: {"application/json": MessageResponseSchema, "text/event-stream": None}
    },
    errors=STREAMED_ERRORS,
)
def send_message():
    """Send a conversation to the model and return its answer."""
    started = time.perf_counter()
    data = load_json_body(request_schema)
    streamed = data.pop("stream", False)
    payload = chat_payload(data)
    if streamed:
        return stream_message(payload, started)
    with hangup_cancels() as scope:
        result = get_upstream().client.chat_completion(
            payload, correlation_id=correlation_id(), scope=scope
        )
    return answer(
        result.text, result.model, result.finish_reason, result.usage, started
    )


class MessageStream:
    """Renders upstream chunks as ``delta`` events, then one ``done`` event."""

    def __init__(self, model: str, started: float) -> None:
        self.model = model
        self.started = started
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def render(self, event: SSEEvent) -> bytes:
        chunk = read_chat_chunk(event)  # raises on a malformed chunk
        self.model = chunk.model or self.model
        self.usage = chunk.usage or self.usage
        self.finish_reason = chunk.finish_reason or self.finish_reason
        if not chunk.content:
            return b""
        self.parts.append(chunk.content)
        return sse({"content": chunk.content}, event="delta")

    def finish(self) -> bytes:
        fields = answer(
            "".join(self.parts),
            self.model,
            self.finish_reason,
            self.usage,
            self.started,
        )
        return sse(fields, event="done")


def stream_message(payload: dict[str, Any], started: float) -> Response:
    """Answer with ``text/event-stream``: ``delta`` events, then ``done``."""
    payload = {**payload, "stream_options": {"include_usage": True}}
    upstream = open_upstream_stream("/v1/chat/completions", payload)
    rendering = MessageStream(payload["model"], started)
    return event_stream_response(
        relay(
            upstream,
            rendering.render,
            rendering.finish,
            lambda body: sse(body, event="error"),
        )
    )
