"""Reading the chunks of a streamed chat completion, strictly.

The one reader of ``chat.completion.chunk`` objects: what the gateway takes
from a chunk (model, text, finish reason, usage) and nothing else. A chunk whose
shape is not the API's is an error, never a silent skip or a crash, so a stream
that re-renders chunks always ends with its success or its error event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .client import Usage, parse_usage
from .errors import LMStudioProtocolError
from .sse import SSEEvent


@dataclass(frozen=True)
class ChatChunk:
    """What one streamed chat chunk says; None where it says nothing."""

    model: str | None
    content: str | None
    finish_reason: str | None
    usage: Usage | None


def _malformed(what: str) -> LMStudioProtocolError:
    return LMStudioProtocolError(f"The upstream sent a stream chunk {what}.")


def _optional_text(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _malformed(what)


def read_chat_chunk(event: SSEEvent) -> ChatChunk:
    """Read one ``chat.completion.chunk``; raise LMStudioProtocolError if malformed.

    Absent and ``null`` fields are tolerated (servers differ: a usage-only chunk
    has no choices, a last chunk may have no delta); a field of the wrong type
    is not. Usage stays lenient, as for non-streamed answers: a malformed one
    is unknown, not an error.
    """
    try:
        chunk = event.json()
    except ValueError as err:
        raise _malformed("that is not JSON") from err
    if not isinstance(chunk, dict):
        raise _malformed("that is not a JSON object")
    model = _optional_text(chunk.get("model"), "whose model is not a string")
    usage = parse_usage(chunk.get("usage"))
    choices = chunk.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise _malformed("whose choices are not a list")
    if not choices:
        return ChatChunk(model, None, None, usage)
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _malformed("whose choice is not an object")
    finish_reason = _optional_text(
        choice.get("finish_reason"), "whose finish_reason is not a string"
    )
    delta = choice.get("delta")
    if delta is None:
        delta = {}
    if not isinstance(delta, dict):
        raise _malformed("whose delta is not an object")
    content = _optional_text(delta.get("content"), "whose content is not a string")
    return ChatChunk(model, content, finish_reason, usage)
