"""A client for LM Studio's OpenAI-compatible server (and llama.cpp's).

It knows HTTP and LM Studio and nothing of Flask, so it can be used alone.
:mod:`.client` makes the calls, :mod:`.errors` is its exception tree,
:mod:`.sse` and :mod:`.stream` read event streams, :mod:`.chunks` is the one
reader of completions and chunks, :mod:`.watchdog` bounds and cancels calls,
and :mod:`.diagnosis` names a failure's cause.
"""

from .chunks import (
    ChatChunk,
    ChatResult,
    Usage,
    parse_usage,
    read_chat_chunk,
    read_chat_completion,
    read_text_completion,
)
from .client import (
    CallObserver,
    CallRecord,
    HealthReport,
    LMStudioClient,
    describe,
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
    "read_chat_completion",
    "read_text_completion",
]
