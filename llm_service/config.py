"""Settings: defaults, layering and one validation pass at start-up.

Every setting is read from ``LLM_SERVICE_<NAME>`` in the environment (Flask's
``from_prefixed_env`` parses each value as JSON when it can). :data:`SETTINGS` is
the single list of them: the defaults, the validation and the README table all
come from it.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

ENV_PREFIX = "LLM_SERVICE"
#: Variables with the prefix that are read outside :data:`SETTINGS`: the file
#: ``wsgi.py`` loads, and the bundled model server's own settings
#: (``local_backend/settings.py``, a dev tool the service does not import).
OTHER_VARIABLES = ("ENV_FILE", "LOCAL_BACKEND", "LOCAL_CACHE_DIR")


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""


@dataclass(frozen=True)
class Setting:
    """One configuration key: its default, how to check it, what it means."""

    name: str
    default: Any
    parse: Callable[[str, Any], Any]
    help: str
    #: ``"url"``: a URL (or list of them) whose userinfo and query values are
    #: secret; ``"secret"``: the whole value is; ``"hosts"``: a list of hosts,
    #: each with a ``url`` and an ``api_token``. None is ever shown or logged.
    sensitive: str = ""

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}_{self.name}"


#: A URL's ``scheme://`` and its authority (``user:password@host:port``).
_AUTHORITY = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:)?//(?P<authority>[^/?#]*)"
)
REDACTED = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with its userinfo and query values replaced by ``***``.

    ``http://admin:pa55word@host:1234/v1?token=abc`` becomes
    ``http://***@host:1234/v1?token=***``. Works on any text, valid URL or not
    (it must, to be used in the message that says a URL is invalid), and on
    several hosts (``redis+sentinel://:pw@h1:26379,h2:26379``).
    """
    text = str(url)
    match = _AUTHORITY.match(text)
    if match is None:
        # No "//": a "user:pw@host" without a scheme is still redacted.
        head, sep, tail = text.partition("/")
        if "@" in head:
            text = REDACTED + "@" + head.rpartition("@")[2] + sep + tail
        return _redact_query(text)
    authority = match["authority"]
    if "@" in authority:
        authority = REDACTED + "@" + authority.rpartition("@")[2]
    scheme = match["scheme"] or ""
    return scheme + "//" + authority + _redact_query(text[match.end() :])


def _redact_query(text: str) -> str:
    rest, hash_, _fragment = text.partition("#")
    path, question, query = rest.partition("?")
    if not question:
        return rest + (hash_ and "#" + REDACTED)
    names = [part.partition("=")[0] for part in query.split("&") if part]
    query = "&".join(f"{name}={REDACTED}" for name in names)
    return path + "?" + query + (hash_ and "#" + REDACTED)


def _url_secrets(url: str) -> Iterator[str]:
    """Yield the secret parts of ``url``: userinfo, password, query values."""
    match = _AUTHORITY.match(url)
    authority = match["authority"] if match else url.partition("/")[0]
    userinfo, at, _ = authority.rpartition("@")
    if at and userinfo:
        user, colon, password = userinfo.partition(":")
        yield userinfo
        # A lone user name is a token (https://TOKEN@host); a user name before
        # a password is not secret, and too common a word to scrub everywhere.
        yield from (password,) if colon else (user,)
    query = url.partition("#")[0].partition("?")[2]
    for _, value in parse_qsl(query, keep_blank_values=False):
        yield value
    yield from (part for part in url.partition("#")[2:] if part)


def secret_values(config: dict) -> list[str]:
    """Return every secret held by a sensitive setting, longest first.

    Logs scrub these from each formatted line, tracebacks included. Each
    appears raw and percent-decoded; parts under four characters are skipped
    (scrubbing "a" or "12" would mangle every line without protecting much).
    """
    found: set[str] = set()
    for setting in SETTINGS:
        if not setting.sensitive:
            continue
        values = config.get(setting.name)
        values = values if isinstance(values, list | tuple) else [values]
        for value in values:
            for part in _secret_parts(setting.sensitive, value):
                found.update({part, unquote(part)})
    return sorted((v for v in found if len(v) >= 4), key=len, reverse=True)


def _secret_parts(kind: str, value: Any) -> Iterator[str]:
    """Yield the secrets of one value of a sensitive setting of ``kind``."""
    if kind == "hosts":
        if isinstance(value, dict):
            yield from _secret_parts("url", value.get("url"))
            yield from _secret_parts("secret", value.get("api_token"))
        elif isinstance(value, str) and value:
            # Not parsed yet: the JSON text of the whole list.
            try:
                hosts = json.loads(value)
            except ValueError:
                hosts = []
            for host in hosts if isinstance(hosts, list) else []:
                yield from _secret_parts("hosts", host)
        return
    if not isinstance(value, str) or not value:
        return
    yield from [value] if kind == "secret" else _url_secrets(value)


def _fail(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(
        f"{ENV_PREFIX}_{name}={value!r} is invalid: expected {expected}."
    )


def _integer(low: int | None = None, high: int | None = None) -> Callable:
    expected = "an integer"
    if low is not None and high is not None:
        expected = f"an integer from {low} to {high}"
    elif low is not None:
        expected = f"an integer >= {low}"

    def parse(name: str, value: Any) -> int:
        if isinstance(value, bool):
            raise _fail(name, value, expected)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _fail(name, value, expected) from None
        if not isinstance(value, int):
            raise _fail(name, value, expected)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _fail(name, value, expected)
        return value

    return parse


def _seconds(low: float = 0.0, allow_zero: bool = False) -> Callable:
    bound = f"{low:g}"
    expected = f"a number of seconds {'>=' if allow_zero else '>'} {bound}"

    def parse(name: str, value: Any) -> float:
        if isinstance(value, bool):
            raise _fail(name, value, expected)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _fail(name, value, expected) from None
        if not isinstance(value, int | float):
            raise _fail(name, value, expected)
        if value < low or (value == low and not allow_zero):
            raise _fail(name, value, expected)
        return float(value)

    return parse


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise _fail(name, value, "true or false")


def _choice(*choices: str, upper: bool = False) -> Callable:
    def parse(name: str, value: Any) -> str:
        text = str(value).strip()
        text = text.upper() if upper else text.lower()
        if text not in choices:
            raise _fail(name, value, "one of " + ", ".join(choices))
        return text

    return parse


def _optional(parse: Callable) -> Callable:
    """``parse``, or None for a value left empty."""

    def parse_optional(name: str, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(name, value)

    return parse_optional


def _optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _text(name: str, value: Any) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise _fail(name, value, "a non-empty string")
    return text


def _string_list(name: str, value: Any) -> list[str] | None:
    """Parse a JSON list of strings, a comma-separated string, or nothing."""
    expected = 'a JSON list of strings such as ["a", "b"] (or a comma-separated list)'
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise _fail(name, value, expected) from None
        else:
            value = [item.strip() for item in text.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, expected)
    return [item.strip() for item in value if item.strip()]


def _host(name: str, value: Any) -> str:
    text = _text(name, value)
    if any(c in text for c in "/ ?#@"):
        raise _fail(name, value, "a host name or IP address, without scheme or path")
    return text


def _http_url(name: str, value: Any) -> str | None:
    text = _optional_text(name, value)
    if text is None:
        return None
    shown = redact_url(text)  # the message must not show a password
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fail(name, shown, "a URL with a valid host and port") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise _fail(name, shown, "an http:// or https:// URL such as http://host:1234")
    return text


def _storage_uri(name: str, value: Any) -> str:
    text = _text(name, value)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme not in {"memory", "redis", "rediss", "redis+sentinel", "memcached"}:
        raise _fail(
            name,
            redact_url(text),
            "a storage URI such as memory:// or redis://host:6379",
        )
    return text


#: Where forwarded headers are believed by default: this machine only.
LOOPBACK = ["127.0.0.0/8", "::1"]
#: In TRUSTED_PROXY_ADDRESSES, stands for peers on a Unix socket (no address).
UNIX_PEER = "unix"


def _networks(name: str, value: Any) -> list[str]:
    """Parse a list of IP addresses or CIDR networks (and ``unix``)."""
    items = _string_list(name, value)
    if items is None:
        return []
    networks = []
    for item in items:
        if item.lower() == UNIX_PEER:
            networks.append(UNIX_PEER)
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise _fail(
                name,
                value,
                'a JSON list of IP addresses or networks such as ["10.0.0.0/8"]',
            ) from None
    return networks


def _loopback_bind(name: str, value: Any) -> str | None:
    """Parse ``host:port`` on a loopback address (``127.0.0.1:9464``)."""
    text = _optional_text(name, value)
    if text is None:
        return None
    expected = "a loopback host:port such as 127.0.0.1:9464"
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(name, value, expected)
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise _fail(name, value, expected)
        except ValueError:
            raise _fail(name, value, expected) from None
    return text


def _host_list(name: str, value: Any) -> list[str] | None:
    """Parse host names, lower-cased: the Host header is compared case-blind."""
    items = _string_list(name, value)
    return [item.lower() for item in items] if items is not None else None


#: A host's name in LLM_SERVICE_UPSTREAMS: shown in /health and access records.
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_KEYS = frozenset({"name", "url", "api_token", "slots", "weight"})
#: The settings that describe the one host of a single-host set-up.
SINGLE_HOST_SETTINGS = (
    "LM_STUDIO_URL",
    "LM_STUDIO_HOST",
    "LM_STUDIO_PORT",
    "LM_STUDIO_API_TOKEN",
)
#: The name of the one host that the single-host settings describe.
SINGLE_HOST_NAME = "default"


def _upstreams(name: str, value: Any) -> list[dict[str, Any]] | None:
    """Parse the list of model hosts; a bad entry is named, never its secrets.

    Each entry is ``{"name", "url", "api_token"?, "slots"?, "weight"?}``; the
    result has every key (``api_token`` and ``slots`` may be None, ``weight``
    defaults to 1) and each URL without a trailing ``/`` or ``/v1``.
    """
    var = f"{ENV_PREFIX}_{name}"
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(
                f"{var} is invalid: expected a JSON list of hosts such as "
                '[{"name": "a", "url": "http://a:1234"}].'
            ) from None
    if not isinstance(value, list):
        raise ConfigError(f"{var} is invalid: expected a JSON list of hosts.")
    hosts: list[dict[str, Any]] = []
    for index, entry in enumerate(value, start=1):
        hosts.append(_upstream_entry(var, index, entry))
    names = [host["name"] for host in hosts]
    for host_name in names:
        if names.count(host_name) > 1:
            raise ConfigError(f"{var}: the name {host_name!r} is used twice.")
    return hosts


def _upstream_entry(var: str, index: int, entry: Any) -> dict[str, Any]:
    where = f"{var} entry {index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is invalid: expected an object with name and url.")
    host_name = entry.get("name")
    if isinstance(host_name, str) and _HOST_NAME.fullmatch(host_name):
        where = f"{var} entry {index} ({host_name})"
    else:
        raise ConfigError(
            f"{where}: name is invalid: expected 1-64 letters, digits, '.', '_' or '-'."
        )
    unknown = sorted(set(entry) - _HOST_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (expected "
            + ", ".join(sorted(_HOST_KEYS))
            + ")."
        )
    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{where}: url is missing.")
    try:
        url = _http_url("url", url)
    except ConfigError:
        raise ConfigError(
            f"{where}: url {redact_url(url)!r} is invalid: expected an http:// or "
            "https:// URL such as http://host:1234."
        ) from None
    token = entry.get("api_token")
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"{where}: api_token must be a string.")
    slots = entry.get("slots")
    if slots is not None and (
        isinstance(slots, bool) or not isinstance(slots, int) or slots < 1
    ):
        raise ConfigError(f"{where}: slots must be an integer >= 1.")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        raise ConfigError(f"{where}: weight must be a number > 0.")
    return {
        "name": host_name,
        "url": str(url).rstrip("/").removesuffix("/v1"),
        "api_token": (token or "").strip() or None,
        "slots": slots,
        "weight": float(weight),
    }


def _database_url(name: str, value: Any) -> str | None:
    text = _optional_text(name, value)
    if text is None:
        return None
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme.split("+", 1)[0] not in {"sqlite", "postgresql", "postgres"}:
        raise _fail(
            name, value, "a database URL such as sqlite:///path or postgresql://host/db"
        )
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("LM_STUDIO_HOST", "localhost", _host, "LM Studio host."),
    Setting("LM_STUDIO_PORT", 1234, _integer(1, 65535), "LM Studio port."),
    Setting(
        "LM_STUDIO_URL",
        None,
        _http_url,
        "Full base URL of the upstream (e.g. `https://llm.internal:8443`); "
        "overrides host and port. A trailing `/v1` is accepted. Credentials in "
        "it are never shown (`http://***@host`).",
        sensitive="url",
    ),
    Setting(
        "UPSTREAMS",
        None,
        _upstreams,
        "Several model hosts, as a JSON list: "
        '`[{"name": "gpu-a", "url": "http://10.0.0.5:1234", "api_token": "...", '
        '"slots": 4, "weight": 1}]` (`api_token`, `slots`, `weight` optional). '
        "Replaces the `LM_STUDIO_URL`/`HOST`/`PORT`/`API_TOKEN` settings (setting "
        'both is an error). See "Several hosts". URLs and tokens are never shown.',
        sensitive="hosts",
    ),
    Setting(
        "LM_STUDIO_TIMEOUT",
        30.0,
        _seconds(),
        "Read timeout in seconds for one upstream call (time to the answer).",
    ),
    Setting(
        "LM_STUDIO_CONNECT_TIMEOUT",
        5.0,
        _seconds(),
        "Connect timeout in seconds for one upstream call.",
    ),
    Setting(
        "LM_STUDIO_API_TOKEN",
        None,
        _optional_text,
        "Bearer token for LM Studio's *Require Authentication* (sent upstream, "
        "never logged).",
        sensitive="secret",
    ),
    Setting(
        "LM_STUDIO_RETRIES",
        2,
        _integer(0, 10),
        "Retries after a failed upstream attempt (connection errors and "
        "408/429/500/502/503/504 only).",
    ),
    Setting(
        "LM_STUDIO_RETRY_BUDGET",
        60.0,
        _seconds(),
        "Hard wall-clock limit in seconds for one upstream call: connecting, "
        "headers, body, every retry and wait, however slowly the upstream sends "
        "(for streams: up to the response headers); keep it below gunicorn's "
        "timeout.",
    ),
    Setting(
        "LM_STUDIO_RETRY_AFTER_MAX",
        10.0,
        _seconds(allow_zero=True),
        "Longest upstream `Retry-After` the gateway waits for before retrying.",
    ),
    Setting(
        "STREAM_FIRST_TOKEN_TIMEOUT",
        120.0,
        _seconds(),
        "Streams: longest wait for the upstream's first event, from sending the "
        "request (long prompts take long); not capped by the retry budget.",
    ),
    Setting(
        "STREAM_IDLE_TIMEOUT",
        60.0,
        _seconds(),
        "Streams: longest silence allowed between two upstream events.",
    ),
    Setting(
        "STREAM_TOTAL_TIMEOUT",
        600.0,
        _seconds(),
        "Streams: longest a whole stream may last.",
    ),
    Setting(
        "STREAM_KEEPALIVE_SECONDS",
        10.0,
        _seconds(),
        "Streams: an SSE comment is sent after this much silence so proxies keep "
        "the connection open.",
    ),
    Setting(
        "MAX_UPSTREAM_RESPONSE_BYTES",
        16 * 1024 * 1024,
        _integer(1024),
        "Largest upstream answer read, in bytes (a larger one gets 502 "
        "`upstream_response_too_large`; it is refused, never read whole).",
    ),
    Setting(
        "MAX_SSE_LINE_BYTES",
        4 * 1024 * 1024,
        _integer(1024),
        "Streams: largest line (and event) of an upstream stream, in bytes; a "
        "longer one ends the stream with an `upstream_response_too_large` error "
        "event.",
    ),
    Setting(
        "HEALTH_CACHE_SECONDS",
        5.0,
        _seconds(allow_zero=True),
        "How long an upstream health probe result is reused.",
    ),
    Setting(
        "DEFAULT_MODEL",
        None,
        _optional_text,
        "Model used when a request names none (otherwise the upstream's loaded model).",
    ),
    Setting(
        "DEFAULT_MAX_TOKENS",
        512,
        _integer(1),
        "`max_tokens` used when a request gives none.",
    ),
    Setting(
        "MAX_MAX_TOKENS",
        4096,
        _integer(1),
        "Largest `max_tokens` a request may ask for.",
    ),
    Setting(
        "MAX_REQUEST_SIZE",
        10000,
        _integer(1),
        "Largest request body in bytes (larger bodies get 413).",
    ),
    Setting(
        "RATE_LIMIT_REQUESTS",
        100,
        _integer(1),
        "Requests per minute per client address, counted once across all the "
        "API routes together.",
    ),
    Setting(
        "RATE_LIMIT_STORAGE_URI",
        "memory://",
        _storage_uri,
        "Where rate-limit counters live: `memory://` (one gunicorn process) or "
        "`redis://host:6379/0` (shared). A shared store that is slow (0.5 s) or "
        "down is replaced by per-process counters until it is back.",
        sensitive="url",
    ),
    Setting(
        "DISCOVERY_INTERVAL_SECONDS",
        5.0,
        _seconds(allow_zero=True),
        "Several hosts: how often each host is asked in the background what it "
        "serves and has loaded (at once after a failure); 0 turns the background "
        "discovery off.",
    ),
    Setting(
        "AFFINITY",
        True,
        _boolean,
        "Several hosts: send a conversation's next turn to the host that served "
        "it (its prompt cache); `off` places every request on its own.",
    ),
    Setting(
        "AFFINITY_SECONDS",
        600.0,
        _seconds(),
        "Several hosts: how long a conversation stays with its host after its "
        "last turn.",
    ),
    Setting(
        "BREAKER_FAILURES",
        5,
        _integer(1),
        "Consecutive failed calls after which a host's circuit opens (no traffic "
        "while other hosts can serve).",
    ),
    Setting(
        "BREAKER_COOLDOWN_SECONDS",
        30.0,
        _seconds(),
        "Seconds an open circuit waits before one trial request (half-open).",
    ),
    Setting(
        "UPSTREAM_SLOTS",
        None,
        _optional(_integer(1, 10000)),
        "Requests the model server runs at once (its parallel slots); more wait "
        "in the gateway's queue. Unset: what the server reports, else 4 (`make "
        "run` sets 1 for the bundled server). With `LLM_SERVICE_UPSTREAMS`: the "
        "slots of each host that sets none.",
    ),
    Setting(
        "QUEUE_MAX",
        1000,
        _integer(0, 100000),
        "Requests that may wait for a slot at once, per gateway process; past it "
        "503 `queue_full`.",
    ),
    Setting(
        "QUEUE_TIMEOUT",
        60.0,
        _seconds(),
        "Longest wait for a slot; past it 503 `queue_timeout` (an error event on "
        "a stream already sending queue comments).",
    ),
    Setting(
        "QUEUE_MAX_PER_KEY",
        None,
        _optional(_integer(1, 100000)),
        "Requests one caller (API key, else client address) may have waiting; "
        "unset: a quarter of `LLM_SERVICE_QUEUE_MAX`.",
    ),
    Setting(
        "SLOT_LEASE_SECONDS",
        30.0,
        _seconds(low=1.0, allow_zero=True),
        "With Redis as `LLM_SERVICE_RATE_LIMIT_STORAGE_URI`: slots are leases of "
        "this length, renewed while a request runs, so a crashed gateway's slots "
        "come back after it.",
    ),
    Setting(
        "LOG_LEVEL",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        "Log level.",
    ),
    Setting("LOG_FORMAT", "json", _choice("json", "text"), "`json` lines or `text`."),
    Setting(
        "LOG_FLUSH_SECONDS",
        0.1,
        _seconds(allow_zero=True),
        "Lines below WARNING wait at most this long to be written to stderr "
        "together (one write per 4 KiB, like nginx's `buffer=`/`flush=`); WARNING "
        "and above are written at once. `0`: every line at once.",
    ),
    Setting("DEBUG", False, _boolean, "Flask debug mode (never in production)."),
    Setting(
        "ALLOWED_ORIGINS",
        None,
        _string_list,
        'CORS origins allowed to call the API, as a JSON list (`["https://a.com"]`); '
        "none by default.",
    ),
    Setting(
        "TRUSTED_HOSTS",
        None,
        _host_list,
        'Accepted `Host` header values as a JSON list (`["api.example.com"]`); '
        "any by default. Others get 400. Compared case-insensitively.",
    ),
    Setting(
        "CLIENT_HEADER_TIMEOUT",
        10.0,
        _seconds(),
        "Seconds a client has to send a request's headers (from connecting, or "
        "from its first byte on a kept-alive connection), and again its body; "
        "slower connections are closed. Read by the gunicorn worker.",
    ),
    Setting(
        "TRUSTED_PROXIES",
        0,
        _integer(0, 10),
        "Number of reverse proxies in front of the gateway whose "
        "`X-Forwarded-*` headers are trusted; they are believed only from a peer "
        "in `LLM_SERVICE_TRUSTED_PROXY_ADDRESSES`.",
    ),
    Setting(
        "TRUSTED_PROXY_ADDRESSES",
        LOOPBACK,
        _networks,
        "Addresses or networks of those proxies, as a JSON list "
        '(`["10.0.0.5", "10.1.0.0/16"]`; `"unix"` for a Unix socket). '
        "`X-Forwarded-*` from any other peer is ignored.",
    ),
    Setting(
        "METRICS",
        True,
        _boolean,
        "Count requests and upstream calls for `/metrics` and `/status` "
        '(README, "Monitoring"); `false` turns both off.',
    ),
    Setting(
        "METRICS_BIND",
        None,
        _loopback_bind,
        "A loopback `host:port` (`127.0.0.1:9464`) where gunicorn also listens "
        "and where `/metrics` and `/status` are then served, instead of on the "
        "main address.",
    ),
    Setting(
        "AUTH",
        "auto",
        _choice("auto", "required", "off"),
        "API keys: `auto` requires a key once one has ever been created (`flask "
        "keys create`), `required` always, `off` never (then the gateway may not "
        "listen beyond loopback without this set explicitly).",
    ),
    Setting(
        "AUTH_CACHE_SECONDS",
        5.0,
        _seconds(allow_zero=True),
        "How long each worker reuses the key set it read from the database; a "
        "revocation takes effect within this time.",
    ),
    Setting(
        "DOCS_PUBLIC",
        True,
        _boolean,
        "Serve `/docs` and `/openapi.json` without a key (`false`: a key is "
        "needed once keys are required).",
    ),
    Setting(
        "DATABASE_URL",
        None,
        _database_url,
        "Where keys and usage records live: SQLite in `instance/llm-service.db` by "
        "default; `postgresql://user:pass@host/db` for several instances.",
        sensitive="url",
    ),
    Setting(
        "USAGE_BUFFER_SIZE",
        10000,
        _integer(1),
        "Usage records held in memory while the database is slow or down; past "
        "it, records are dropped, counted and logged.",
    ),
    Setting(
        "USAGE_FLUSH_SECONDS",
        1.0,
        _seconds(),
        "How often the background writer stores buffered usage records.",
    ),
    Setting(
        "QUOTA_LEASE_SECONDS",
        60.0,
        _seconds(),
        "A concurrency slot held by a gateway that died is free again after this "
        "long (leases of live requests are renewed).",
    ),
)


def read_layers(config: Any, test_config: Mapping[str, Any] | None = None) -> None:
    """Fill a Flask ``Config`` from every layer, then check it (:func:`load_settings`).

    The layers, later winning: the defaults, ``instance/config.py`` (skipped when
    tests pass ``test_config``), the ``LLM_SERVICE_*`` environment (which
    :func:`load_env_file` fills from ``.env``), then ``test_config``.
    """
    if test_config is None:
        config.from_pyfile("config.py", silent=True)
    config.from_prefixed_env(ENV_PREFIX)
    # OpenTelemetry's own switch, under its standard name (llm_service/tracing.py).
    if "OTEL_TRACES_EXPORTER" in os.environ:
        config["OTEL_TRACES_EXPORTER"] = os.environ["OTEL_TRACES_EXPORTER"]
    if test_config is not None:
        config.from_mapping(test_config)
    load_settings(config)


def instance_path() -> str:
    """Where the app's ``instance/`` folder is, found the way Flask finds it."""
    from flask.sansio.scaffold import find_package

    prefix, package_path = find_package(__name__.rpartition(".")[0])
    if prefix is None:
        return os.path.join(package_path, "instance")
    return os.path.join(prefix, "var", f"{__name__.rpartition('.')[0]}-instance")


def server_settings() -> dict[str, Any]:
    """Return the checked settings the app will run with, without building it.

    For the server around the app (``gunicorn.conf.py``, the worker class): the
    same layers as :func:`read_layers`, so a value set in ``.env`` or
    ``instance/config.py`` reaches the server too. Call :func:`load_env_file`
    first, as ``wsgi.py`` does before it builds the app.
    """
    from flask import Config

    config = Config(instance_path())
    read_layers(config)
    return dict(config)


def load_env_file(default: str | os.PathLike[str]) -> None:
    """Load ``LLM_SERVICE_ENV_FILE`` (else ``default``) into the environment.

    Variables already set win over the file.
    """
    from dotenv import load_dotenv

    load_dotenv(os.environ.get(f"{ENV_PREFIX}_ENV_FILE") or Path(default))


def load_settings(config: dict) -> None:
    """Fill in defaults, then check and normalise every setting in ``config``.

    Raises :class:`ConfigError` naming the variable and the expected form.
    """
    single_host = [
        name for name in SINGLE_HOST_SETTINGS if config.get(name) not in (None, "")
    ]
    for setting in SETTINGS:
        raw = config.get(setting.name, setting.default)
        if raw is None and setting.default is None:
            config[setting.name] = None
            continue
        config[setting.name] = setting.parse(setting.name, raw)

    if config["MAX_MAX_TOKENS"] < config["DEFAULT_MAX_TOKENS"]:
        raise ConfigError(
            f"{ENV_PREFIX}_DEFAULT_MAX_TOKENS={config['DEFAULT_MAX_TOKENS']} is "
            f"larger than {ENV_PREFIX}_MAX_MAX_TOKENS={config['MAX_MAX_TOKENS']}."
        )
    if config["QUEUE_MAX_PER_KEY"] is None:
        config["QUEUE_MAX_PER_KEY"] = max(1, config["QUEUE_MAX"] // 4)
    # Flask and Werkzeug read these two under their own names.
    config["MAX_CONTENT_LENGTH"] = config["MAX_REQUEST_SIZE"]
    if config["UPSTREAMS"] and single_host:
        raise ConfigError(
            f"{ENV_PREFIX}_UPSTREAMS and {ENV_PREFIX}_{single_host[0]} are both "
            f"set: list every host in {ENV_PREFIX}_UPSTREAMS, or use the "
            "single-host settings alone."
        )
    for entry in config["UPSTREAMS"] or []:
        if entry["slots"] is None:
            entry["slots"] = config["UPSTREAM_SLOTS"]
    config["UPSTREAM_HOSTS"] = config["UPSTREAMS"] or [
        {
            "name": SINGLE_HOST_NAME,
            "url": upstream_base_url(config),
            "api_token": config["LM_STUDIO_API_TOKEN"],
            "slots": config["UPSTREAM_SLOTS"],
            "weight": 1.0,
        }
    ]
    # The first host's: what the CLI and `make run` check and show.
    config["LM_STUDIO_BASE_URL"] = config["UPSTREAM_HOSTS"][0]["url"]


def upstream_base_url(config: dict) -> str:
    """Return the upstream's root URL, without a trailing ``/`` or ``/v1``."""
    url = config.get("LM_STUDIO_URL")
    if not url:
        host = config["LM_STUDIO_HOST"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        url = f"http://{host}:{config['LM_STUDIO_PORT']}"
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def unknown_variables(names: Iterable[str]) -> list[str]:
    """Return a warning for each ``LLM_SERVICE_*`` name that nothing reads.

    A typo (``LLM_SERVICE_LM_STUDIO_PROT``) would otherwise be ignored in
    silence; the warning names the closest real variable.
    """
    known = [setting.name for setting in SETTINGS] + list(OTHER_VARIABLES)
    warnings = []
    for name in sorted(names):
        if not name.startswith(f"{ENV_PREFIX}_"):
            continue
        short = name.removeprefix(f"{ENV_PREFIX}_")
        if short in known:
            continue
        warning = f"{name} is not a setting and is ignored"
        close = difflib.get_close_matches(short, known, n=1, cutoff=0.6)
        if close:
            warning += f": did you mean {ENV_PREFIX}_{close[0]}?"
        warnings.append(warning)
    return warnings


def check_not_self(upstream_url: str, bind: str) -> None:
    """Raise :class:`ConfigError` when ``upstream_url`` reaches ``bind`` itself.

    ``bind`` is gunicorn's ``host:port``. A gateway whose upstream is its own
    address would call itself until its threads and time budget run out.
    """
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    parts = urlsplit(upstream_url)
    if not port.isdigit() or not parts.hostname:
        return  # a unix socket, or nothing to compare
    upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
    if int(port) != upstream_port:
        return
    targets = _addresses(parts.hostname)
    if host in {"", "0.0.0.0", "::"}:
        looped = any(_is_this_machine(address) for address in targets)
    else:
        looped = bool(targets & _addresses(host))
    if looped:
        raise ConfigError(
            f"the upstream URL ({parts.scheme}://{parts.hostname}:{upstream_port}) "
            f"is this gateway's own address ({bind}): point "
            f"{ENV_PREFIX}_LM_STUDIO_URL (or _HOST/_PORT) at the model server, "
            "or serve the gateway on another port."
        )


def _addresses(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {str(info[4][0]) for info in infos}


def _is_this_machine(address: str) -> bool:
    """True for a loopback address or one of this machine's own addresses."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))  # only an address of ours can be bound
        except OSError:
            return False
    return True
