"""A client for LM Studio's OpenAI-compatible server (and llama.cpp's).

It knows HTTP and LM Studio and nothing of Flask, so it can be used alone.
"""

from .client import (
    ChatResult,
    HealthReport,
    LMStudioClient,
    Usage,
    describe,
    parse_usage,
)
from .errors import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioCancelledError,
    LMStudioConnectionError,
    LMStudioConnectTimeoutError,
    LMStudioError,
    LMStudioProtocolError,
    LMStudioRequestError,
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
    "CallScope",
    "ChatResult",
    "HealthReport",
    "LMStudioAuthError",
    "LMStudioBusyError",
    "LMStudioCancelledError",
    "LMStudioClient",
    "LMStudioConnectTimeoutError",
    "LMStudioConnectionError",
    "LMStudioError",
    "LMStudioProtocolError",
    "LMStudioRequestError",
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
    "describe",
    "parse_usage",
]
