"""Request schemas: loading through the fields a body names changes nothing."""

from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields

from llm_service.schemas import (
    OPENAI_ROLES,
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    EmbeddingRequestSchema,
    MessageRequestSchema,
    NestedList,
    RequestSchema,
)

REQUEST_SCHEMAS = [
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    EmbeddingRequestSchema,
    MessageRequestSchema,
]
MAX_MAX_TOKENS = 100
MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Say hello."},
]
CHAT = {"model": "m", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.7}
EVERY_OPENAI_FIELD = {
    "model": "m",
    "temperature": 1,
    "top_p": 0,
    "max_tokens": 5,
    "max_completion_tokens": 6,
    "stream": False,
    "stream_options": {"include_usage": True},
    "stop": ["a", "b"],
    "presence_penalty": -2,
    "frequency_penalty": 2,
    "n": 1,
}
EVERY_MESSAGE_FIELD = {
    "model": "m",
    "temperature": 1,
    "max_tokens": 5,
    "top_p": 1,
    "top_k": 0,
    "stop": "x",
    "seed": 7,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repeat_penalty": 5,
    "stream": True,
}
CHAT_BODIES = [
    CHAT,
    {"messages": MESSAGES},
    {**EVERY_OPENAI_FIELD, "messages": MESSAGES},
    {**CHAT, "tools": [{"type": "function"}], "ttl": 60, "response_format": {}},
    {**CHAT, "temperature": None, "max_tokens": None, "stop": None, "n": None},
    {**CHAT, "temperature": 3, "top_p": "x", "stream": 1, "n": 2},
    # A limit failure comes after every field's own errors, messages' included.
    {**CHAT, "max_tokens": 101, "messages": []},
    {**CHAT, "max_completion_tokens": 101, "messages": [{"role": "robot"}]},
    {**CHAT, "messages": [{"role": "user", "content": 1, "name": "x"}, "hi", None]},
    {**CHAT, "messages": "hi"},
    {**CHAT, "messages": None},
    {"model": "", "max_tokens": 0, "extra": 1},
    {},
    [CHAT],
    "hi",
    None,
]
COMPLETION_BODIES = [
    {"prompt": "Once"},
    {**EVERY_OPENAI_FIELD, "prompt": ["a"], "echo": True},
    {"prompt": "", "max_tokens": 101, "seed": 3},
    {"model": 1},
]
EMBEDDING_BODIES = [{"input": "x"}, {"input": [], "model": None, "user": "u"}]
MESSAGE_BODIES = [
    CHAT,
    {**EVERY_MESSAGE_FIELD, "messages": MESSAGES},
    {**CHAT, "unknown": 1, "other": 2},
    {**CHAT, "max_tokens": 101, "messages": [{"role": "user", "content": ""}]},
    {**CHAT, "messages": [{"role": "user", "content": "x", "name": "n"}]},
    {**CHAT, "temperature": "hot", "seed": 1.5, "stream": "yes", "stop": []},
    {"model": "m", "temperature": None},
    {},
    [],
]


def outcome(schema, body):
    """What loading ``body`` gives, in an order- and type-sensitive form."""
    try:
        return "loaded", repr(list(schema.load(body).items()))
    except ValidationError as error:
        return "refused", repr(error.normalized_messages()), repr(error.valid_data)


def marshmallows_own_outcome(schema, body):
    """The same, loaded by marshmallow's loop over every declared field, and
    each message by ``List(Nested(...))``'s own loads."""
    with (
        mock.patch.object(RequestSchema, "_deserialize", Schema._deserialize),
        mock.patch.object(NestedList, "_deserialize", fields.List._deserialize),
    ):
        return outcome(schema, body)


@pytest.fixture
def app_context(app_factory):
    app = app_factory(MAX_MAX_TOKENS=MAX_MAX_TOKENS, DEFAULT_MAX_TOKENS=50)
    with app.app_context():
        yield


@pytest.mark.usefixtures("app_context")
@pytest.mark.parametrize(
    ("schema_class", "body"),
    [(ChatCompletionRequestSchema, body) for body in CHAT_BODIES]
    + [(CompletionRequestSchema, body) for body in COMPLETION_BODIES]
    + [(EmbeddingRequestSchema, body) for body in EMBEDDING_BODIES]
    + [(MessageRequestSchema, body) for body in MESSAGE_BODIES],
)
def test_load_is_marshmallows_own(schema_class, body):
    """Same dict (keys in order, ints made floats), same errors in the same order."""
    schema = schema_class()
    assert outcome(schema, body) == marshmallows_own_outcome(schema, body)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=2 * MAX_MAX_TOKENS)
    | st.floats(min_value=-3, max_value=6)
    | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=4,
)
MESSAGE_LISTS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(OPENAI_ROLES) | JSON_VALUES,
            "content": st.text(max_size=3) | JSON_VALUES,
            "name": JSON_VALUES,
        },
    )
    | JSON_VALUES,
    max_size=3,
)
FIELD_NAMES = sorted(
    {name for schema in REQUEST_SCHEMAS for name in schema().load_fields}
    | {"tools", "user"}
)
BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            name: MESSAGE_LISTS | JSON_VALUES if name == "messages" else JSON_VALUES
            for name in FIELD_NAMES
        },
    )
    | JSON_VALUES
)


@pytest.mark.parametrize("schema_class", REQUEST_SCHEMAS)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=BODIES)
def test_any_body_loads_as_marshmallow_loads_it(app_context, schema_class, body):
    """Generated bodies, valid or not, messages and unknown fields included."""
    schema = schema_class()
    assert outcome(schema, body) == marshmallows_own_outcome(schema, body)


def test_the_lean_loops_are_the_ones_used():
    """Every request schema loads the lean way, its messages too."""
    schemas = [schema_class() for schema_class in REQUEST_SCHEMAS]
    for schema in schemas:
        assert isinstance(schema, RequestSchema)
        assert schema._load_plan is not None
        if "messages" in schema.fields:
            assert schema.fields["messages"]._item_schema is not None
