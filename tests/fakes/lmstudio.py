"""A fake LM Studio server speaking real HTTP/1.1 over a loopback socket.

Integration tests point a real gunicorn gateway at it, so it imitates what a
client of LM Studio actually sees on the wire: Express-style keep-alive that
really closes idle sockets, HTTP 200 for unknown paths, the single-loaded-model
quirk, OpenAI-shaped JSON and server-sent events, and failures injected on
demand. Unlisted behaviour follows LM Studio's public docs and bug reports.

This module is LM Studio's (and llama.cpp's) behaviour: routes, answers,
faults. The socket plumbing (accepting, connection threads, records, bounded
waits that wake up on :meth:`~tests.fakes.sockets.LoopbackHTTPServer.stop`, so
a test run never hangs on it) is :mod:`tests.fakes.sockets`. Standard library
only::

    with FakeLMStudio(models=["a", "b"], loaded=["a"]) as fake:
        fake.fault("status", times=1, status=503, headers={"Retry-After": "1"})
        ...  # point the gateway at fake.url
        assert fake.requests[-1].json["model"] == "b"

Run it by hand with ``python -m tests.fakes.lmstudio --port 1234``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.sockets import (
    POLL_SECONDS,
    Abort,
    ConnectionHandler,
    ConnectionRecord,
    LoopbackHTTPServer,
    RequestRecord,
    dumps,
)

__all__ = [
    "FAULT_KINDS",
    "FAULT_MODEL_PREFIX",
    "ConnectionRecord",
    "FakeLMStudio",
    "Fault",
    "RequestRecord",
    "echo_reply",
    "fault_from_model",
    "main",
]

log = logging.getLogger(__name__)

NO_MODELS_LOADED = (
    "No models loaded. Please load a model in the developer page "
    "or use the `lms load` command."
)

#: Fault kinds accepted by :meth:`FakeLMStudio.fault`, with their keyword arguments.
FAULT_KINDS: dict[str, frozenset[str]] = {
    "refuse": frozenset(),
    "stall": frozenset({"seconds"}),
    "status": frozenset({"status", "body", "headers"}),
    "malformed": frozenset({"variant", "body", "content_type"}),
    "error200": frozenset({"error"}),
    "reset": frozenset({"rst"}),
    "stream_error": frozenset({"after", "error"}),
    "stream_cut": frozenset({"after"}),
    "stream_end": frozenset({"after"}),
    "slow_stream": frozenset({"interval"}),
    # As fast as the socket takes them: `bytes` of events (streamed), or one
    # answer whose content is `bytes` long, chunked or with a Content-Length.
    "flood": frozenset({"bytes", "chunked"}),
    # One `data:` line of `bytes` bytes; ended by a blank line when `newline`.
    "long_line": frozenset({"bytes", "newline"}),
    # Chunk number `after` replaced by `data` (JSON-encoded unless a string).
    "bad_chunk": frozenset({"data", "after"}),
    # Chunk number `after` replaced by `frame`, the raw text of one event
    # (e.g. an `event:` name, an `id:`, several `data:` lines), sent as it is.
    "raw_event": frozenset({"frame", "after"}),
    # Not a model server at all: raw bytes that are not HTTP, then close.
    "garbage": frozenset({"data"}),
    # A plain web server (nginx, python -m http.server) where the API should be:
    # an HTML 404 for GET, an HTML 405 for other methods (or ``status``).
    "web_server": frozenset({"status"}),
    # One byte every `interval` seconds, of the headers, the body or both.
    "drip": frozenset({"interval", "part"}),
    # An error answer that quotes the request: headers (Authorization too) and body.
    "echo": frozenset({"status"}),
}
# These only make sense once a stream is under way, so they wait for one.
_STREAM_ONLY_KINDS = frozenset(
    {
        "stream_error",
        "stream_cut",
        "stream_end",
        "slow_stream",
        "long_line",
        "bad_chunk",
        "raw_event",
    }
)
_BREAKING_STREAM_KINDS = ("stream_error", "stream_cut", "stream_end")
# Bytes written at once by the flood faults.
_FLOOD_WRITE = 65536

_MALFORMED_BODIES = {
    "html": (b"<html><body>oops</body></html>", "text/html; charset=utf-8"),
    "truncated": (
        b'{"id": "chatcmpl-fake", "object": "chat.completion", "choi',
        "application/json; charset=utf-8",
    ),
    "empty": (b"", "application/json; charset=utf-8"),
}

_GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_USAGE_MODES = frozenset({"normal", "zeros", "missing"})


@dataclass
class Fault:
    """A queued fault; ``hits`` counts the requests it has been applied to."""

    kind: str
    times: int | None
    path: str | None
    params: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, path: str, streaming: bool) -> bool:
        if self.path is not None and not path.startswith(self.path):
            return False
        return streaming or self.kind not in _STREAM_ONLY_KINDS


#: Model names of the form ``fault:KIND?name=value&...`` pick a fault per request,
#: so a hostile upstream can be driven by the caller alone (bench scripts, fuzzing).
FAULT_MODEL_PREFIX = "fault:"


def fault_from_model(body: Any) -> Fault | None:
    """Return the fault a request's ``model`` names, or None.

    Values are parsed as JSON when they can be (numbers, ``true``, objects),
    else kept as text: ``fault:stall?seconds=3``, ``fault:status?status=502``.
    """
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model.startswith(FAULT_MODEL_PREFIX):
        return None
    kind, _, query = model[len(FAULT_MODEL_PREFIX) :].partition("?")
    if kind not in FAULT_KINDS:
        return None
    params: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name not in FAULT_KINDS[kind]:
            continue
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    return Fault(kind, 1, None, params)


def echo_reply(request: dict[str, Any]) -> str:
    """Return the default reply: ``"Echo: "`` plus the last user text or prompt."""
    if "messages" in request:
        text = ""
        for message in request.get("messages") or []:
            if isinstance(message, dict) and message.get("role") == "user":
                text = _content_text(message.get("content"))
        return f"Echo: {text}"
    prompt = request.get("prompt", "")
    if isinstance(prompt, list):
        prompt = " ".join(str(part) for part in prompt)
    return f"Echo: {prompt}"


def _content_text(content: Any) -> str:
    """Flatten a message content (a string or a list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _count_words(text: str) -> int:
    return len(text.split())


def _split_tokens(text: str) -> list[str]:
    # Each "token" keeps its leading whitespace so the pieces join back into
    # exactly the reply text (trailing whitespace aside).
    return re.findall(r"\s*\S+", text)


def _embedding(text: str) -> list[float]:
    """Return 8 floats in [-1, 1], a pure function of ``text``."""
    words = struct.unpack(">8I", hashlib.sha256(text.encode()).digest())
    return [round(word / 0xFFFFFFFF * 2 - 1, 6) for word in words]


class FakeLMStudio(LoopbackHTTPServer):
    """A fake LM Studio (or, with ``lmstudio=False``, llama.cpp) server.

    Attributes may be changed between requests; each request reads them once
    when it arrives:

    - ``models``: ids of downloaded models (``/v1/models`` lists them all).
    - ``loaded``: ids of loaded models (defaults to ``models``).
    - ``lmstudio``: answer ``/lmstudio-greeting`` and ``/api/v0/models``.
    - ``api_token``: when set, require ``Authorization: Bearer <token>``.
    - ``reply``: None (echo), a string, or ``callable(request_json) -> str``.
    - ``usage_mode``: ``"normal"``, ``"zeros"`` or ``"missing"``.
    - ``stream_interval``: seconds between streamed chunks.
    - ``first_token_delay``: seconds before the first chunk (or, without
      streaming, before the response).
    - ``idle_timeout``: seconds a keep-alive connection may idle (None: for ever).
    - ``unknown_model_status``: 404 (older LM Studio) or 400 (newer).
    - ``embeddings``: False answers ``/v1/embeddings`` as llama-cpp-python's
      server does without ``embedding=True`` (a 500 that explains why).

    - ``max_context_length``, ``max_connections``.

    ``peak_generations`` records the most generations (chat and text
    completions) ever under way at once: what a gateway admitted.

    With ``lmstudio=False`` it also behaves like llama-cpp-python's FastAPI
    server where that differs: an unknown path is ``404 {"detail": "Not
    Found"}``, an ``X-Request-ID`` that is not a UUID gets an empty 400, any
    model name is answered by the loaded model (and echoed back), and
    ``/v1/models`` waits while a generation is under way.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        models: list[str] | None = None,
        loaded: list[str] | None = None,
        lmstudio: bool = True,
        api_token: str | None = None,
        reply: str | Callable[[dict[str, Any]], str] | None = None,
        usage_mode: str = "normal",
        stream_interval: float = 0.0,
        first_token_delay: float = 0.0,
        idle_timeout: float | None = 5.0,
        unknown_model_status: int = 404,
        max_context_length: int = 8192,
        max_connections: int = 256,
        embeddings: bool = True,
    ) -> None:
        if usage_mode not in _USAGE_MODES:
            raise ValueError(f"usage_mode must be one of {sorted(_USAGE_MODES)}")
        super().__init__(
            host, port, idle_timeout=idle_timeout, max_connections=max_connections
        )
        self.models = list(models) if models is not None else ["fake-model-1"]
        self.loaded = list(loaded) if loaded is not None else list(self.models)
        self.lmstudio = lmstudio
        self.api_token = api_token
        self.reply = reply
        self.usage_mode = usage_mode
        self.stream_interval = stream_interval
        self.first_token_delay = first_token_delay
        self.unknown_model_status = unknown_model_status
        self.max_context_length = max_context_length
        self.embeddings = embeddings

        self._faults: list[Fault] = []
        self._completion_ids = itertools.count(1)
        self._generations = 0  # generations under way
        #: Most generations ever under way at once (reset it to 0 to measure).
        self.peak_generations = 0

    # -- faults ------------------------------------------------------------

    def fault(
        self, kind: str, times: int | None = None, *, path: str | None = None, **params
    ) -> Fault:
        """Apply fault ``kind`` to the next ``times`` matching requests.

        ``times=None`` keeps it until :meth:`clear_faults`. ``path`` limits it
        to request paths starting with that prefix. Stream-only kinds match
        only streaming requests. When several faults match, the oldest wins.
        ``"refuse"`` is :meth:`refuse` (no ``times`` or ``path``: no request
        ever arrives to count); :meth:`clear_faults` undoes it.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        unknown = set(params) - FAULT_KINDS[kind]
        if unknown:
            raise TypeError(f"fault {kind!r} got unexpected arguments {unknown}")
        if times is not None and times < 1:
            raise ValueError("times must be None or at least 1")
        fault = Fault(kind, times, path, dict(params))
        if kind == "refuse":
            if times is not None or path is not None:
                raise ValueError("a refuse fault takes neither times nor path")
            self.refuse()
            return fault
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every queued fault and listen again if refusing."""
        with self._lock:
            self._faults.clear()
        if self._started and not self._stopping.is_set():
            self.accept()

    @property
    def faults(self) -> list[Fault]:
        """A snapshot of the faults still queued."""
        with self._lock:
            return list(self._faults)

    def _take_fault(self, path: str, streaming: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path, streaming):
                    fault.hits += 1
                    if fault.exhausted:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- behaviour shared by handlers --------------------------------------

    def _reply_text(self, request: dict[str, Any]) -> str:
        reply = self.reply
        if reply is None:
            return echo_reply(request)
        if callable(reply):
            return str(reply(request))
        return str(reply)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict | None:
        if self.usage_mode == "missing":
            return None
        if self.usage_mode == "zeros":
            prompt_tokens = completion_tokens = 0
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _all_models(self) -> list[str]:
        return list(dict.fromkeys([*self.models, *self.loaded]))

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._completion_ids)}"


class _Handler(ConnectionHandler):
    """Serve one connection's requests for a :class:`FakeLMStudio`."""

    server_headers = {"X-Powered-By": "Express"}
    fake: FakeLMStudio

    # -- request handling ----------------------------------------------------

    def _handle_request(self) -> None:
        fake = self.fake
        raw_path, _, query = self.path.partition("?")
        body = self._read_body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.record = RequestRecord(
            method=self.command,
            path=raw_path,
            query=query,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            json=parsed,
            received_at=time.monotonic(),
            connection_id=self.conn_record.id,
        )
        fake._record_request(self.record)

        # Express routes are not strict about a trailing slash.
        route = raw_path.rstrip("/") or "/"
        streaming = (
            self.command == "POST"
            and route in _GENERATION_PATHS
            and isinstance(parsed, dict)
            and parsed.get("stream") is True
        )
        fault = fake._take_fault(raw_path, streaming) or fault_from_model(parsed)
        if fault is not None:
            self.record.fault = fault.kind
            if fault.kind not in _STREAM_ONLY_KINDS and self._apply_fault(
                fault, streaming
            ):
                return

        if not fake.lmstudio and not _is_uuid(self.headers.get("X-Request-ID")):
            # starlette-context's RequestIdPlugin: an empty 400, no body.
            self._send_bytes(400, b"", "text/plain; charset=utf-8")
            return

        if fake.api_token is not None:
            expected = f"Bearer {fake.api_token}"
            if self.headers.get("Authorization") != expected:
                self._send_json(401, _invalid_api_key())
                return

        handler = self._route(route)
        if handler is None and not fake.lmstudio:
            self._send_json(404, {"detail": "Not Found"})
            return
        if handler is None:
            message = f"Unexpected endpoint or method. ({self.command} {raw_path})"
            self._send_json(200, {"error": message})
            return
        if self.command == "POST" and not isinstance(parsed, dict):
            self._send_json(400, _invalid_request("Request body must be a JSON object"))
            return
        handler(parsed, fault if streaming else None)

    def _route(self, route: str) -> Callable[..., None] | None:
        routes: dict[tuple[str, str], Callable[..., None]] = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
        }
        if self.fake.lmstudio:
            routes[("GET", "/lmstudio-greeting")] = self._greeting
            routes[("GET", "/api/v0/models")] = self._v0_models
        return routes.get((self.command, route))

    # -- faults --------------------------------------------------------------

    def _apply_fault(self, fault: Fault, streaming: bool) -> bool:
        """Apply a non-streaming fault; return True when it answered the request."""
        params = fault.params
        kind = fault.kind
        if kind == "flood":
            if streaming:
                return False  # the stream floods
            self._flood_answer(params.get("bytes", 50_000_000), params.get("chunked"))
            return True
        if kind == "stall":
            # Say nothing, then answer normally if the client is still there.
            if not self._wait(params.get("seconds", 60.0)):
                raise Abort
            return False
        if kind == "status":
            status = params.get("status", 500)
            body = params.get("body")
            if body is None:
                body = {"error": {"message": f"Injected HTTP {status}"}}
            self._send_json(status, body, params.get("headers"))
        elif kind == "malformed":
            payload, content_type = _MALFORMED_BODIES[params.get("variant", "html")]
            payload = params.get("body", payload)
            if isinstance(payload, str):
                payload = payload.encode()
            content_type = params.get("content_type", content_type)
            self._send_bytes(200, payload, content_type)
        elif kind == "error200":
            self._send_json(200, {"error": params.get("error", "Injected error")})
        elif kind == "reset":
            self._reset(rst=params.get("rst", False))
        elif kind == "garbage":
            data = params.get("data", "SSH-2.0-OpenSSH_9.2p1\r\n")
            self._write(data.encode() if isinstance(data, str) else data)
            self._reset(rst=False)
        elif kind == "web_server":
            status = params.get("status", 404 if self.command == "GET" else 405)
            page = f"<html><body><h1>{status}</h1><hr>nginx</body></html>"
            self._send_bytes(status, page.encode(), "text/html")
        elif kind == "drip":
            self._drip(params.get("interval", 1.0), params.get("part", "both"))
        elif kind == "echo":
            assert self.record is not None
            quoted = {"headers": self.record.headers, "body": self.record.body.decode()}
            message = f"Invalid request, you sent: {json.dumps(quoted)}"
            self._send_json(params.get("status", 400), {"error": {"message": message}})
        return True

    def _flood_answer(self, size: int, chunked: bool) -> None:
        """Answer a chat completion whose content is ``size`` bytes of text."""
        head = b'{"object":"chat.completion","model":"flood","choices":[{"index":0,'
        head += b'"message":{"role":"assistant","content":"'
        tail = b'"},"finish_reason":"stop"}]}'
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(len(head) + size + len(tail))
        self._start_response(200, headers)
        write = self._write_chunk if chunked else self._write
        write(head)
        block = b"x" * _FLOOD_WRITE
        for start in range(0, size, _FLOOD_WRITE):
            write(block[: min(_FLOOD_WRITE, size - start)])
        write(tail)
        if chunked:
            self._write_chunk(b"")

    def _drip(self, interval: float, part: str) -> None:
        """Answer a chat completion one byte at a time (``part``: what drips)."""
        if part not in ("headers", "body", "both"):
            raise ValueError(f"drip part must be headers, body or both, not {part!r}")
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "Drip."},
            "finish_reason": "stop",
        }
        body = dumps(
            {
                "id": self.fake._new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": (self.fake.loaded or self.fake.models or ["fake"])[0],
                "choices": [choice],
            }
        )
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.headers_sent = True
        if self.record is not None:
            self.record.status = 200
        for name, data in (("headers", head), ("body", body)):
            if part not in (name, "both"):
                self._write(data)
                continue
            for index in range(len(data)):
                if index and not self._wait(interval):
                    raise Abort
                self._write(data[index : index + 1])
        self._close("server")

    # -- endpoints -----------------------------------------------------------

    def _greeting(self, _body: Any, _fault: Fault | None) -> None:
        self._send_json(200, {"lmstudio": True})

    def _models(self, _body: Any, _fault: Fault | None) -> None:
        fake = self.fake
        if not fake.lmstudio:
            # llama-cpp-python's server runs one request at a time: /v1/models
            # waits until the generation under way has finished.
            while fake._generations:
                if not self._wait(POLL_SECONDS):
                    raise Abort
        data = [
            {"id": model, "object": "model", "owned_by": "organization_owner"}
            for model in self.fake._all_models()
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _v0_models(self, _body: Any, _fault: Fault | None) -> None:
        fake = self.fake
        loaded = set(fake.loaded)
        data = []
        for model in fake._all_models():
            entry = {
                "id": model,
                "object": "model",
                "type": "embeddings" if "embed" in model.lower() else "llm",
                "publisher": model.split("/")[0] if "/" in model else "fake-publisher",
                "arch": "llama",
                "compatibility_type": "gguf",
                "quantization": "Q4_K_M",
                "state": "loaded" if model in loaded else "not-loaded",
                "max_context_length": fake.max_context_length,
                "capabilities": [],
            }
            if model in loaded:
                entry["loaded_context_length"] = min(4096, fake.max_context_length)
            data.append(entry)
        self._send_json(200, {"object": "list", "data": data})

    def _resolve_model(self, requested: Any) -> str | None:
        """Return the answering model, or send LM Studio's error and return None."""
        fake = self.fake
        loaded = list(fake.loaded)
        if isinstance(requested, str) and requested.startswith(FAULT_MODEL_PREFIX):
            requested = None  # the fault is the point; any loaded model answers
        if not fake.lmstudio and loaded:
            # llama-cpp-python serves its one model whatever is asked, and
            # echoes the requested name back.
            return requested or loaded[0]
        if requested and requested not in fake._all_models():
            status = fake.unknown_model_status
            if status == 404:
                message = f'Model "{requested}" not found'
            else:
                message = f'Invalid model identifier "{requested}".'
            error = {
                "message": message,
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
            self._send_json(status, {"error": error})
            return None
        if not loaded:
            self._send_json(400, {"error": NO_MODELS_LOADED})
            return None
        if len(loaded) == 1:
            # LM Studio quirk: a single loaded model answers whatever was asked.
            return loaded[0]
        # A known but unloaded model would be loaded just in time.
        return requested or loaded[0]

    def _chat(self, body: dict[str, Any], fault: Fault | None) -> None:
        if not isinstance(body.get("messages"), list):
            self._send_json(400, _invalid_request("'messages' field is required"))
            return
        prompt_words = sum(
            _count_words(_content_text(message.get("content")))
            for message in body["messages"]
            if isinstance(message, dict)
        )
        self._generate("chat", body, prompt_words, fault)

    def _completions(self, body: dict[str, Any], fault: Fault | None) -> None:
        prompt = body.get("prompt")
        if prompt is None:
            self._send_json(400, _invalid_request("'prompt' field is required"))
            return
        if isinstance(prompt, list):
            prompt = " ".join(str(part) for part in prompt)
        self._generate("text", body, _count_words(str(prompt)), fault)

    def _generate(
        self, kind: str, body: dict[str, Any], prompt_tokens: int, fault: Fault | None
    ) -> None:
        with self.fake._lock:
            self.fake._generations += 1
            self.fake.peak_generations = max(
                self.fake.peak_generations, self.fake._generations
            )
        try:
            self._generate_answer(kind, body, prompt_tokens, fault)
        finally:
            with self.fake._lock:
                self.fake._generations -= 1

    def _generate_answer(
        self, kind: str, body: dict[str, Any], prompt_tokens: int, fault: Fault | None
    ) -> None:
        model = self._resolve_model(body.get("model"))
        if model is None:
            return
        tokens = _split_tokens(self.fake._reply_text(body))
        finish_reason = "stop"
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        if isinstance(limit, int) and 0 < limit < len(tokens):
            tokens = tokens[:limit]
            finish_reason = "length"
        usage = self.fake._usage(prompt_tokens, len(tokens))
        completion_id = self.fake._new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = int(time.time())

        def envelope(obj: str) -> dict[str, Any]:
            # Key order as in OpenAI's objects, for readable captures.
            return {
                "id": completion_id,
                "object": obj,
                "created": created,
                "model": model,
            }

        if body.get("stream") is True:
            self._stream(kind, envelope, tokens, finish_reason, usage, body, fault)
            return

        if not self._wait(self.fake.first_token_delay):
            raise Abort
        text = "".join(tokens)
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            response = {**envelope("chat.completion"), "choices": [choice]}
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            response = {**envelope("text_completion"), "choices": [choice]}
        if usage is not None:
            response["usage"] = usage
        response["system_fingerprint"] = model
        self._send_json(200, response)

    def _stream(
        self,
        kind: str,
        envelope: Callable[[str], dict[str, Any]],
        tokens: list[str],
        finish_reason: str,
        usage: dict | None,
        body: dict[str, Any],
        fault: Fault | None,
    ) -> None:
        """Send server-sent events over chunked transfer encoding, as LM Studio does."""
        fault_kind = fault.kind if fault is not None else None
        params = fault.params if fault is not None else {}
        interval = self.fake.stream_interval
        if fault_kind == "slow_stream":
            interval = params.get("interval", 1.0)
        cut_after = params.get("after", 2)

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(piece: str | None, index: int, finish: str | None) -> dict:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if index == 0:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece or ""}
            choice.update(logprobs=None, finish_reason=finish)
            head = envelope(obj)
            return {**head, "system_fingerprint": head["model"], "choices": [choice]}

        self._start_response(
            200,
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Transfer-Encoding": "chunked",
            },
        )
        if not self._wait(self.fake.first_token_delay):
            raise Abort
        if fault_kind == "flood":
            self._flood_events(dumps(chunk("x" * 1000, 1, None)), params)
        elif fault_kind == "long_line":
            self._long_line(params)
        pieces = tokens or [""]
        for index, piece in enumerate(pieces):
            if index and not self._wait(interval):
                raise Abort
            if fault_kind in _BREAKING_STREAM_KINDS and index == cut_after:
                self._stream_fault(fault_kind, params)
            if fault_kind == "bad_chunk" and index == params.get("after", 1):
                data = params.get("data", "")
                self._send_event(
                    data.encode() if isinstance(data, str) else dumps(data)
                )
                continue
            if fault_kind == "raw_event" and index == params.get("after", 1):
                self._write_chunk(params.get("frame", "").encode())
                if self.record is not None:
                    self.record.chunks_sent += 1
                continue
            self._send_event(dumps(chunk(piece, index, None)))
        if fault_kind in _BREAKING_STREAM_KINDS and cut_after >= len(pieces):
            self._stream_fault(fault_kind, params)
        self._send_event(dumps(chunk(None, len(pieces), finish_reason)))
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        if include_usage and usage is not None:
            final = {**envelope(obj), "choices": [], "usage": usage}
            self._send_event(dumps(final))
        self._send_event(b"[DONE]")
        self._write_chunk(b"")  # the zero-length chunk ends the body

    def _flood_events(self, event: bytes, params: dict[str, Any]) -> None:
        """Send copies of ``event`` until ``bytes`` bytes of events are out."""
        framed = b"data: " + event + b"\n\n"
        per_write = max(1, _FLOOD_WRITE // len(framed))
        block = framed * per_write
        total = params.get("bytes", 300_000_000)
        sent = 0
        while sent < total:
            self._write_chunk(block)
            sent += len(block)
            if self.record is not None:
                self.record.chunks_sent += per_write

    def _long_line(self, params: dict[str, Any]) -> None:
        """Send one line of ``bytes`` bytes; without ``newline``, end there."""
        size = params.get("bytes", 40_000_000)
        self._write_chunk(b"data: ")
        block = b"x" * _FLOOD_WRITE
        for start in range(0, size, _FLOOD_WRITE):
            self._write_chunk(block[: min(_FLOOD_WRITE, size - start)])
        if not params.get("newline"):
            self._write_chunk(b"")
            raise Abort
        self._write_chunk(b"\n\n")

    def _stream_fault(self, kind: str, params: dict[str, Any]) -> None:
        """Break the stream under way; always raises :class:`Abort`."""
        if kind == "stream_error":
            error = params.get("error", {"message": "Injected stream error"})
            self._send_event(dumps({"error": error}))
            # The body ends cleanly but without [DONE], as after a model crash.
            self._write_chunk(b"")
            raise Abort
        if kind == "stream_end":
            # The body ends cleanly, yet no chunk had a finish_reason and no
            # [DONE] came: the server stopped mid-answer, the wire looks fine.
            self._write_chunk(b"")
            raise Abort
        # stream_cut: no terminating chunk, so the client sees a short body.
        self.connection.shutdown(socket.SHUT_RDWR)
        self._close("fault")
        raise Abort

    def _embeddings(self, body: dict[str, Any], _fault: Fault | None) -> None:
        if not self.fake.embeddings:
            error = {
                "message": "Llama model must be created with embedding=True to "
                "call this method",
                "type": "internal_server_error",
                "param": None,
                "code": None,
            }
            self._send_json(500, {"error": error})
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            self._send_json(400, _invalid_request("'input' field is required"))
            return
        model = self._resolve_model(body.get("model"))
        if model is None:
            return
        texts = [item if isinstance(item, str) else str(item) for item in inputs]
        data = [
            {"object": "embedding", "index": index, "embedding": _embedding(text)}
            for index, text in enumerate(texts)
        ]
        response: dict[str, Any] = {"object": "list", "data": data, "model": model}
        usage = self.fake._usage(sum(_count_words(text) for text in texts), 0)
        if usage is not None:
            response["usage"] = {
                "prompt_tokens": usage["prompt_tokens"],
                "total_tokens": usage["prompt_tokens"],
            }
        self._send_json(200, response)

    def _send_event(self, data: bytes) -> None:
        self._write_chunk(b"data: " + data + b"\n\n")
        if self.record is not None:
            self.record.chunks_sent += 1


# Set here: the handler is defined after the server it serves.
FakeLMStudio.handler_class = _Handler


def _is_uuid(value: str | None) -> bool:
    """True for no value or a UUID: what llama-cpp-python accepts as a request id."""
    if value is None:
        return True
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _invalid_api_key() -> dict[str, Any]:
    message = (
        "Malformed or missing LM Studio API token. "
        "Send it as 'Authorization: Bearer <token>'."
    )
    error = {"type": "invalid_request", "code": "invalid_api_key", "message": message}
    return {"error": error}


def _invalid_request(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def main(argv: list[str] | None = None) -> None:
    """Serve a fake LM Studio until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.lmstudio", description=main.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1234, help="0 picks a free port")
    parser.add_argument(
        "--model", action="append", dest="models", help="downloaded model (repeat)"
    )
    parser.add_argument(
        "--loaded", action="append", help="loaded model (repeat; default: all)"
    )
    parser.add_argument("--api-token", help="require this bearer token")
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    parser.add_argument("--stream-interval", type=float, default=0.05)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help="act as llama.cpp's server: no /lmstudio-greeting or /api/v0",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
    )
    fake = FakeLMStudio(
        args.host,
        args.port,
        models=args.models,
        loaded=args.loaded,
        lmstudio=not args.llama_cpp,
        api_token=args.api_token,
        idle_timeout=args.idle_timeout,
        stream_interval=args.stream_interval,
        first_token_delay=args.first_token_delay,
        max_connections=args.max_connections,
    ).start()
    stopping = threading.Event()
    # Handlers set explicitly: a process started in the background inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    log.info("fake LM Studio listening on %s (Ctrl-C to stop)", fake.url)
    try:
        stopping.wait()
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
