"""The error contract: every failure becomes one JSON shape, in one place.

``{"error": {"code", "message", "details"?}, "correlation_id"}``. This is the only
module that knows both the LM Studio client's exceptions and HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from .lmstudio import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioConnectionError,
    LMStudioError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)
from .pipeline import correlation_id
from .upstream import get_upstream

log = logging.getLogger("llm_service.errors")

#: Seconds a client is told to wait when the upstream is down.
UNAVAILABLE_RETRY_AFTER = 5

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    501: "not_implemented",
}
HTTP_MESSAGES = {
    404: "The requested URL was not found on this server.",
    405: "The method is not allowed for the requested URL.",
    413: "The request body is larger than the gateway accepts.",
    415: "The request body must be JSON, sent with Content-Type: application/json.",
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
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Build the contract's JSON response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    response = jsonify({"error": error, "correlation_id": correlation_id()})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _handle_api_error(error: APIError) -> Response:
    return error_response(
        error.status, error.code, error.message, error.details, error.headers
    )


def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    # Keep the headers werkzeug and flask-limiter chose (Allow, Retry-After...).
    original = error.get_response()
    headers = {
        name: value
        for name, value in original.headers.items()
        if name.lower() not in {"content-type", "content-length"}
    }
    message = HTTP_MESSAGES.get(status) or error.description or error.name
    if status == 429:
        message = f"Rate limit exceeded ({error.description}). Retry later."
    code = HTTP_CODES.get(status, error.name.lower().replace(" ", "_"))
    return error_response(status, code, message, headers=headers)


def _handle_validation_error(error: ValidationError) -> Response:
    return error_response(
        422,
        "validation_error",
        "The request body is not valid.",
        details=error.normalized_messages(),
    )


def _upstream_failure(error: LMStudioError) -> tuple[int, str, str, dict[str, str]]:
    """Map a client exception to ``(status, code, message, headers)``."""
    retry_later = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    if isinstance(error, ModelNotFoundError):
        return 404, "model_not_found", error.message, {}
    if isinstance(error, NoModelLoadedError):
        get_upstream().forget_health()
        return (
            503,
            "no_model_loaded",
            "The upstream has no model loaded: load one in LM Studio (or name a "
            "model it can load).",
            retry_later,
        )
    if isinstance(error, LMStudioAuthError):
        return (
            502,
            "upstream_auth_failed",
            "The upstream rejected the gateway's credentials.",
            {},
        )
    if isinstance(error, LMStudioRequestError):
        status = error.status if error.status in (400, 413, 422) else 400
        return status, "upstream_rejected_request", error.message, {}
    if isinstance(error, LMStudioConnectionError):
        return (
            503,
            "upstream_unavailable",
            "The upstream model server is not reachable.",
            retry_later,
        )
    if isinstance(error, LMStudioBusyError):
        wait = error.retry_after if error.retry_after else UNAVAILABLE_RETRY_AFTER
        return (
            503,
            "upstream_busy",
            "The upstream model server is busy; retry later.",
            {"Retry-After": str(max(1, round(wait)))},
        )
    if isinstance(error, LMStudioTimeoutError):
        return (
            504,
            "upstream_timeout",
            "The upstream model server did not answer in time.",
            {},
        )
    if isinstance(error, LMStudioProtocolError):
        return 502, "upstream_invalid_response", error.message, {}
    return 502, "upstream_error", "The upstream model server failed to answer.", {}


def _handle_upstream_error(error: LMStudioError) -> Response:
    status, code, message, headers = _upstream_failure(error)
    log.warning(
        "upstream call failed: %s (upstream status %s, attempts %d)",
        type(error).__name__,
        error.status,
        error.attempts,
        extra={"upstream_request_id": error.request_id, "error_code": code},
    )
    return error_response(status, code, message, headers=headers)


def _handle_unexpected(error: Exception) -> Response:
    if isinstance(error, HTTPException):
        return _handle_http_exception(error)
    log.exception("unhandled error while serving the request")
    return error_response(
        500,
        "internal_error",
        "The gateway failed to handle the request. Quote the correlation ID when "
        "reporting it.",
    )


def init_app(app: Flask) -> None:
    """Register one handler per family of failure."""
    app.register_error_handler(APIError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(ValidationError, _handle_validation_error)
    app.register_error_handler(LMStudioError, _handle_upstream_error)
    app.register_error_handler(Exception, _handle_unexpected)
