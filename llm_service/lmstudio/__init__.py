"""A client for LM Studio's OpenAI-compatible server (and llama.cpp's).

It knows HTTP and LM Studio and nothing of Flask, so it can be used alone.
"""

from .chunks import ChatChunk, read_chat_chunk
from .client import (
    CallObserver,
    CallRecord,
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
    LMStudioCancelledError,
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
from .watchdog import CallScope

__all__ = [
    "CAUSES",
    "CallObserver",
    "CallRecord",
    "CallScope",
    "Cause",
    "ChatChunk",
    "ChatResult",
    "HealthReport",
    "LMStudioAuthError",
    "LMStudioBusyError",
    "LMStudioCancelledError",
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
