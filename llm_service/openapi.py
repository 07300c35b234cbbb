"""The API described: an OpenAPI 3 document built from the routes and schemas.

Each view states what it takes and answers with :func:`documented`, next to its
code; this module adds what every route shares (the error contract, the
pipeline's headers, the rate limits) and walks the app's URL map, so a new route
appears in the document without more work and the document cannot drift from
the code. It is built once per app, on first use.

``GET /openapi.json`` serves it; ``GET /docs`` renders it with Swagger UI, whose
assets come from the ``swagger-ui-bundle`` package, so the page works offline.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    send_from_directory,
    url_for,
)
from swagger_ui_bundle import swagger_ui_path

from . import __version__, errors
from .limits import UNLIMITED_BLUEPRINTS
from .pipeline import CORRELATION_HEADER, CORRELATION_ID_PATTERN
from .schemas import ErrorResponseSchema

OPENAPI_VERSION = "3.0.3"
EXTENSION = "llm_service.openapi"
_ATTRIBUTE = "__openapi__"
#: Methods every rule gets from Flask; documenting them adds nothing.
_IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})
#: Flask's ``<converter:name>`` placeholders, which OpenAPI writes ``{name}``.
_PLACEHOLDER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

#: Every error code the contract uses: code -> (statuses, when it is answered).
#: The codes a route can answer as HTTP errors, from the one registry.
ERROR_CODES: dict[str, tuple[tuple[int, ...], str]] = {
    code: (entry.statuses, entry.meaning)
    for code, entry in errors.ERROR_CODES.items()
    if entry.meaning
}
#: What any route can answer, whatever it does.
COMMON_ERRORS = (
    "bad_request",
    "method_not_allowed",
    "internal_error",
    "server_shutting_down",
)
#: What a route that reads a JSON body can answer about it.
BODY_ERRORS = (
    "invalid_json",
    "payload_too_large",
    "unsupported_media_type",
    "validation_error",
)
#: What a route that calls the model server can answer when the server fails.
UPSTREAM_FAILURES = (
    "upstream_error",
    "upstream_invalid_response",
    "upstream_response_too_large",
    "upstream_auth_failed",
    "upstream_unavailable",
    "upstream_busy",
    "upstream_timeout",
    "upstream_connect_timeout",
    "upstream_loop",
)
#: ... and when it cannot serve what the request asks for.
UPSTREAM_ERRORS = (
    "model_not_found",
    "upstream_rejected_request",
    "no_model_loaded",
    # It waits for a slot of the model server first (upstreams.admission).
    "queue_full",
    "queue_timeout",
    *UPSTREAM_FAILURES,
)
#: ... and when it streams its answer.
STREAMED_ERRORS = (*UPSTREAM_ERRORS, "upstream_first_token_timeout")

_VALID_CORRELATION_ID = f"^{CORRELATION_ID_PATTERN}$"
HEADERS = {
    CORRELATION_HEADER: {
        "description": "The request's correlation ID: the caller's when valid, "
        "else a new UUID. Also sent upstream and logged.",
        "schema": {"type": "string", "pattern": _VALID_CORRELATION_ID},
        "required": True,
    },
    "X-Process-Time": {
        "description": "Seconds the gateway spent on the request.",
        "required": True,
        "schema": {"type": "string", "pattern": r"^\d+\.\d{6}$"},
    },
    "X-RateLimit-Limit": {
        "description": "Requests allowed per minute per client, all limited "
        "routes together.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the current minute.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Reset": {
        "description": "When the current window ends (Unix time, seconds).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "Allow": {
        "description": "The methods this path accepts.",
        "required": True,
        "schema": {"type": "string"},
    },
}
_RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
#: Headers every answer with that status has (the rate-limit ones are optional:
#: a request refused before the limiter counted it has none).
_STATUS_HEADERS = {405: ("Allow",), 429: ("Retry-After",), 503: ("Retry-After",)}

API_DESCRIPTION = """\
An HTTP gateway in front of LM Studio's OpenAI-compatible model server.

Every answer carries `X-Correlation-ID` (send your own, 1-128 characters of
`[A-Za-z0-9._:-]`, to follow a request through the logs) and `X-Process-Time`.
Every failure has one shape, `{"error": {"code", "message", "details"?},
"correlation_id"}` (OpenAI's on `/v1`); each response below lists the codes it can
carry. Rate-limited routes add `X-RateLimit-*` headers, and `429` with
`Retry-After` past the limit.
"""

UNDECLARED = "Not described yet: the view declares nothing with `documented()`."

View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Operation:
    """What a view declares about itself (see :func:`documented`)."""

    body: Any = None
    answers: Mapping[int, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    path: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error_schema: Any = ErrorResponseSchema


_UNDECLARED = Operation()


def documented(
    *,
    body: Any = None,
    answers: Mapping[int, Any] | None = None,
    errors: Iterable[str] = (),
    path: Mapping[str, Iterable[str]] | None = None,
    error_schema: Any = ErrorResponseSchema,
) -> Callable[[View], View]:
    """Declare a view's request body, answers and extra error codes.

    ``body`` is the marshmallow schema of its JSON body. ``answers`` maps a
    status to a schema (sent as ``application/json``) or to a mapping of media
    type to schema (``None`` for an opaque body; an empty mapping for no body).
    ``errors`` are codes of :data:`ERROR_CODES` beyond those every route, every
    route with a body, and every rate-limited route can answer. ``path`` lists
    the values a path parameter may take. ``error_schema`` is the body of its
    errors when the route answers them in another shape than the gateway's
    contract. The summary and description come from the view's docstring.
    """
    operation = Operation(
        body,
        dict(answers or {200: None}),
        tuple(errors),
        {name: tuple(sorted(values)) for name, values in (path or {}).items()},
        error_schema,
    )
    unknown = set(operation.errors) - set(ERROR_CODES)
    if unknown:
        raise ValueError(f"Undocumented error codes: {sorted(unknown)}")

    def mark(view: View) -> View:
        setattr(view, _ATTRIBUTE, operation)
        return view

    return mark


def is_documented(view: Callable[..., Any]) -> bool:
    """Tell whether ``view`` declared itself with :func:`documented`."""
    return hasattr(view, _ATTRIBUTE)


def build_spec(app: Flask) -> dict[str, Any]:
    """Build the OpenAPI document of every route ``app`` serves."""
    marshmallow = MarshmallowPlugin()
    spec = APISpec(
        title="llm-service",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[marshmallow],
        info={"description": API_DESCRIPTION},
    )
    marshmallow.converter.add_attribute_function(_custom_field)
    marshmallow.converter.add_attribute_function(_maximum_from_settings(app))
    for name, header in HEADERS.items():
        spec.components.header(name, header)
    spec.components.parameter(
        CORRELATION_HEADER,
        "header",
        {
            "description": "Your ID for this request, echoed in the answer and the "
            "logs when it is 1-128 characters of `[A-Za-z0-9._:-]`; any other value "
            "is replaced by a new UUID (never refused).",
            "schema": {"type": "string"},
        },
    )
    spec.components.schema("ErrorResponse", schema=ErrorResponseSchema)

    # Tags in the order the blueprints were registered: Swagger UI shows them so.
    tags = {name: _module_summary(app, name) for name in app.blueprints}
    rules = sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule)
    for rule in rules:
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        blueprint = rule.endpoint.rpartition(".")[0]
        tag = blueprint or "app"
        tags.setdefault(tag, "")
        methods = sorted(set(rule.methods or ()) - _IMPLICIT_METHODS)
        operations = {
            method.lower(): _operation(
                view,
                operation_id=_operation_id(rule.endpoint, method, len(methods)),
                tag=tag,
                rate_limited=blueprint not in UNLIMITED_BLUEPRINTS,
                path_parameters=rule.arguments,
            )
            for method in methods
        }
        spec.path(path=_PLACEHOLDER.sub(r"{\1}", rule.rule), operations=operations)
    for tag, description in tags.items():
        spec.tag({"name": tag, "description": description})
    document = spec.to_dict()
    from .auth import PROTECTED_BLUEPRINTS, document_security

    document_security(document, PROTECTED_BLUEPRINTS)
    return document


def api_spec() -> dict[str, Any]:
    """Return the current app's document, built on first use and then kept."""
    spec = current_app.extensions.get(EXTENSION)
    if spec is None:
        # Two first requests may both build it; the documents are identical.
        spec = current_app.extensions.setdefault(EXTENSION, build_spec(current_app))
    return spec


def _operation(
    view: Callable[..., Any],
    *,
    operation_id: str,
    tag: str,
    rate_limited: bool,
    path_parameters: Iterable[str],
) -> dict[str, Any]:
    declared: Operation = getattr(view, _ATTRIBUTE, _UNDECLARED)
    doc = _markdown(inspect.getdoc(view) or operation_id)
    summary, _, description = doc.partition("\n")
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary.strip(),
        "tags": [tag],
        "parameters": [
            *(_path_parameter(name, declared) for name in sorted(path_parameters)),
            CORRELATION_HEADER,  # apispec turns a component's name into its $ref
        ],
        "responses": {},
    }
    if description.strip():
        operation["description"] = description.strip()
    if declared is _UNDECLARED:
        # Listed, but promising nothing it does not know: any status, any body.
        operation["responses"] = {"default": {"description": UNDECLARED}}
        return operation
    if declared.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": declared.body}},
        }

    for status, content in declared.answers.items():
        operation["responses"][str(status)] = _response(
            _phrase(status), _content(content), _headers(status, rate_limited)
        )

    codes = [*COMMON_ERRORS, *declared.errors]
    if declared.body is not None:
        codes += BODY_ERRORS
    if rate_limited:
        codes.append("rate_limited")
    for status, lines in sorted(_codes_by_status(codes).items()):
        if str(status) in operation["responses"]:
            continue  # the view answers this status with its own body
        description = f"{_phrase(status)}.\n\n" + "\n".join(lines)
        content = {"application/json": {"schema": declared.error_schema}}
        operation["responses"][str(status)] = _response(
            description, content, _headers(status, rate_limited)
        )
    return operation


def _custom_field(_converter: Any, field: Any, **_kwargs: Any) -> dict[str, Any]:
    """An apispec attribute function for fields that validate in Python.

    apispec cannot read a custom field's ``_deserialize``; such a field states
    the same rule as JSON Schema in an ``OPENAPI`` class attribute.
    """
    return dict(getattr(field, "OPENAPI", {}))


def _maximum_from_settings(app: Flask) -> Callable[..., dict[str, Any]]:
    """An apispec attribute function for bounds that are settings.

    A field with ``metadata={"maximum_setting": "NAME"}`` is checked against
    ``app.config["NAME"]``; the document states that app's value.
    """

    def maximum_setting(_converter: Any, field: Any, **_kwargs: Any) -> dict:
        name = field.metadata.get("maximum_setting")
        return {"maximum": app.config[name]} if name else {}

    return maximum_setting


def _codes_by_status(codes: Iterable[str]) -> dict[int, list[str]]:
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):  # keep the order, drop repeats
        statuses, when = ERROR_CODES[code]
        for status in statuses:
            by_status.setdefault(status, []).append(f"- `{code}`: {when}.")
    return by_status


def _content(content: Any) -> dict[str, Any]:
    if not isinstance(content, Mapping):
        content = {"application/json": content}
    return {
        media_type: {"schema": schema} if schema is not None else {}
        for media_type, schema in content.items()
    }


def _headers(status: int, rate_limited: bool) -> dict[str, Any]:
    names = [CORRELATION_HEADER, "X-Process-Time"]
    if rate_limited:
        names += _RATE_LIMIT_HEADERS
    names += _STATUS_HEADERS.get(status, ())
    return {name: name for name in names}  # names of components, made $refs


def _response(
    description: str, content: dict[str, Any], headers: dict[str, Any]
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "headers": headers}
    if content:
        response["content"] = content
    return response


def _path_parameter(name: str, declared: Operation) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if name in declared.path:
        schema["enum"] = list(declared.path[name])
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _operation_id(endpoint: str, method: str, method_count: int) -> str:
    name = endpoint.replace(".", "_")
    return name if method_count == 1 else f"{name}_{method.lower()}"


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase


def _module_summary(app: Flask, blueprint: str) -> str:
    """The first line of the blueprint's module docstring, as its tag's text."""
    if not blueprint:
        return ""
    doc = inspect.getdoc(sys.modules.get(app.blueprints[blueprint].import_name))
    return _markdown(doc).partition("\n")[0] if doc else ""


def _markdown(docstring: str) -> str:
    """Docstrings quote code as reST does (````x````); OpenAPI text is Markdown."""
    return docstring.replace("``", "`")


# -- the docs blueprint: /openapi.json and Swagger UI ---------------------------

bp = Blueprint("docs", __name__)

#: Swagger UI's files this page uses, with the type each is served as.
ASSETS = {
    "swagger-ui.css": "text/css",
    "index.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
#: The API's strict policy, relaxed only as far as Swagger UI needs: its own
#: scripts and styles, inline SVG images (data: URLs in its CSS), and fetches of
#: the document and of "Try it out" requests to this origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>llm-service API</title>
  <link rel="stylesheet" href="{css}">
  <link rel="stylesheet" href="{page_css}">
  <link rel="icon" type="image/png" href="{icon}" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{bundle}"></script>
  <script src="{init}"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to a public
# validator, a request to another origin that this page must never make.
_INIT = """\
window.addEventListener("load", function () {{
  window.ui = SwaggerUIBundle({{
    url: {spec_url},
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  }});
}});
"""


@bp.get("/openapi.json")
@documented(answers={200: {"application/json": {"type": "object"}}})
def openapi_json():
    """The OpenAPI 3 document of this API."""
    return api_spec()


@bp.get("/docs")
@documented(answers={200: {"text/html": None}})
def docs():
    """Swagger UI for this API, served from this origin (works offline)."""
    page = _PAGE.format(
        css=url_for(".asset", name="swagger-ui.css"),
        page_css=url_for(".asset", name="index.css"),
        icon=url_for(".asset", name="favicon-32x32.png"),
        bundle=url_for(".asset", name="swagger-ui-bundle.js"),
        init=url_for(".init_script"),
    )
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


@bp.get("/docs/init.js")
@documented(answers={200: {"text/javascript": None}})
def init_script():
    """The script that starts Swagger UI on this API's document."""
    script = _INIT.format(spec_url=json.dumps(url_for(".openapi_json")))
    return Response(script, mimetype="text/javascript")


@bp.get("/docs/<name>")
@documented(
    answers={
        200: {media_type: None for media_type in sorted(set(ASSETS.values()))},
        304: {},  # the browser's copy is current (ETag / Last-Modified)
    },
    errors=("not_found",),
    path={"name": ASSETS},
)
def asset(name: str):
    """One of Swagger UI's files, from the installed swagger-ui-bundle package."""
    if name not in ASSETS:
        abort(404)
    return send_from_directory(swagger_ui_path, name, mimetype=ASSETS[name])


def init_app(app: Flask) -> None:
    """Serve the document and its Swagger UI."""
    app.register_blueprint(bp)
