"""What an OpenAI-compatible model server answers, built for tests."""

from __future__ import annotations

from typing import Any


def usage(prompt: int = 5, completion: int = 2) -> dict[str, int]:
    """An OpenAI ``usage`` object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_completion(
    text: str = "Hello.",
    model: str = "loaded-model",
    usage: dict | bool | None = None,
    finish: str | None = "stop",
) -> dict[str, Any]:
    """A ``chat.completion``; ``usage=None``: 5 + 2 tokens, ``False``: none."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
    }
    if usage is not False:
        body["usage"] = usage or _default_usage()
    return body


def text_completion(
    text: str = "Hello.", model: str = "loaded-model", finish: str | None = "stop"
) -> dict[str, Any]:
    """A ``text_completion`` (``POST /v1/completions``, not streamed)."""
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        "usage": _default_usage(),
    }


def chat_chunk(
    content: str | None = None,
    finish: str | None = None,
    model: str = "loaded-model",
) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a piece of content, or the finish."""
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _default_usage() -> dict[str, int]:
    return usage()
