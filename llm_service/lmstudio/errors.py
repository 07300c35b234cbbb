"""The client's exception tree, and the one reader of upstream error bodies.

One root, split by kind of failure.
Every exception says whether the failed call may be retried (``retryable``):
nothing reached the model, or the upstream asked us to come back later.
"""

from __future__ import annotations

import re
from typing import Any

#: Longest upstream message relayed to a client (it may echo the whole request).
MESSAGE_LIMIT = 500
MASK = "***"
# What looks like a credential in text an upstream sends back (it may echo our
# own request, Authorization header included): masked before it goes anywhere.
_SECRETS = (
    # URL userinfo: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@'\"<>]+@"), rf"\1{MASK}@"),
    # Authorization schemes: Bearer/Basic/Token <credential>
    (
        re.compile(r"(?i)\b(bearer|basic|token|apikey)(\s+|%20)[A-Za-z0-9._~+/=:-]+"),
        rf"\1\2{MASK}",
    ),
    # Well-known key shapes: sk-..., sk-proj-..., lm-studio-..., ghp_..., xoxb-...
    (
        re.compile(
            r"\b(sk|pk|rk)-[A-Za-z0-9_-]{8,}|\bgh[pousr]_[A-Za-z0-9]{16,}"
            r"|\bxox[abprs]-[A-Za-z0-9-]{8,}|\bAKIA[0-9A-Z]{16}\b"
        ),
        MASK,
    ),
    # key=value and "key": "value" pairs whose key names a secret.
    (
        re.compile(
            r"(?i)([\"']?[\w.-]*(?:api[_-]?key|token(?!s)|secret|passw(?:or)?d|pwd"
            r"|authorization|credential|session|cookie|private[_-]?key)[\w.-]*"
            r"[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&}\]]+)"
        ),
        rf"\1{MASK}",
    ),
)


class LMStudioError(Exception):
    """Root of every failure the LM Studio client raises.

    ``cause`` names the failure in the shared vocabulary of
    :mod:`~llm_service.lmstudio.diagnosis` (``dns``, ``refused``, ``auth``...):
    each class has a default, and the client sets a finer one where it can tell.
    """

    retryable = False
    cause = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        if cause is not None:
            self.cause = cause
        self.message = message
        #: HTTP status the upstream answered with, when it answered.
        self.status = status
        #: The first few hundred characters of the upstream body, for logs.
        self.body = body
        #: The upstream's own request id, when it sent one.
        self.request_id = request_id
        #: Seconds the upstream asked us to wait (``Retry-After``), capped.
        self.retry_after = retry_after
        #: Attempts made before this error was raised (set by the retry layer).
        self.attempts = 1


class LMStudioConnectionError(LMStudioError):
    """The upstream could not be reached, or dropped the connection unanswered.

    Safe to retry: the request never reached the model.
    """

    retryable = True
    cause = "unreachable"


class LMStudioConnectTimeoutError(LMStudioConnectionError):
    """The upstream did not accept the connection in time. Safe to retry."""

    cause = "timeout"


class LMStudioCancelledError(LMStudioError):
    """The caller cancelled the call (its own client went away).

    The upstream connection was closed, so the upstream stops working on it.
    """


class LMStudioTimeoutError(LMStudioError):
    """The upstream accepted the request but did not answer in time.

    Not retried: the model may still be working on it.
    """

    cause = "timeout"


class LMStudioProtocolError(LMStudioError):
    """The upstream answered with something that is not the API we speak.

    Includes bodies that are not JSON, JSON without the expected fields, and
    LM Studio's ``200 {"error": "Unexpected endpoint ..."}`` for a wrong URL.
    """

    cause = "invalid_response"


class LMStudioResponseTooLargeError(LMStudioProtocolError):
    """The upstream's answer, or one line of its stream, is over the size limit.

    Not retried: the same request would most likely get the same answer.
    """


class LMStudioStatusError(LMStudioError):
    """The upstream answered with an error status or an ``error`` body."""


class LMStudioRequestError(LMStudioStatusError):
    """The upstream rejected the request itself (4xx): retrying will not help."""

    cause = "rejected"


class LMStudioAuthError(LMStudioStatusError):
    """The upstream refused the gateway's API token (401/403)."""

    cause = "auth"


class ModelNotFoundError(LMStudioRequestError):
    """The requested model is unknown to the upstream."""

    cause = "model_not_found"


class NoModelLoadedError(LMStudioStatusError):
    """The upstream has no model loaded that could answer."""

    cause = "no_model"


class LMStudioServerError(LMStudioStatusError):
    """The upstream failed (5xx, 408). Retried within the budget."""

    retryable = True
    cause = "server_error"


class LMStudioBusyError(LMStudioServerError):
    """The upstream is overloaded or starting (429, 503). Retried after a wait."""

    cause = "busy"


class LMStudioLoopError(LMStudioStatusError):
    """The upstream is this gateway itself: the request came back around.

    Never retried: every retry would go round the loop again.
    """

    cause = "loop"


class LMStudioStreamError(LMStudioError):
    """The upstream reported an error inside a stream it had started."""

    cause = "stream_error"


class LMStudioStreamCutError(LMStudioStreamError):
    """The upstream's stream ended (or broke) before it said it was done."""


class LMStudioStreamTimeoutError(LMStudioTimeoutError):
    """A stream went quiet for too long.

    ``kind`` says which limit: ``"first_token"`` (nothing after the request),
    ``"idle"`` (silence between chunks) or ``"total"`` (the whole stream).
    """

    def __init__(self, message: str, *, kind: str, **details) -> None:
        super().__init__(message, **details)
        self.kind = kind


def error_message(body: Any) -> tuple[str | None, str | None]:
    """Return ``(message, code)`` from any of the upstream's error shapes.

    LM Studio answers ``{"error": "text"}``, ``{"error": {"message", "type",
    "code"}}``; FastAPI-based servers (llama-cpp-python) answer ``{"detail": ...}``
    and some proxies ``{"message": ...}``.
    """
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    if isinstance(error, str):
        return error, None
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message") or error.get("type") or code
        return (str(message) if message else None), (str(code) if code else None)
    for key in ("message", "detail"):
        if body.get(key):
            return str(body[key]), None
    return None, None


def redact(text: str) -> str:
    """Mask what looks like a credential: tokens, keys, URL passwords, secrets."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def safe_excerpt(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Return upstream text fit to relay: credentials masked, at most ``limit``.

    Masks before cutting (a cut could split a token the patterns would miss),
    on a bounded slice so a huge body costs little.
    """
    masked = redact(text[: limit * 2 + 200])
    if len(masked) <= limit and len(text) <= limit * 2 + 200:
        return masked
    return masked[: limit - 1] + "\u2026"
