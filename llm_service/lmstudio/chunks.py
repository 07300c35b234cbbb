"""Reading what the upstream generates: completions, chunks and usage, strictly.

The one reader of OpenAI's generation objects: a ``chat.completion``, a
``text_completion`` (non-streamed answers), a ``chat.completion.chunk`` (one
streamed event), and the two things every stream is checked for (an in-stream
error, a finish). What the gateway takes from them (text, model, finish reason,
usage) is read here and nowhere else. A shape that is not the API's is an
error, never a silent skip or a crash, so a stream that re-renders chunks
always ends with its success or its error event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import LMStudioProtocolError, error_message, safe_excerpt
from .sse import SSEEvent

#: Characters of a malformed answer kept for the error's ``body``.
BODY_EXCERPT = 300


class UpstreamObject(dict):
    """An upstream's JSON object, with the bytes it came in.

    ``raw`` is those bytes when they can be relayed as they are (UTF-8 JSON,
    an object), else None. Whoever changes the object must not relay ``raw``.
    """

    __slots__ = ("raw",)

    def __init__(self, parsed: dict[str, Any], raw: bytes) -> None:
        super().__init__(parsed)
        # UTF-8 (no byte-order mark, no UTF-16/32): what a JSON answer is
        # read as. Anything else is encoded again by whoever answers it.
        # The first byte first: lstrip() copies the whole body.
        starts = raw[:1] == b"{" or raw.lstrip()[:1] == b"{"
        self.raw = raw if starts else None


@dataclass(frozen=True)
class Usage:
    """Token counts the upstream reported for one completion."""

    prompt: int
    completion: int
    total: int


@dataclass(frozen=True)
class ChatResult:
    """The parts of a completion (chat or text) the gateway answers with."""

    text: str
    model: str
    finish_reason: str | None
    usage: Usage | None
    request_id: str | None = None


@dataclass(frozen=True)
class ChatChunk:
    """What one streamed chat chunk says; None where it says nothing."""

    model: str | None
    content: str | None
    finish_reason: str | None
    usage: Usage | None


def parse_usage(raw: Any) -> Usage | None:
    """Parse an OpenAI ``usage`` object; missing, malformed or all-zero: unknown."""
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    total = raw.get("total_tokens")
    # Once per call: plain tests, no generator. bool is an int, not a count.
    for count in (prompt, completion, total):
        if not isinstance(count, int) or isinstance(count, bool):
            return None
    if not (prompt or completion or total):
        return None
    return Usage(prompt=prompt, completion=completion, total=total)


# -- non-streamed answers ----------------------------------------------------


def read_chat_completion(
    body: dict[str, Any], *, model: str = "", request_id: str | None = None
) -> ChatResult:
    """Read a ``chat.completion``; raise LMStudioProtocolError without a message.

    ``model`` is the requested model, answered when the upstream names none.
    """
    return _read_completion(body, "chat", model, request_id)


def read_text_completion(
    body: dict[str, Any], *, model: str = "", request_id: str | None = None
) -> ChatResult:
    """Read a ``text_completion``; raise LMStudioProtocolError without a text."""
    return _read_completion(body, "text", model, request_id)


def _read_completion(
    body: dict[str, Any], kind: str, model: str, request_id: str | None
) -> ChatResult:
    try:
        choice = body["choices"][0]
        if kind == "chat":
            text = choice["message"].get("content") or ""
        else:
            text = choice["text"] or ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        what = "message" if kind == "chat" else "text"
        raise LMStudioProtocolError(
            f"The upstream's {kind} completion has no {what}.",
            status=200,
            body=safe_excerpt(str(body), BODY_EXCERPT),
            request_id=request_id,
        ) from err
    return ChatResult(
        text=text,
        model=str(body.get("model") or model or ""),
        finish_reason=choice.get("finish_reason"),
        usage=parse_usage(body.get("usage")),
        request_id=request_id,
    )


# -- streamed chunks ---------------------------------------------------------


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


def stream_error(event: SSEEvent) -> str | None:
    """The message of an in-stream error event (chat or text), or None.

    Only an ``error`` key makes a chunk an error (a chunk may say "message").
    Cheap test first: most chunks carry no error and skip the JSON parse, which
    the ``/v1`` relay never needs otherwise.
    """
    if '"error"' not in event.data:
        return None
    try:
        payload = event.json()
    except ValueError:
        return None
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    return error_message(payload)[0] or "unknown error"


def finishes(event: SSEEvent) -> bool:
    """Tell whether a chunk (chat or text) has a non-null ``finish_reason``.

    No JSON parse: content is JSON-escaped, so an unescaped ``"finish_reason":``
    can only be the key itself.
    """
    compact = event.data.replace(" ", "")
    return '"finish_reason":' in compact and '"finish_reason":null' not in compact
