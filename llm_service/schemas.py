"""Marshmallow schemas: what a request may contain and what an answer holds.

The same schemas validate input and describe the API, so the two cannot drift.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from flask import Flask, current_app, request
from flask.json.provider import DefaultJSONProvider
from marshmallow import (
    EXCLUDE,
    INCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    missing,
    utils,
    validate,
    validates,
)
from marshmallow.error_store import ErrorStore
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from .errors import APIError

ROLES = ("system", "user", "assistant")
MAX_MODEL_NAME = 256
MAX_MESSAGES = 512
MAX_STOP_SEQUENCES = 4


class StopField(fields.Field):
    """``stop``: one string or a list of up to four strings."""

    default_error_messages = {
        "invalid": "Must be a string or a list of up to 4 non-empty strings."
    }
    #: The same rule in OpenAPI terms, for /openapi.json.
    OPENAPI = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": MAX_STOP_SEQUENCES,
            },
        ]
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and value:
            return value
        if (
            isinstance(value, list)
            and 0 < len(value) <= MAX_STOP_SEQUENCES
            and all(isinstance(item, str) and item for item in value)
        ):
            return value
        raise self.make_error("invalid")


class StrictBoolean(fields.Boolean):
    """``true`` or ``false`` only: marshmallow's Boolean also takes 0, 1, "yes"..."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool):
            return value
        raise self.make_error("invalid", input=value)


def check_max_tokens(value: int | None) -> None:
    """Refuse a ``max_tokens`` above the gateway's ``MAX_MAX_TOKENS`` setting.

    Read at request time: the limit is the app's config, not an import constant.
    """
    limit = current_app.config["MAX_MAX_TOKENS"]
    if value is not None and value > limit:
        raise ValidationError(f"Must be at most {limit} (the gateway's limit).")


class RequestSchema(Schema):
    """A request body's schema: loads through the fields the body names.

    marshmallow's own loop visits every declared field for every body, with a
    closure and several calls even for an absent one, though a /v1 body
    declares 13 and usually names 4. This one visits the fields present and
    those an absent value still means something for (required, or with a
    ``load_default``), in declaration order, each deserialized and validated by
    the field itself: the same dict and the same errors in the same order
    (``tests/unit/test_schemas.py`` compares it with marshmallow's own).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plan = [
            (
                name if field.data_key is None else field.data_key,
                field.attribute or name,
                field,
                field.required or field.load_default is not missing,
            )
            for name, field in self.load_fields.items()
        ]
        # A dotted attribute makes nested dicts: marshmallow's loop does that.
        self._load_plan = None if any("." in row[1] for row in plan) else plan
        self._load_keys = {data_key for data_key, *_ in plan}

    def _deserialize(
        self,
        data: Any,
        *,
        error_store: Any,
        many: bool = False,
        partial: Any = None,
        unknown: Any = RAISE,
        index: Any = None,
    ) -> Any:
        if (
            many
            or partial is not None
            or self._load_plan is None
            or not isinstance(data, Mapping)
        ):
            return super()._deserialize(
                data,
                error_store=error_store,
                many=many,
                partial=partial,
                unknown=unknown,
                index=index,
            )
        index = index if self.opts.index_errors else None
        result = self.dict_class()
        for data_key, attribute, field, needed_when_absent in self._load_plan:
            raw = data.get(data_key, missing)
            if raw is missing and not needed_when_absent:
                continue
            try:
                value = field.deserialize(raw, data_key, data)
            except ValidationError as error:
                error_store.store_error(error.messages, data_key, index=index)
                value = error.valid_data or missing
            if value is not missing:
                result[attribute] = value
        if unknown != EXCLUDE:
            for key in set(data) - self._load_keys:
                if unknown == INCLUDE:
                    result[key] = data[key]
                elif unknown == RAISE:
                    error_store.store_error(
                        [self.error_messages["unknown"]], key, index
                    )
        return result


class NestedList(fields.List):
    """``List(Nested(schema))``: each item loaded straight through the fields
    of ``schema`` (a :class:`RequestSchema` without hooks).

    Documented, validated and answered as that list is (the same errors and
    ``valid_data``); it skips only the round each item would take through
    ``Nested`` and ``Schema.load`` (a field deserialization of its own, a new
    error store, hooks looked up), which such a schema does not need.
    """

    def __init__(self, nested: type[RequestSchema], **kwargs: Any) -> None:
        super().__init__(fields.Nested(nested), **kwargs)

    @functools.cached_property
    def _item_schema(self) -> RequestSchema | None:
        """The schema of the items when the shortcut is exact, else ``None``."""
        item = self.inner
        schema = item.schema
        plain_item = not (
            item.many
            or item.allow_none
            or item.validators
            or item.pre_load
            or item.post_load
        )
        plain_schema = (
            isinstance(schema, RequestSchema)
            and schema._load_plan is not None
            and not schema.many
            and schema.partial is None
            and not any(schema._hooks.values())
            and type(schema).handle_error is Schema.handle_error
        )
        return schema if plain_item and plain_schema else None

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        schema = self._item_schema
        if schema is None or kwargs:  # kwargs: a partial load
            return super()._deserialize(value, attr, data, **kwargs)
        if not utils.is_collection(value):
            raise self.make_error("invalid")
        unknown = schema.unknown if self.inner.unknown is None else self.inner.unknown
        result = []
        errors = {}
        for index, each in enumerate(value):
            if each is None:  # what Nested answers for it
                errors[index] = self.inner.make_error("null").messages
                continue
            error_store = ErrorStore()
            result.append(
                schema._deserialize(each, error_store=error_store, unknown=unknown)
            )
            if error_store.errors:
                errors[index] = error_store.errors
        if errors:
            raise ValidationError(errors, valid_data=result)
        return result


class ChatMessageSchema(RequestSchema):
    """One turn of the conversation."""

    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    content = fields.String(
        required=True,
        validate=validate.Length(min=1, error="Must not be empty."),
    )


class MessageRequestSchema(RequestSchema):
    """Body of ``POST /llm/message``; unknown fields are rejected."""

    model = fields.String(
        validate=validate.Length(min=1, max=MAX_MODEL_NAME),
        metadata={"description": "Model id; omitted: the configured or loaded one."},
    )
    messages = NestedList(
        ChatMessageSchema,
        required=True,
        validate=validate.Length(min=1, max=MAX_MESSAGES),
    )
    temperature = fields.Float(validate=validate.Range(min=0.0, max=2.0))
    max_tokens = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        # Its upper bound is a setting, checked below; /openapi.json shows it.
        metadata={"maximum_setting": "MAX_MAX_TOKENS"},
    )
    top_p = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    top_k = fields.Integer(strict=True, validate=validate.Range(min=0))
    stop = StopField()
    seed = fields.Integer(strict=True)
    presence_penalty = fields.Float(validate=validate.Range(min=-2.0, max=2.0))
    frequency_penalty = fields.Float(validate=validate.Range(min=-2.0, max=2.0))
    repeat_penalty = fields.Float(validate=validate.Range(min=0.0, max=5.0))
    stream = StrictBoolean(
        metadata={"description": "Answer with server-sent events (see README)."}
    )

    @validates("max_tokens")
    def _within_configured_limit(self, value: int, **_kwargs: Any) -> None:
        check_max_tokens(value)


class UsageSchema(Schema):
    """Token counts reported by the upstream."""

    prompt = fields.Integer()
    completion = fields.Integer()
    total = fields.Integer()


class MessageResponseSchema(Schema):
    """Answer of ``POST /llm/message``.

    ``tokens_used`` and ``usage`` are null when the upstream reported no (or only
    zero) token counts: the gateway never makes one up.
    """

    response = fields.String(required=True)
    model = fields.String(required=True)
    tokens_used = fields.Integer(allow_none=True)
    processing_time = fields.Float(required=True)
    correlation_id = fields.String(required=True)
    finish_reason = fields.String(allow_none=True)
    usage = fields.Nested(UsageSchema, allow_none=True)
    queue_time = fields.Float(
        allow_none=True,
        metadata={
            "description": "Seconds the request waited for a slot of the model "
            "server (also the `X-Queue-Time` header when not streamed)."
        },
    )


class ErrorDetailSchema(Schema):
    """The ``error`` member of the error contract."""

    code = fields.String(
        required=True,
        metadata={"description": "Stable, machine-readable code (see the README)."},
    )
    message = fields.String(required=True, metadata={"description": "For humans."})
    details = fields.Dict(
        metadata={
            "description": "For `validation_error`: the messages per field. For "
            "upstream failures: `cause`, what went wrong (`dns`, `refused`, "
            "`timeout`, `auth`, `not_openai`, `not_http`, `rate_limited`, "
            "`no_model`, `loop`...; see the README)."
        }
    )


class ErrorResponseSchema(Schema):
    """Body of every error answer: the error contract."""

    error = fields.Nested(ErrorDetailSchema, required=True)
    correlation_id = fields.String(required=True)


class IndexSchema(Schema):
    """Answer of ``GET /``: the service and links to its routes."""

    service = fields.String(required=True)
    version = fields.String(required=True)
    links = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    correlation_id = fields.String(required=True)


class UpstreamHealthSchema(Schema):
    """What the last probe of the upstream found."""

    url = fields.String(required=True)
    reachable = fields.Boolean(required=True)
    busy = fields.Boolean(
        required=True,
        metadata={
            "description": "The probe timed out while the server was generating "
            "for this gateway (llama.cpp answers `/v1/models` only between "
            "generations): up, not down."
        },
    )
    latency_ms = fields.Float(required=True)
    server = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "`lmstudio` or `openai-compatible`; null if down."},
    )
    models = fields.List(fields.String(), required=True)
    loaded_models = fields.List(
        fields.String(),
        required=True,
        allow_none=True,
        metadata={"description": "Null when the server cannot tell (llama.cpp)."},
    )
    error = fields.String(required=True, allow_none=True)
    cause = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "What went wrong, as in the errors' `details.cause`."},
    )


class HostHealthSchema(Schema):
    """One model host in ``/health``'s ``hosts`` (never its credentials)."""

    name = fields.String(required=True)
    url = fields.String(required=True, metadata={"description": "Credentials masked."})
    status = fields.String(
        required=True,
        validate=validate.OneOf(("up", "busy", "down", "unknown")),
        metadata={"description": "`unknown` until its first probe."},
    )
    server = fields.String(required=True, allow_none=True)
    models = fields.List(fields.String(), required=True)
    loaded_models = fields.List(
        fields.String(),
        required=True,
        allow_none=True,
        metadata={"description": "Null when the server cannot tell (llama.cpp)."},
    )
    in_flight = fields.Integer(
        required=True, metadata={"description": "This process's requests there now."}
    )
    slots = fields.Integer(required=True)
    queued = fields.Integer(
        required=True,
        metadata={"description": "This process's requests waiting for a slot there."},
    )
    circuit = fields.String(
        required=True, validate=validate.OneOf(("closed", "open", "half_open"))
    )
    error = fields.String(required=True, allow_none=True)


class HealthSchema(Schema):
    """Answer of ``GET /health``; a 503 adds ``error``."""

    status = fields.String(
        required=True, validate=validate.OneOf(("ok", "busy", "unavailable"))
    )
    service = fields.String(required=True)
    version = fields.String(required=True)
    uptime_seconds = fields.Float(required=True)
    # Absent for callers without an admin key once keys exist.
    lm_studio = fields.Nested(
        UpstreamHealthSchema,
        metadata={"description": "The (first answering) host, as before `hosts`."},
    )
    hosts = fields.List(fields.Nested(HostHealthSchema))
    rate_limit_storage = fields.String(
        required=True,
        metadata={
            "description": "Where rate limits are counted now: `memory`, `redis`, "
            "`memcached`, or `memory-fallback` (per process) while the configured "
            "shared store does not answer."
        },
    )
    # Admin details: quota storage (shared or per process), usage-record buffer.
    quotas = fields.Dict()
    usage_records = fields.Dict()
    correlation_id = fields.String(required=True)
    error = fields.Nested(ErrorDetailSchema)


class LiveSchema(Schema):
    """Answer of ``GET /health/live``."""

    status = fields.String(required=True, validate=validate.Equal("alive"))
    version = fields.String(required=True)
    uptime_seconds = fields.Float(required=True)
    correlation_id = fields.String(required=True)


class ReadySchema(Schema):
    """Answer of ``GET /health/ready``; a 503 adds ``error``."""

    status = fields.String(
        required=True, validate=validate.OneOf(("ready", "not_ready"))
    )
    models = fields.List(fields.String(), required=True)
    hosts = fields.List(fields.Nested(HostHealthSchema), required=True)
    correlation_id = fields.String(required=True)
    error = fields.Nested(ErrorDetailSchema)


def load_json_body(schema: Schema) -> dict[str, Any]:
    """Parse the request's JSON body and load it with ``schema``.

    Malformed JSON is a 400, a body not sent as JSON a 415 (raised by Flask);
    the nesting guard keeps a hostile document from exhausting the stack.
    Only standard JSON is accepted: ``NaN``, ``Infinity`` and numbers too large
    for a float (``1e400``) are a 400 here rather than a failure upstream.
    """
    _refuse_oversize_stream()
    if not request.is_json:
        request.on_json_loading_failed(None)  # raises Flask's 415
    try:
        # Parsed once per request: auth and metering read the same (cached)
        # body, through the app's StrictJSONProvider.
        body = request.get_json()
    except (BadRequest, ValueError):  # JSONDecodeError and UnicodeError too
        raise APIError(
            400,
            "invalid_json",
            "The request body is not valid JSON (UTF-8, no NaN or Infinity).",
        ) from None
    except RecursionError:
        raise APIError(
            400, "invalid_json", "The JSON body is nested too deeply."
        ) from None
    return schema.load(body)


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, reading standard JSON only: no ``NaN``, ``Infinity`` or
    numbers too large for a float (``1e400``)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        kwargs.setdefault("parse_constant", _refuse_constant)
        kwargs.setdefault("parse_float", _finite_float)
        return super().loads(s, **kwargs)


def init_app(app: Flask) -> None:
    """Read every request body with :class:`StrictJSONProvider`."""
    app.json = StrictJSONProvider(app)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _refuse_oversize_stream() -> None:
    """Answer 413 for a chunked body longer than the limit.

    Werkzeug rejects a too-large ``Content-Length`` itself, but silently cuts a
    body without one (chunked) at the limit, which would surface as a confusing
    "invalid JSON". One byte past the limit tells the two apart.
    """
    if request.content_length is not None:
        return  # the usual case; werkzeug checks a declared length itself
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if limit is None:
        return
    at_limit = len(request.get_data(cache=True)) >= limit
    if at_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


# -- OpenAI-compatible /v1 bodies ----------------------------------------------
# The gateway checks what it must understand (model, messages, numeric ranges,
# stream, limits) and passes every other field through to the upstream untouched
# (tools, response_format, ttl, ...): unknown fields are INCLUDEd, not rejected.

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ContentField(fields.Field):
    """A message's ``content``: a string, a list of parts, or null."""

    default_error_messages = {"invalid": "Must be a string, a list of parts, or null."}
    OPENAPI = {"oneOf": [{"type": "string"}, {"type": "array", "items": {}}]}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if value is None or isinstance(value, str | list):
            return value
        raise self.make_error("invalid")


class OpenAIMessageSchema(RequestSchema):
    """One chat message; extra keys (tool_calls, name, ...) pass through."""

    class Meta:
        unknown = INCLUDE

    role = fields.String(required=True, validate=validate.OneOf(OPENAI_ROLES))
    content = ContentField(allow_none=True)


class OpenAIRequestSchema(RequestSchema):
    """Fields shared by the /v1 generation requests."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(validate=validate.Length(min=1, max=MAX_MODEL_NAME))
    temperature = fields.Float(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))
    max_tokens = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1),
        metadata={"maximum_setting": "MAX_MAX_TOKENS"},
    )
    max_completion_tokens = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=1),
        metadata={"maximum_setting": "MAX_MAX_TOKENS"},
    )
    stream = StrictBoolean(allow_none=True)
    stream_options = fields.Dict(allow_none=True)
    stop = StopField(allow_none=True)
    presence_penalty = fields.Float(
        allow_none=True, validate=validate.Range(min=-2, max=2)
    )
    frequency_penalty = fields.Float(
        allow_none=True, validate=validate.Range(min=-2, max=2)
    )
    n = fields.Integer(
        strict=True, allow_none=True, validate=validate.Range(min=1, max=1)
    )

    @validates("max_tokens", "max_completion_tokens")
    def _within_configured_limit(self, value: int | None, **_kwargs: Any) -> None:
        check_max_tokens(value)


class ChatCompletionRequestSchema(OpenAIRequestSchema):
    """Body of ``POST /v1/chat/completions``."""

    messages = NestedList(
        OpenAIMessageSchema,
        required=True,
        validate=validate.Length(min=1, max=MAX_MESSAGES),
    )


class PromptField(fields.Field):
    """``prompt``/``input``: a non-empty string or a non-empty list."""

    default_error_messages = {"invalid": "Must be a non-empty string or list."}
    OPENAPI = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {}, "minItems": 1},
        ]
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if (isinstance(value, str) and value) or (isinstance(value, list) and value):
            return value
        raise self.make_error("invalid")


class CompletionRequestSchema(OpenAIRequestSchema):
    """Body of ``POST /v1/completions``."""

    prompt = PromptField(required=True)


class EmbeddingRequestSchema(RequestSchema):
    """Body of ``POST /v1/embeddings``."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(validate=validate.Length(min=1, max=MAX_MODEL_NAME))
    input = PromptField(required=True)


class OpenAIErrorSchema(Schema):
    """The ``error`` member on the /v1 routes: OpenAI's shape, for its SDKs."""

    message = fields.String(required=True)
    type = fields.String(
        required=True,
        metadata={
            "description": "`invalid_request_error`, `not_found_error`, "
            "`rate_limit_error` or `server_error`."
        },
    )
    param = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "The first invalid field, for validation errors."},
    )
    code = fields.String(
        required=True,
        metadata={"description": "The gateway's error code (see the README)."},
    )


class OpenAIErrorResponseSchema(Schema):
    """Body of every error answer on the /v1 routes."""

    error = fields.Nested(OpenAIErrorSchema, required=True)
    correlation_id = fields.String(required=True)


# -- usage accounting ------------------------------------------------------------


class _UsageCountsSchema(Schema):
    """Requests and tokens, the counts every usage figure has."""

    requests = fields.Integer(required=True)
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class KeyUsageByModelSchema(_UsageCountsSchema):
    """Requests and tokens of one model in a usage answer."""

    model = fields.String(allow_none=True, required=True)
    estimated_requests = fields.Integer(
        required=True,
        metadata={"description": "Requests whose tokens were counted, not reported."},
    )


class KeyUsageSchema(_UsageCountsSchema):
    """Answer of ``GET /v1/usage``: the caller's own usage between two times."""

    key = fields.String(allow_none=True, required=True)
    since = fields.DateTime(required=True)
    until = fields.DateTime(required=True)
    by_model = fields.List(fields.Nested(KeyUsageByModelSchema), required=True)
