"""Answering with an upstream's JSON object as it came: its bytes, not re-encoded.

A /v1 call that is not streamed answers the upstream's object as it is. The
client parsed it once, to check it for errors (``lmstudio.client``); encoding
that object again, its keys sorted, cost time and changed nothing a client
reads. The parsed object rides along on the response for the hooks that read
the answer (usage counting), which so never parse it again.
"""

from __future__ import annotations

from typing import Any

from flask import Response


class RelayedJSON(Response):
    """A JSON response whose body is an upstream's own bytes."""

    default_mimetype = "application/json"

    def __init__(self, answer: dict[str, Any], raw: bytes) -> None:
        # The content type given: not derived from the mimetype on every answer.
        super().__init__(raw, content_type=self.default_mimetype)
        #: The parsed object the body encodes.
        self.answer = answer


def relay_json(answer: dict[str, Any]) -> dict[str, Any] | Response:
    """The response for ``answer``: its own bytes when they can go as they are.

    An object without them (not UTF-8, or not from an upstream) is returned
    for Flask to encode, as any view's dict.
    """
    raw = getattr(answer, "raw", None)
    return RelayedJSON(answer, raw) if raw is not None else answer


def answer_of(response: Response) -> dict[str, Any] | None:
    """The object a relayed response encodes, or None for any other response."""
    return response.answer if isinstance(response, RelayedJSON) else None
