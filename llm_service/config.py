"""Settings: defaults, layering and one validation pass at start-up.

Every setting is read from ``LLM_SERVICE_<NAME>`` in the environment (Flask's
``from_prefixed_env`` parses each value as JSON when it can). :data:`SETTINGS` is
the single list of them: the defaults, the validation and the README table all
come from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "LLM_SERVICE"


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""


@dataclass(frozen=True)
class Setting:
    """One configuration key: its default, how to check it, what it means."""

    name: str
    default: Any
    parse: Callable[[str, Any], Any]
    help: str

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}_{self.name}"


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
    expected = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"

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
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise _fail(name, value, "an http:// or https:// URL such as http://host:1234")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fail(name, value, "a URL with a valid port") from None
    return text


def _storage_uri(name: str, value: Any) -> str:
    text = _text(name, value)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme not in {"memory", "redis", "rediss", "redis+sentinel", "memcached"}:
        raise _fail(name, value, "a storage URI such as memory:// or redis://host:6379")
    return text


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
        "overrides host and port. A trailing `/v1` is accepted.",
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
        "Hard limit in seconds for one upstream call including every retry and "
        "wait; keep it below gunicorn's timeout.",
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
        "Streams: longest wait for the upstream's first event (long prompts take "
        "long).",
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
        "Requests per minute per client address on the API routes.",
    ),
    Setting(
        "RATE_LIMIT_STORAGE_URI",
        "memory://",
        _storage_uri,
        "Where rate-limit counters live: `memory://` (one gunicorn process) or "
        "`redis://host:6379/0` (shared).",
    ),
    Setting(
        "LOG_LEVEL",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
        "Log level.",
    ),
    Setting("LOG_FORMAT", "json", _choice("json", "text"), "`json` lines or `text`."),
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
        _string_list,
        'Accepted `Host` header values as a JSON list (`["api.example.com"]`); '
        "any by default. Others get 400.",
    ),
    Setting(
        "LOCAL_BACKEND",
        "auto",
        _choice("auto", "off"),
        "`make run` only: start the bundled llama.cpp model server when nothing "
        "answers at a loopback upstream URL (`auto`), or never (`off`).",
    ),
    Setting(
        "TRUSTED_PROXIES",
        0,
        _integer(0, 10),
        "Number of reverse proxies in front of the gateway whose "
        "`X-Forwarded-*` headers are trusted.",
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


def load_settings(config: dict) -> None:
    """Fill in defaults, then check and normalise every setting in ``config``.

    Raises :class:`ConfigError` naming the variable and the expected form.
    """
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
    # Flask and Werkzeug read these two under their own names.
    config["MAX_CONTENT_LENGTH"] = config["MAX_REQUEST_SIZE"]
    config["LM_STUDIO_BASE_URL"] = upstream_base_url(config)


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
