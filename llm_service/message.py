"""``POST /llm/message``: send a conversation, get the model's answer (or a stream)."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g

from .lmstudio.chunks import Usage, read_chat_chunk
from .lmstudio.sse import SSEEvent
from .openapi import STREAMED_ERRORS, documented
from .pipeline import correlation_id
from .schemas import MessageRequestSchema, MessageResponseSchema, load_json_body
from .streaming import event_stream_response, relay, sse
from .upstreams import get_upstream

bp = Blueprint("message", __name__, url_prefix="/llm")

request_schema = MessageRequestSchema()
response_schema = MessageResponseSchema()


def chat_payload(data: dict[str, Any]) -> dict[str, Any]:
    """Turn a validated request into the upstream's chat completion body."""
    payload = get_upstream().request_defaults(data)
    payload["stream"] = False
    return payload


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
            "model": get_upstream().answering_model(model),
            "tokens_used": usage.total if usage else None,
            "processing_time": round(time.perf_counter() - started, 4),
            "correlation_id": correlation_id(),
            "finish_reason": finish_reason,
            "usage": vars(usage) if usage else None,
            "queue_time": _rounded(g.get("queue_time")),
        }
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


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
    result = get_upstream().chat_completion(payload)
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
    upstream = get_upstream().open_stream("/v1/chat/completions", payload)
    rendering = MessageStream(payload["model"], started)
    return event_stream_response(
        relay(
            upstream,
            rendering.render,
            rendering.finish,
            lambda body: sse(body, event="error"),
        )
    )
