"""The chat chunk reader: every malformed shape is an error, never a skip."""

import json

import pytest

from llm_service.lmstudio import (
    LMStudioProtocolError,
    SSEEvent,
    read_chat_chunk,
    read_chat_completion,
    read_text_completion,
)
from llm_service.lmstudio.chunks import UpstreamObject, finishes, stream_error

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


# -- the readers of non-streamed answers ---------------------------------------

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_reads_a_chat_completion():
    body = {
        "model": "m",
        "choices": [{"message": {"content": "Hi."}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    result = read_chat_completion(body, request_id="r-1")
    assert (result.text, result.model, result.finish_reason) == ("Hi.", "m", "stop")
    assert result.usage.total == 5
    assert result.request_id == "r-1"


def test_reads_a_text_completion_and_falls_back_to_the_requested_model():
    body = {"choices": [{"text": "lo", "finish_reason": "length"}]}
    result = read_text_completion(body, model="asked")
    assert (result.text, result.model, result.finish_reason) == (
        "lo",
        "asked",
        "length",
    )
    assert result.usage is None


@pytest.mark.parametrize(
    ("reader", "body"),
    [
        (read_chat_completion, {"choices": []}),
        (read_chat_completion, {"choices": [{"text": "x"}]}),
        (read_chat_completion, {"choices": [{"message": {"content": 5}}]}),
        (read_text_completion, {"choices": [{"message": {"content": "x"}}]}),
        (read_text_completion, {"choices": [{"text": ["x"]}]}),
    ],
)
def test_a_completion_without_its_text_is_a_protocol_error(reader, body):
    with pytest.raises(LMStudioProtocolError) as info:
        reader(body)
    assert info.value.status == 200


@pytest.mark.parametrize(
    ("data", "finished"),
    [
        ('{"choices": [{"delta": {}, "finish_reason": null}]}', False),
        ('{"choices": [{"delta": {}, "finish_reason": "stop"}]}', True),
        ('{"choices": [{"text": "", "finish_reason": "length"}]}', True),
        ('{"choices": [{"delta": {"content": "\\"finish_reason\\": 1"}}]}', False),
    ],
)
def test_finishes_reads_chat_and_text_chunks(data, finished):
    assert finishes(SSEEvent(data)) is finished


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"error": {"message": "boom"}}', "boom"),
        ('{"error": "plain"}', "plain"),
        ('{"choices": [{"delta": {"content": "error"}}]}', None),
        ('{"message": "not an error"}', None),
        ('{"error": ', None),
    ],
)
def test_stream_error_reads_the_error_key_only(data, message):
    assert stream_error(SSEEvent(data)) == message


@pytest.mark.parametrize(
    ("raw", "relayed"),
    [
        (b'{"a": 1}', True),
        (b' \r\n\t{"a": 1}\n', True),
        (b'\xef\xbb\xbf{"a": 1}', False),
        ('{"a": 1}'.encode("utf-16"), False),
        (b"", False),
    ],
)
def test_an_upstream_object_keeps_its_bytes_only_as_utf8_json(raw, relayed):
    assert (UpstreamObject({"a": 1}, raw).raw is raw) is relayed
