"""``make run``: serve the gateway, with a local model server when none answers.

When nothing answers at the configured upstream URL, the URL is on this machine
and ``LLM_SERVICE_LOCAL_BACKEND`` is not ``off``, the bundled llama.cpp server
(Gemma 3 270M) is installed if needed and started there first, and stopped again
when the gateway stops. Production (gunicorn with gunicorn.conf.py) never does
this: only this script does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_service import create_app  # noqa: E402
from llm_service import local_backend as backend  # noqa: E402
from llm_service.auth import check_start  # noqa: E402
from llm_service.config import ConfigError  # noqa: E402


def say(message: str) -> None:
    print(f">> {message}", flush=True)


def start_local_backend(url: str) -> backend.LocalModelServer | None:
    """Start the bundled model server at ``url``'s port when it makes sense."""
    parts = urlsplit(url)
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    try:
        backend.require_loopback_host(host)
    except backend.LocalBackendError:
        say(
            f"no model server answers at {url} (not on this machine, so nothing "
            "is started): /llm/message answers 503 until it does"
        )
        return None
    say(
        f"no LM Studio at {url}: starting the bundled model server "
        f"({backend.MODEL_ALIAS}, llama.cpp) there; "
        "set LLM_SERVICE_LOCAL_BACKEND=off to skip"
    )
    python = backend.ensure_installed()
    backend.ensure_model(python)
    server = backend.LocalModelServer(
        host=host, port=parts.port or 80, python=python
    ).start()
    say(
        f"model server ready at {server.url} (model {server.model}, "
        f"log {server.log_path})"
    )
    return server


def main() -> int:
    load_dotenv(os.environ.get("LLM_SERVICE_ENV_FILE") or ROOT / ".env")
    try:
        config = create_app().config
    except ConfigError as err:
        print(f"llm-service: configuration error: {err}", file=sys.stderr)
        return 3
    bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
    try:
        check_start([bind])  # before any model server starts; gunicorn checks too
    except SystemExit as refusal:
        print(refusal, file=sys.stderr)
        return 3
    url = config["LM_STUDIO_BASE_URL"]
    server = None
    if backend.is_model_server_up(url):
        say(f"using the model server at {url}")
    elif config["LOCAL_BACKEND"] == "off":
        say(
            f"no model server answers at {url} and LLM_SERVICE_LOCAL_BACKEND=off: "
            "/llm/message answers 503 until one runs"
        )
    else:
        try:
            server = start_local_backend(url)
        except backend.LocalBackendError as err:
            print(
                f"llm-service: the bundled model server failed: {err}", file=sys.stderr
            )
            return 4
    say(f"llm-service on http://{bind} (Ctrl-C to stop)")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
    )
    # Ctrl-C reaches both processes (same process group); SIGTERM is passed on.
    signal.signal(signal.SIGTERM, lambda *_: gateway.terminate())
    try:
        return gateway.wait()
    except KeyboardInterrupt:
        return gateway.wait()
    finally:
        if server is not None:
            server.stop()
            say("bundled model server stopped")


if __name__ == "__main__":
    sys.exit(main())
