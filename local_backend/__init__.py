"""Run a local OpenAI-compatible model server as a stand-in for LM Studio.

LM Studio cannot be installed everywhere (CI, headless Debian boxes), but
llama-cpp-python's server speaks the same ``/v1`` API. This package
(``install.py``, ``server.py``, ``cli.py``, with ``common.py`` for what they
share and ``settings.py`` for its environment variables):

* installs ``llama-cpp-python[server]`` and a tiny Gemma 3 270M (Q4_K_M) model
  package into a dedicated venv (``<cache>/venv``), building llama.cpp once;
* assembles the model file into ``<cache>/models/gemma-3-270m-q4_k_m.gguf``;
* starts, reuses, probes and stops llama-cpp-python's server on a loopback
  port, run by the venv's interpreter through ``serve.py``: the same server,
  except that a non-streamed generation also stops when its client
  disconnects.

The cache directory defaults to ``~/.cache/llm-service`` and can be moved with
the ``LLM_SERVICE_LOCAL_CACHE_DIR`` environment variable or ``--cache-dir``.

A dev tool beside the gateway, not part of it: ``llm_service`` never imports
it (``scripts/run_gateway.py`` does, for ``make run``). It imports only the
standard library, so it works before the service's own dependencies are
installed and runs as a script (``serve.py`` is not imported: the venv's
interpreter runs it)::

    python -m local_backend [--port 1234] [--host 127.0.0.1]
        [--cache-dir DIR] [--python PY] [--timeout S] [--threads N]
        [--install-only | --detach | --stop | --probe URL] [--pid-file F]

Exit codes: 0 ok, 1 other error (or ``--probe`` found no server), 2 usage
error, 3 port taken by something that is not a model server, 4 install/build
failed, 5 server failed to start or timed out, 130 interrupted.
"""

from .cli import (
    build_parser,
    main,
)
from .common import (
    BUILD_NOTICE,
    CACHE_DIR_ENV,
    CHAT_FORMAT,
    CONTEXT_SIZE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_PROBE_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    EXIT_ERROR,
    EXIT_INSTALL_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PORT_IN_USE,
    EXIT_START_FAILED,
    EXIT_USAGE,
    LLAMA_CPP_REQUIREMENT,
    LLAMA_SERVER_SETTING_NAMES,
    LOCAL_LLM_REQUIREMENTS,
    MODEL_ALIAS,
    MODEL_FILENAME,
    MODEL_PACKAGE_REQUIREMENT,
    REUSE_PROBE_TIMEOUT,
    STOP_GRACE_SECONDS,
    CacheLayout,
    InstallError,
    LocalBackendError,
    PortInUseError,
    ServerStartError,
)
from .install import (
    create_venv,
    diagnose_build_failure,
    ensure_installed,
    ensure_model,
    llama_cpp_cmake_args,
    packages_installed,
)
from .server import (
    LocalModelServer,
    api_base_url,
    default_thread_count,
    describe_exit,
    is_model_server_up,
    list_models,
    port_holder,
    port_is_free,
    require_loopback_host,
    server_environment,
    stop_detached,
    write_pid_file,
)
from .settings import LOCAL_BACKEND, LOCAL_CACHE_DIR, SettingError
from .settings import SETTINGS as SETTINGS

__all__ = [
    "BUILD_NOTICE",
    "CACHE_DIR_ENV",
    "CHAT_FORMAT",
    "CONTEXT_SIZE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_PROBE_TIMEOUT",
    "DEFAULT_START_TIMEOUT",
    "EXIT_ERROR",
    "EXIT_INSTALL_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PORT_IN_USE",
    "EXIT_START_FAILED",
    "EXIT_USAGE",
    "LLAMA_CPP_REQUIREMENT",
    "LLAMA_SERVER_SETTING_NAMES",
    "LOCAL_BACKEND",
    "LOCAL_CACHE_DIR",
    "LOCAL_LLM_REQUIREMENTS",
    "MODEL_ALIAS",
    "MODEL_FILENAME",
    "MODEL_PACKAGE_REQUIREMENT",
    "REUSE_PROBE_TIMEOUT",
    "SETTINGS",
    "STOP_GRACE_SECONDS",
    "CacheLayout",
    "InstallError",
    "LocalBackendError",
    "LocalModelServer",
    "PortInUseError",
    "ServerStartError",
    "SettingError",
    "api_base_url",
    "build_parser",
    "create_venv",
    "default_thread_count",
    "describe_exit",
    "diagnose_build_failure",
    "ensure_installed",
    "ensure_model",
    "is_model_server_up",
    "list_models",
    "llama_cpp_cmake_args",
    "main",
    "packages_installed",
    "port_holder",
    "port_is_free",
    "require_loopback_host",
    "server_environment",
    "stop_detached",
    "write_pid_file",
]
