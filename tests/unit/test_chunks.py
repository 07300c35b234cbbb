"""The chat chunk reader: every malformed shape is an error, never a skip."""

import json

import pytest

from llm_service.lmstudio import LMStudioProtocolError, SSEEvent, read_chat_chunk

#: Chunks whose shape is not the API's, each with an id; shared with the
#: integration tests, which send them through the gateway.
MALFORMED_CHUNKS = {
    "not-json": "not json",
    "truncated": '{"choices": [{"delta": {"content": "a"',
    "nested-too-deep": "[" * 100_000,
    "array": "[1, 2]",
    "number": "5",
    "string": '"text"',
    "null": "null",
    "choices-string": '{"choices": "x"}',
    "choices-object": '{"choices": {"0": {}}}',
    "choice-number": '{"choices": [5]}',
    "choice-null": '{"choices": [null]}',
    "delta-string": '{"choices": [{"delta": "oops"}]}',
    "delta-list": '{"choices": [{"delta": ["a"]}]}',
    "delta-number": '{"choices": [{"delta": 1}]}',
    "content-number": '{"choices": [{"delta": {"content": 5}}]}',
    "content-infinite": '{"choices": [{"delta": {"content": 1e400}}]}',
    "content-bool": '{"choices": [{"delta": {"content": true}}]}',
    "content-list": '{"choices": [{"delta": {"content": ["a"]}}]}',
    "content-object": '{"choices": [{"delta": {"content": {"a": 1}}}]}',
    "finish-reason-number": '{"choices": [{"delta": {}, "finish_reason": 5}]}',
    "model-number": '{"model": 5, "choices": []}',
}


@pytest.mark.parametrize("data", MALFORMED_CHUNKS.values(), ids=MALFORMED_CHUNKS.keys())
def test_malformed_chunks_are_protocol_errors(data):
    with pytest.raises(LMStudioProtocolError):
        read_chat_chunk(SSEEvent(data))


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (
            {"model": "m", "choices": [{"delta": {"content": "hi"}}]},
            ("m", "hi", None),
        ),
        ({"choices": [{"delta": {}, "finish_reason": "stop"}]}, (None, None, "stop")),
        ({"choices": [{"delta": None, "finish_reason": None}]}, (None, None, None)),
        ({"choices": [{"index": 0}]}, (None, None, None)),
        ({"choices": []}, (None, None, None)),
        ({"choices": None}, (None, None, None)),
        ({"id": "x"}, (None, None, None)),
        ({"choices": [{"delta": {"content": None, "role": "assistant"}}]}, (None,) * 3),
    ],
)
def test_tolerated_shapes(chunk, expected):
    read = read_chat_chunk(SSEEvent(json.dumps(chunk)))
    assert (read.model, read.content, read.finish_reason) == expected


def test_usage_stays_lenient():
    chunk = {"choices": [], "usage": {"total_tokens": "many"}}
    assert read_chat_chunk(SSEEvent(json.dumps(chunk))).usage is None
    chunk["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert read_chat_chunk(SSEEvent(json.dumps(chunk))).usage.total == 3
