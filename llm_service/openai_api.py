"""The OpenAI-compatible ``/v1`` API, relayed to the upstream.

A drop-in ``base_url`` for OpenAI SDKs: the gateway validates what it must
understand, passes the rest through, and adds its pipeline (correlation IDs,
limits, retries before the first byte, logs, the OpenAI error shape).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g

from .auth import visible_models
from .lmstudio.sse import SSEEvent
from .openapi import STREAMED_ERRORS, UPSTREAM_ERRORS, UPSTREAM_FAILURES, documented
from .relayed import relay_json
from .schemas import (
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    EmbeddingRequestSchema,
    OpenAIErrorResponseSchema,
    load_json_body,
)
from .streaming import event_stream_response, relay, sse
from .upstreams import Upstream, get_upstream

bp = Blueprint("openai", __name__, url_prefix="/v1")

chat_schema = ChatCompletionRequestSchema()
completion_schema = CompletionRequestSchema()
embedding_schema = EmbeddingRequestSchema()

DONE = b"data: [DONE]\n\n"
#: What the upstream answers is relayed as it is: OpenAI's objects, or its events.
RELAYED = {"application/json": {"type": "object"}}
STREAMED = {**RELAYED, "text/event-stream": None}


def _without_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``null`` fields SDKs send for options left unset."""
    return {key: value for key, value in data.items() if value is not None}


def _relay_or_answer(upstream: Upstream, path: str, payload: dict[str, Any]):
    if payload.get("stream"):
        return event_stream_response(
            relay(
                upstream.open_stream(path, payload),
                # The upstream's events go out as they came (names, ids and
                # multi-line data kept), their data never re-encoded.
                SSEEvent.encode,
                _done,
                sse,
            )
        )
    return _post(path, payload, upstream)


def _done() -> bytes:
    """The end of a relayed stream, after a comment with the time it queued."""
    waited = g.get("queue_time")
    comment = f": queue_time={waited:.3f}\n\n".encode() if waited is not None else b""
    return comment + DONE


def _post(
    path: str, payload: dict[str, Any], upstream: Upstream | None = None
) -> dict[str, Any] | Response:
    """Relay a non-streamed call; the upstream's object is answered as it is."""
    return relay_json((upstream or get_upstream()).post_json(path, payload))


@bp.get("/models")
@documented(
    answers={200: RELAYED},
    errors=UPSTREAM_FAILURES,
    error_schema=OpenAIErrorResponseSchema,
)
def list_models():
    """List the upstream's models (OpenAI ``list`` object).

    With several hosts, each model once, with ``loaded_on`` and ``available_on``
    naming the hosts where it is loaded and where it is listed. A key limited
    to some models sees those only.
    """
    return visible_models(get_upstream().list_models())


@bp.post("/chat/completions")
@documented(
    body=ChatCompletionRequestSchema,
    answers={200: STREAMED},
    errors=STREAMED_ERRORS,
    error_schema=OpenAIErrorResponseSchema,
)
def chat_completions():
    """Create a chat completion; ``"stream": true`` relays server-sent events."""
    upstream = get_upstream()  # once: each look-up goes through current_app
    payload = upstream.request_defaults(load_json_body(chat_schema))
    return _relay_or_answer(upstream, "/v1/chat/completions", payload)


@bp.post("/completions")
@documented(
    body=CompletionRequestSchema,
    answers={200: STREAMED},
    errors=STREAMED_ERRORS,
    error_schema=OpenAIErrorResponseSchema,
)
def completions():
    """Create a text completion; ``"stream": true`` relays server-sent events."""
    upstream = get_upstream()
    payload = upstream.request_defaults(load_json_body(completion_schema))
    return _relay_or_answer(upstream, "/v1/completions", payload)


@bp.post("/embeddings")
@documented(
    body=EmbeddingRequestSchema,
    answers={200: RELAYED},
    errors=UPSTREAM_ERRORS,
    error_schema=OpenAIErrorResponseSchema,
)
def embeddings():
    """Create embeddings."""
    data = load_json_body(embedding_schema)
    # No model resolution here: the loaded chat model cannot embed; the upstream
    # picks its embedding model when none is named.
    return _post("/v1/embeddings", _without_nulls(data))
