"""Run llama_cpp.server, stopping a non-streamed generation its client left.

llama-cpp-python's server (0.3.36) notices a departed client only between the
chunks of a stream. A non-streamed completion runs to its last token after the
client (the gateway, when its own client hung up or a deadline passed) closed
the connection, and every later request waits behind it. This script runs the
same server with the same command line (``serve.py --model ... --port ...``,
as ``python -m llama_cpp.server`` takes them) and adds the missing half:

* an ASGI middleware in front of the server's app gives each request a
  ``Generation`` (through a context variable) and, once a non-streamed
  generation of that request is running, waits for the ASGI
  ``http.disconnect`` message, as Starlette's streaming responses do;
* ``Llama.create_completion``, which both ``/v1/completions`` and
  ``/v1/chat/completions`` reach, gets one more stopping criterion for a
  non-streamed call: "the client has gone". llama.cpp checks it after every
  token, so the server is free again a token later.

An answer whose client stays is exactly what the plain server sends: the
criterion is false until the client goes. llama-cpp-python is not modified on
disk: both changes are made here, in this process.

Executed by the bundled venv's interpreter (``LocalModelServer.command()``),
never imported by the gateway or its tests: it imports llama_cpp, which only
that venv has. It is the one module of ``local_backend`` that is not standard
library only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and the dev
# tool's modules there (settings.py, server.py, ...) would shadow top-level
# modules of those names for llama_cpp and its dependencies.
_HERE = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0] or os.curdir) == _HERE:
    del sys.path[0]

import llama_cpp  # noqa: E402
import llama_cpp.server.__main__ as llama_server  # noqa: E402

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Generation:
    """One HTTP request's non-streamed generation, seen from both sides.

    The event loop learns when it starts (``started``) and tells the worker
    thread that runs it when the client has gone (``client_gone``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.started = asyncio.Event()
        self.client_gone = threading.Event()

    def begin(self) -> None:
        """Say that the generation runs; called from its worker thread."""
        self._loop.call_soon_threadsafe(self.started.set)

    def stop_if_client_gone(self, input_ids: Any, logits: Any) -> bool:
        """A llama_cpp stopping criterion: true once the client has gone."""
        return self.client_gone.is_set()


_generation: contextvars.ContextVar[Generation | None] = contextvars.ContextVar(
    "generation", default=None
)


class StopAbandonedGenerations:
    """ASGI middleware: a request's non-streamed generation stops when its
    client disconnects."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        generation = Generation(asyncio.get_running_loop())
        token = _generation.set(generation)
        watcher = asyncio.create_task(self._watch(receive, generation))
        try:
            await self.app(scope, receive, send)
        finally:
            watcher.cancel()
            _generation.reset(token)

    @staticmethod
    async def _watch(receive: Receive, generation: Generation) -> None:
        # Only once the generation runs: by then the app has read the whole
        # request body, so receive() has nothing left to give but the
        # disconnect (it would otherwise take the body from the app).
        await generation.started.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        generation.client_gone.set()


def stopping_when_client_leaves(
    create_completion: Callable[..., Any],
) -> Callable[..., Any]:
    """Wrap ``Llama.create_completion``: a non-streamed call made for an HTTP
    request also stops when that request's client has gone.

    Streams are left as they are: the server already stops them.
    """

    @functools.wraps(create_completion)
    def wrapper(self: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Any:
        generation = _generation.get()
        if generation is not None and not kwargs.get("stream", False):
            criteria = llama_cpp.StoppingCriteriaList(
                [
                    *(kwargs.get("stopping_criteria") or ()),
                    generation.stop_if_client_gone,
                ]
            )
            kwargs["stopping_criteria"] = criteria
            generation.begin()
        return create_completion(self, *args, **kwargs)

    return wrapper


_create_app = llama_server.create_app


def create_app(*args: Any, **kwargs: Any) -> StopAbandonedGenerations:
    """llama_cpp.server's app, behind StopAbandonedGenerations."""
    return StopAbandonedGenerations(_create_app(*args, **kwargs))


def main() -> None:
    """Run ``python -m llama_cpp.server`` with the two changes above."""
    llama_cpp.Llama.create_completion = stopping_when_client_leaves(
        llama_cpp.Llama.create_completion
    )
    # Its main() parses the command line and the environment, then serves
    # create_app(...) with uvicorn: all of it as it is, around our app.
    llama_server.create_app = create_app
    llama_server.main()


if __name__ == "__main__":
    main()
