"""A client for LM Studio's OpenAI-compatible server (and llama.cpp's).

It knows HTTP and LM Studio and nothing of Flask, so it can be used alone.
"""

from .chunks import ChatChunk, read_chat_chunk
from .client import (
    ChatResult,
    HealthReport,
    LMStudioClient,
    Usage,
    describe,
    parse_usage,
)
from .diagnosis import CAUSES, Cause, cause_of, explain
from .errors import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioConnectionError,
    LMStudioConnectTimeoutError,
    LMStudioError,
    LMStudioLoopError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioResponseTooLargeError,
    LMStudioServerError,
    LMStudioStatusError,
    LMStudioStreamCutError,
    LMStudioStreamError,
    LMStudioStreamTimeoutError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)
from .sse import SSEEvent
from .stream import UpstreamStream

__all__ = [
    "CAUSES",
    "Cause",
    "ChatChunk",
    "ChatResult",
    "HealthReport",
    "LMStudioAuthError",
    "LMStudioBusyError",
    "LMStudioClient",
    "LMStudioConnectTimeoutError",
    "LMStudioConnectionError",
    "LMStudioError",
    "LMStudioLoopError",
    "LMStudioProtocolError",
    "LMStudioRequestError",
    "LMStudioResponseTooLargeError",
    "LMStudioServerError",
    "LMStudioStatusError",
    "LMStudioStreamCutError",
    "LMStudioStreamError",
    "LMStudioStreamTimeoutError",
    "LMStudioTimeoutError",
    "ModelNotFoundError",
    "NoModelLoadedError",
    "SSEEvent",
    "UpstreamStream",
    "Usage",
    "cause_of",
    "describe",
    "explain",
    "parse_usage",
    "read_chat_chunk",
]
