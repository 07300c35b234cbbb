"""A client for LM Studio's OpenAI-compatible server (and llama.cpp's).

It knows HTTP and LM Studio and nothing of Flask, so it can be used alone.
"""

from .client import ChatResult, HealthReport, LMStudioClient, Usage, describe
from .errors import (
    LMStudioAuthError,
    LMStudioBusyError,
    LMStudioConnectionError,
    LMStudioError,
    LMStudioProtocolError,
    LMStudioRequestError,
    LMStudioServerError,
    LMStudioStatusError,
    LMStudioTimeoutError,
    ModelNotFoundError,
    NoModelLoadedError,
)

__all__ = [
    "ChatResult",
    "HealthReport",
    "LMStudioAuthError",
    "LMStudioBusyError",
    "LMStudioClient",
    "LMStudioConnectionError",
    "LMStudioError",
    "LMStudioProtocolError",
    "LMStudioRequestError",
    "LMStudioServerError",
    "LMStudioStatusError",
    "LMStudioTimeoutError",
    "ModelNotFoundError",
    "NoModelLoadedError",
    "Usage",
    "describe",
]
