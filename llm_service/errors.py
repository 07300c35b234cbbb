"""The error contract: every failure becomes one JSON shape, in one place.

``{"error": {"code", "message", "details"?}, "correlation_id"}``, or on the
OpenAI-compatible ``/v1`` routes OpenAI's ``{"error": {"message", "type",
"param", "code"}, "correlation_id"}`` so SDK clients raise the right exception.
This is the only module that knows both the client's exceptions and HTTP. It
maps and changes no state: what an error means for the upstream (a health
cache to drop...) is the door's business (:mod:`.upstreams`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, InternalServerError

from .lifecycle import ShuttingDownError
from .lmstudio.diagnosis import cause_of
from .lmstudio.errors import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioCancelledError,
    LMStudioConnectionError,
    LMStudioConnectTimeoutError,
    LMStudioError,
    LMStudioLoopError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioResponseTooLargeError,
    LMStudioServerError,
    LMStudioStreamCutError,
    LMStudioStreamError,
    LMStudioStreamTimeoutError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)
from .pipeline import correlation_id

log = logging.getLogger("llm_service.errors")

#: Seconds a client is told to wait when the upstream is down.
UNAVAILABLE_RETRY_AFTER = 5
OPENAI_PREFIX = "/v1/"
INTERNAL_MESSAGE = (
    "The gateway failed to handle the request. Quote the correlation ID when "
    "reporting it."
)
#: Status recorded when the client hung up first (nginx's convention): nobody
#: receives it, but the access record says what became of the request.
CLIENT_CLOSED_REQUEST = 499

#: Werkzeug's HTTP errors, by status, as registered codes; any other status gets
#: the generic code of its class, so no unregistered code is ever answered.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
}
HTTP_MESSAGES = {
    404: "The requested URL was not found on this server.",
    405: "The method is not allowed for the requested URL.",
    413: "The request body is larger than the gateway accepts.",
    415: "The request body must be JSON, sent with Content-Type: application/json.",
    500: INTERNAL_MESSAGE,
}
OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
STREAM_TIMEOUT_CODES = {
    "first_token": "upstream_first_token_timeout",
    "idle": "upstream_stream_stalled",
    "total": "stream_timeout",
}


@dataclass(frozen=True)
class ErrorCode:
    """One documented error code: the statuses it comes with and when.

    ``meaning`` says when it is an HTTP answer ("" if never); ``in_stream`` says
    when it ends a stream that has started, as an error event ("" if never).
    """

    code: str
    statuses: tuple[int, ...]
    meaning: str
    in_stream: str = ""


#: THE registry of error codes: the mapper below answers only these, and
#: ``/openapi.json`` and the README's error tables are generated from it
#: (``scripts/settings_doc.py --write``; a test keeps all three in step).
ERROR_CODES: dict[str, ErrorCode] = {
    entry.code: entry
    for entry in (
        ErrorCode(
            "invalid_json",
            (400,),
            "the body is not valid JSON / UTF-8, is nested too deeply, or holds "
            "`NaN`, `Infinity` or a number too large for a float",
        ),
        ErrorCode(
            "bad_request",
            (400,),
            "a malformed request, or a `Host` not in `LLM_SERVICE_TRUSTED_HOSTS`",
        ),
        ErrorCode(
            "upstream_rejected_request",
            (400, 413, 422),
            "the upstream refused the request (e.g. the prompt exceeds the "
            "context); its message is relayed, capped and with credentials masked",
        ),
        ErrorCode(
            "invalid_api_key",
            (401,),
            "no API key, or not a valid one (`WWW-Authenticate: Bearer`); failed "
            "attempts count against the per-address limit",
        ),
        ErrorCode("api_key_expired", (401,), "the API key is past its expiry"),
        ErrorCode("api_key_revoked", (401,), "the API key was revoked"),
        ErrorCode(
            "model_not_allowed",
            (403,),
            "the API key may not use the requested model (nothing is sent upstream)",
        ),
        ErrorCode(
            "admin_key_required",
            (403,),
            "`/metrics` and `/status` are for admin keys once keys exist",
        ),
        ErrorCode("not_found", (404,), "unknown route"),
        ErrorCode(
            "model_not_found", (404,), "the upstream does not know the requested model"
        ),
        ErrorCode(
            "method_not_allowed", (405,), "wrong method (`Allow` lists the right ones)"
        ),
        ErrorCode(
            "payload_too_large",
            (413,),
            "body over `LLM_SERVICE_MAX_REQUEST_SIZE` bytes (chunked bodies too)",
        ),
        ErrorCode(
            "unsupported_media_type", (415,), "body not sent as `application/json`"
        ),
        ErrorCode(
            "validation_error",
            (422,),
            "the body breaks the schema; `details` has a message per field",
        ),
        ErrorCode(
            "rate_limited",
            (429,),
            "over `LLM_SERVICE_RATE_LIMIT_REQUESTS` per minute (one bucket per "
            "client across routes); `Retry-After` says when to come back",
        ),
        ErrorCode(
            "token_quota_exceeded",
            (429,),
            "over the key's tokens per minute, or one request reserves more than "
            "the whole quota (then without `Retry-After`: it can never fit)",
        ),
        ErrorCode(
            "concurrency_limit_exceeded",
            (429,),
            "the key has as many requests in flight as it may; `Retry-After`",
        ),
        ErrorCode(
            "client_disconnected",
            (499,),
            "never sent: the client hung up first, so the upstream call was "
            "cancelled; only the access log shows it",
        ),
        ErrorCode(
            "internal_error",
            (500,),
            "a bug: nothing internal is revealed; the exception is logged with "
            "its traceback and the correlation ID",
            in_stream="a bug while streaming: the stream still ends with this event",
        ),
        ErrorCode(
            "upstream_error",
            (502,),
            "the upstream failed (5xx after retries, or an `error` body of unknown "
            "meaning); a failure it explains and a retry would repeat (llama.cpp's "
            '"must be created with embedding=True") is relayed at once',
        ),
        ErrorCode(
            "upstream_invalid_response",
            (502,),
            "the upstream's answer is not the API: not JSON, not a JSON object, no "
            "choices, a 404/405/501 or a web page for an API path (a wrong base "
            "URL, or a plain web server), or not HTTP at all",
            in_stream="an upstream chunk is not the API (not JSON, `delta` not an "
            "object, `content` not a string...) on `/llm/message`; `/v1` relays "
            "chunks as they are",
        ),
        ErrorCode(
            "upstream_response_too_large",
            (502,),
            "the upstream's answer is over `LLM_SERVICE_MAX_UPSTREAM_RESPONSE_BYTES`"
            " (refused, never read whole)",
            in_stream="one line of the upstream's stream is over "
            "`LLM_SERVICE_MAX_SSE_LINE_BYTES`",
        ),
        ErrorCode(
            "upstream_auth_failed",
            (502,),
            "the upstream refused the gateway's token "
            "(`LLM_SERVICE_LM_STUDIO_API_TOKEN`)",
        ),
        ErrorCode(
            "upstream_stream_error",
            (502,),
            "",
            in_stream="the upstream sent an error inside the stream (its message "
            "is relayed, capped and with credentials masked)",
        ),
        ErrorCode(
            "upstream_stream_cut",
            (502,),
            "",
            in_stream="the upstream's stream broke or ended before it finished",
        ),
        ErrorCode(
            "upstream_unavailable",
            (503,),
            "the upstream is not reachable (`Retry-After: 5`)",
        ),
        ErrorCode(
            "upstream_busy",
            (503,),
            "the upstream stayed overloaded (429/503) through the retries; its "
            "`Retry-After` is passed on",
        ),
        ErrorCode("no_model_loaded", (503,), "the upstream has no model loaded"),
        ErrorCode(
            "auth_unavailable",
            (503,),
            "the API keys cannot be read: the database was down when this worker "
            "started",
        ),
        ErrorCode(
            "usage_unavailable", (503,), "the usage records cannot be read right now"
        ),
        ErrorCode(
            "server_shutting_down",
            (503,),
            "the server is stopping (SIGTERM): retry, on another instance or "
            "after `Retry-After: 1`",
            in_stream="the stream was still open 2 s before the worker's "
            "`graceful_timeout` ran out",
        ),
        ErrorCode(
            "queue_full",
            (503,),
            "every slot of the model server is busy and the gateway's queue "
            "(`LLM_SERVICE_QUEUE_MAX`), or this caller's share of it "
            "(`LLM_SERVICE_QUEUE_MAX_PER_KEY`), is full; decided before any byte "
            "is sent; `Retry-After` from the recent service rate",
        ),
        ErrorCode(
            "queue_timeout",
            (503,),
            "no slot of the model server freed within `LLM_SERVICE_QUEUE_TIMEOUT`;"
            " `Retry-After` from the recent service rate",
            in_stream="the same, for a stream already sending `: queued` "
            "comments; the event carries `retry_after` (seconds)",
        ),
        ErrorCode(
            "upstream_timeout",
            (504,),
            "the upstream accepted the request but did not answer within "
            "`LLM_SERVICE_LM_STUDIO_TIMEOUT`, or the whole call outlasted "
            "`LLM_SERVICE_LM_STUDIO_RETRY_BUDGET`",
        ),
        ErrorCode(
            "upstream_connect_timeout",
            (504,),
            "the upstream did not accept the connection within "
            "`LLM_SERVICE_LM_STUDIO_CONNECT_TIMEOUT`",
        ),
        ErrorCode(
            "upstream_first_token_timeout",
            (504,),
            "a streamed answer did not start within "
            "`LLM_SERVICE_STREAM_FIRST_TOKEN_TIMEOUT`",
            in_stream="nothing came within `LLM_SERVICE_STREAM_FIRST_TOKEN_TIMEOUT`",
        ),
        ErrorCode(
            "upstream_stream_stalled",
            (504,),
            "",
            in_stream="the upstream was silent longer than "
            "`LLM_SERVICE_STREAM_IDLE_TIMEOUT`",
        ),
        ErrorCode(
            "stream_timeout",
            (504,),
            "",
            in_stream="the stream lasted longer than "
            "`LLM_SERVICE_STREAM_TOTAL_TIMEOUT`",
        ),
        ErrorCode(
            "upstream_loop",
            (508,),
            "the upstream URL leads back to this gateway itself (it refuses the "
            "request it sent itself)",
        ),
    )
}


class APIError(Exception):
    """An error the gateway itself decides to answer with."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = Failure(status, code, message, details, headers or {})


@dataclass
class Failure:
    """What the client is told about one failure."""

    status: int
    code: str
    message: str
    details: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def describe_failure(error: BaseException) -> Failure:
    """Map any exception to the status, code and message the client gets."""
    error = _unwrap(error)
    if isinstance(error, APIError):
        return error.failure
    if isinstance(error, HTTPException):
        return _http_failure(error)
    if isinstance(error, ValidationError):
        return Failure(
            422,
            "validation_error",
            "The request body is not valid.",
            details=error.normalized_messages(),
        )
    if isinstance(error, LMStudioError):
        return _upstream_failure(error)
    if isinstance(error, ShuttingDownError):
        return Failure(
            503,
            "server_shutting_down",
            "The server is shutting down; retry the request.",
            headers={"Retry-After": "1"},
        )
    return Failure(500, "internal_error", INTERNAL_MESSAGE)


def _unwrap(error: BaseException) -> BaseException:
    """The exception behind Flask's generic 500 (raised outside a view)."""
    if isinstance(error, InternalServerError) and error.original_exception:
        return error.original_exception
    return error


def error_body(failure: Failure) -> dict[str, Any]:
    """The JSON body for ``failure`` in the current route's shape."""
    if request.path.startswith(OPENAI_PREFIX):
        return {"error": _openai_error(failure), "correlation_id": correlation_id()}
    error: dict[str, Any] = {"code": failure.code, "message": failure.message}
    if failure.details is not None:
        error["details"] = failure.details
    return {"error": error, "correlation_id": correlation_id()}


def error_response(failure: Failure, fields: dict[str, Any] | None = None) -> Response:
    """Build the JSON response for ``failure``.

    ``fields`` are answered beside the error (``/health`` says what it found).
    """
    response = jsonify({**(fields or {}), **error_body(failure)})
    response.status_code = failure.status
    response.headers.update(failure.headers)
    return response


def _openai_error(failure: Failure) -> dict[str, Any]:
    param = None
    message = failure.message
    if failure.code == "validation_error" and isinstance(failure.details, dict):
        param = next(iter(failure.details), None)
        message = f"{message} {param}: {failure.details[param]}"
    if failure.status >= 500:
        kind = "server_error"
    else:
        kind = OPENAI_TYPES.get(failure.status, "invalid_request_error")
    return {"message": message, "type": kind, "param": param, "code": failure.code}


def _http_failure(error: HTTPException) -> Failure:
    status = error.code or 500
    # Keep the headers werkzeug chose (Allow for 405...).
    headers = {
        name: value
        for name, value in error.get_response().headers.items()
        if name.lower() not in {"content-type", "content-length"}
    }
    message = HTTP_MESSAGES.get(status) or error.description or error.name
    if status == 429:
        message = f"Rate limit exceeded ({error.description}). Retry later."
    code = HTTP_CODES.get(status) or (
        "bad_request" if status < 500 else "internal_error"
    )
    return Failure(status, code, message, headers=headers)


def _upstream_failure(error: LMStudioError) -> Failure:
    """The failure for an upstream error, with its cause in ``details.cause``.

    The cause is the one :mod:`.lmstudio.diagnosis` names, the same word
    ``/health``, ``make run`` and ``flask lmstudio check`` use.
    """
    failure = _upstream_status(error)
    if failure.details is None:
        failure.details = {"cause": cause_of(error).name}
    return failure


def _upstream_status(error: LMStudioError) -> Failure:
    retry_later = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    if isinstance(error, LMStudioCancelledError):
        return Failure(
            CLIENT_CLOSED_REQUEST,
            "client_disconnected",
            "The client went away; the upstream call was cancelled.",
        )
    if isinstance(error, ModelNotFoundError):
        return Failure(404, "model_not_found", error.message)
    if isinstance(error, NoModelLoadedError):
        return Failure(
            503,
            "no_model_loaded",
            "The upstream has no model loaded: load one in LM Studio (or name a "
            "model it can load).",
            headers=retry_later,
        )
    if isinstance(error, LMStudioLoopError):
        return Failure(508, "upstream_loop", error.message)
    if isinstance(error, LMStudioAuthError):
        return Failure(
            502,
            "upstream_auth_failed",
            "The upstream rejected the gateway's credentials.",
        )
    if isinstance(error, LMStudioRequestError):
        status = error.status if error.status in (400, 413, 422) else 400
        return Failure(status, "upstream_rejected_request", error.message)
    if isinstance(error, LMStudioConnectTimeoutError):
        return Failure(
            504,
            "upstream_connect_timeout",
            "The upstream model server did not accept the connection in time.",
            headers=retry_later,
        )
    if isinstance(error, LMStudioConnectionError):
        return Failure(
            503,
            "upstream_unavailable",
            f"The upstream model server is not reachable: {cause_of(error).summary}.",
            headers=retry_later,
        )
    if isinstance(error, LMStudioBusyError):
        wait = error.retry_after if error.retry_after else UNAVAILABLE_RETRY_AFTER
        return Failure(
            503,
            "upstream_busy",
            "The upstream model server is busy; retry later.",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    if isinstance(error, LMStudioStreamTimeoutError):
        return Failure(504, STREAM_TIMEOUT_CODES[error.kind], error.message)
    if isinstance(error, LMStudioTimeoutError):
        return Failure(
            504, "upstream_timeout", "The upstream model server did not answer in time."
        )
    if isinstance(error, LMStudioStreamCutError):
        return Failure(502, "upstream_stream_cut", error.message)
    if isinstance(error, LMStudioStreamError):
        return Failure(502, "upstream_stream_error", error.message)
    if isinstance(error, LMStudioResponseTooLargeError):
        return Failure(502, "upstream_response_too_large", error.message)
    if isinstance(error, LMStudioProtocolError):
        return Failure(502, "upstream_invalid_response", error.message)
    if isinstance(error, LMStudioServerError) and not error.retryable:
        # A failure the upstream explained and that a retry would repeat.
        return Failure(
            502, "upstream_error", f"The upstream model server failed: {error.message}"
        )
    return Failure(502, "upstream_error", "The upstream model server failed to answer.")


def log_failure(error: BaseException, failure: Failure) -> None:
    """Log a failure once, at the level it deserves, without request content.

    Upstream error text is never logged (it may quote the prompt or a token):
    its kind, status and length are.
    """
    if isinstance(error, InternalServerError) and error.original_exception:
        # Raised outside a view (e.g. by make_response): Flask's
        # handle_exception has already logged it, traceback and correlation
        # ID included, just before calling the handler. Once is enough.
        return
    if isinstance(error, LMStudioCancelledError):
        log.info("client disconnected; upstream call cancelled")
    elif isinstance(error, LMStudioError):
        log.warning(
            "upstream call failed: %s (upstream status %s, attempts %d)",
            type(error).__name__,
            error.status,
            error.attempts,
            extra={
                "upstream_request_id": error.request_id,
                "error_code": failure.code,
                "upstream_message_length": len(error.message),
            },
        )
    elif isinstance(error, ShuttingDownError):
        log.info("request refused or stream ended: the server is shutting down")
    elif failure.status >= 500:
        log.error("unhandled error while serving the request", exc_info=error)


def _handle(error: Exception) -> Response:
    failure = describe_failure(error)
    log_failure(error, failure)
    return error_response(failure)


def init_app(app: Flask) -> None:
    """Send every exception, HTTP errors included, through :func:`_handle`."""
    app.register_error_handler(Exception, _handle)
