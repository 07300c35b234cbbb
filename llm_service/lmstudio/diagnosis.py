"""One classification of upstream failures: what went wrong, and what to do.

``make run``, ``/health``, the API's error bodies (``details.cause``) and
``flask lmstudio check`` all name a failure by the same cause and give the same
advice, so a misconfiguration reads the same wherever a newcomer looks.

Each :class:`~llm_service.lmstudio.errors.LMStudioError` carries its ``cause``:
the client sets it where the transport failure or the answer tells (a DNS
failure, a refused connection, a 401, a web page instead of the API...).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LMStudioError

TOKEN_SETTING = "LLM_SERVICE_LM_STUDIO_API_TOKEN"  # noqa: S105 - a name, not a secret
ADDRESS = "LLM_SERVICE_LM_STUDIO_URL (or _HOST and _PORT)"


@dataclass(frozen=True)
class Cause:
    """A kind of upstream failure: a short statement and what to do about it."""

    name: str
    summary: str
    advice: str


CAUSES: dict[str, Cause] = {
    cause.name: cause
    for cause in (
        Cause(
            "dns",
            "DNS lookup failed: the upstream's host name does not resolve",
            f"check the host name in {ADDRESS}",
        ),
        Cause(
            "refused",
            "connection refused: nothing is listening at that address",
            "start LM Studio's server (Developer tab, or `lms server start`), or "
            f"`make local-llm`; check {ADDRESS}",
        ),
        Cause(
            "unreachable",
            "the connection failed or was dropped before an answer",
            f"check that the host is up and reachable from here; check {ADDRESS}",
        ),
        Cause(
            "timeout",
            "timed out waiting for the upstream",
            "a host that drops packets (down, or a firewall) or a very busy model "
            f"looks like this: check {ADDRESS}; raise LLM_SERVICE_LM_STUDIO_TIMEOUT "
            "for slow models",
        ),
        Cause(
            "auth",
            "the upstream requires a valid API token (HTTP 401/403)",
            f"set {TOKEN_SETTING} to a token from LM Studio's server settings "
            "(Developer tab, Require Authentication)",
        ),
        Cause(
            "not_openai",
            "the upstream answers, but not as an OpenAI-compatible model server "
            "(a wrong path, or another web server)",
            f"point {ADDRESS} at the model server's root, e.g. "
            "http://localhost:1234 (no path other than an optional /v1)",
        ),
        Cause(
            "not_http",
            "the upstream does not speak HTTP (it answered with something else)",
            f"that port belongs to another kind of service: check {ADDRESS} "
            "(and http:// against https://)",
        ),
        Cause(
            "rate_limited",
            "the upstream is rate-limiting the gateway (HTTP 429)",
            "wait and retry, or raise the limit of whatever is in front of the "
            "model server",
        ),
        Cause(
            "busy",
            "the upstream is overloaded or starting (HTTP 503)",
            "retry in a moment; if it lasts, look at the model server's log",
        ),
        Cause(
            "no_model",
            "no model is loaded",
            "load one (`lms load <model>`), or name a model in each request so "
            "LM Studio's just-in-time loading can load it",
        ),
        Cause(
            "model_not_found",
            "the upstream does not know the requested model",
            "use one of the names GET /v1/models lists, or set "
            "LLM_SERVICE_DEFAULT_MODEL to one",
        ),
        Cause(
            "loop",
            "the upstream is this gateway itself: requests would go round in a loop",
            f"point {ADDRESS} at the model server, not at llm-service's own address",
        ),
        Cause(
            "chained",
            "the upstream is another llm-service gateway, not a model server",
            f"point {ADDRESS} at the model server itself unless the chain is meant",
        ),
        Cause(
            "server_error",
            "the upstream failed (HTTP 5xx)",
            "look at the model server's log; the model may have crashed or run out "
            "of memory",
        ),
        Cause(
            "rejected",
            "the upstream rejected the request",
            "read the upstream's message: the prompt may exceed the model's context",
        ),
        Cause(
            "invalid_response",
            "the upstream's answer is not the OpenAI-compatible API",
            f"check that {ADDRESS} points at LM Studio or llama.cpp's server",
        ),
        Cause(
            "stream_error",
            "the upstream reported an error inside a stream",
            "look at the model server's log",
        ),
        Cause(
            "upstream_error",
            "the upstream failed",
            "look at the model server's log",
        ),
    )
}


def cause_of(error: LMStudioError) -> Cause:
    """Return the :class:`Cause` of ``error`` (its own, else a generic one)."""
    return CAUSES.get(error.cause, CAUSES["upstream_error"])


def explain(error: LMStudioError) -> str:
    """Say in one line what went wrong, in words an operator can act on."""
    cause = cause_of(error)
    status = f" (HTTP {error.status})" if error.status and cause.name in _SHOWS else ""
    detail = ""
    if cause.name in _RELAYS and error.message:
        detail = f": {error.message}"
    elif cause.name == "not_http" and error.body:
        detail = f": it began with {error.body!r}"
    return f"{cause.summary}{status}{detail}"


#: Causes whose upstream status adds information to the summary.
_SHOWS = frozenset({"server_error", "rejected", "upstream_error"})
#: Causes whose message (the upstream's, or the client's finer one) adds to it.
_RELAYS = frozenset(
    {"not_openai", "server_error", "rejected", "upstream_error", "stream_error"}
)
